"""Shared base of fusedopt's optimizers: the clip settings, the checks on every input, and step().

Each class (sgd.py, adam.py) subclasses its torch.optim namesake through ``ClippedStep``, so the
constructor validation, defaults, state_dict and load_state_dict are torch's own; ``step`` is ours:
gather the (param, grad) pairs of every group, value-clamp, take the global norm, then hand each
(device, dtype) group to the class's ``_update_`` with the clip folded in.
"""
import copy
import re
import textwrap

import torch

from fusedopt import clip as _clip
from fusedopt import nonfinite as _nonfinite
from fusedopt._dispatch import check_backend, choose_backend, first_subclass, torch_reason
from fusedopt._distributed import (NormReduce, check_norm_group, group_device, is_dtensor,
                                   is_process_group, local)
from fusedopt._grouping import group_by_device_dtype, pick
from fusedopt._report import StepReport
from fusedopt._state import tracked_copy

# Instance attributes that torch.optim.Optimizer.__getstate__ would drop (pickle, deepcopy). The
# clip settings live in the param groups (clip.CLIP_DEFAULTS), which torch's pickling keeps.
_OWN_ATTRS = ("nonfinite", "backend", "norm_group", "grad_norm", "step_skipped", "_clip_defaults")
_CLIP_ATTRS = tuple(_clip.CLIP_DEFAULTS)


def _clip_property(key: str) -> property:
    """``opt.<key>``: the clip setting every param group holds (ValueError when they differ);
    assigning it checks the value and sets it in every group, and for groups added or loaded
    later."""
    def get(self):
        """Read: the value every param group holds. Assign: checked, then set in every group."""
        return getattr(_clip.settings_of(type(self).__name__, self.param_groups),
                       _SETTING_FIELD[key])

    def set_(self, value):
        value = _clip.check_setting(key, value)
        if value == _clip.CLIP_DEFAULTS[key]:
            self._clip_defaults.pop(key, None)
        else:
            self._clip_defaults[key] = value
        for target in (*self.param_groups, self.defaults):
            if value == _clip.CLIP_DEFAULTS[key]:
                target.pop(key, None)
            else:
                target[key] = value
    return property(get, set_, doc=f"The clip's {key}, kept in every param group. {get.__doc__}")


_SETTING_FIELD = dict(zip(_CLIP_ATTRS, _clip.ClipSettings._fields))


def scalar_on(value, device: torch.device):
    """A hyperparameter as the fused ops take it: a float, or a Tensor on the params' device."""
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value


def kernel_lr(lr, device: torch.device):
    """lr as the kernels take it: a float, or a 1-element fp32 Tensor on the device (read there,
    so a scheduler writing into it needs no sync and no recompile). A CPU Tensor is read as a
    float: that costs no sync."""
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr)
    return lr.to(device=device, dtype=torch.float32)


def split_for_fused_op(*columns) -> tuple[list[int], list[int]]:
    """Indices whose tensors torch's fused optimizer ops handle correctly, and the rest.

    Those ops walk each tensor's memory as if contiguous: with a grad laid out unlike its param
    (a transposed grad for a contiguous param) torch 2.13's fused CPU SGD missed by 5.0 and Adam
    by 2.0 after one lr-1 step, where the for-loop was exact. The rest go through rules.py, one
    tensor at a time.
    """
    fused, rest = [], []
    for i, tensors in enumerate(zip(*columns)):
        (fused if all(t is None or t.is_contiguous() for t in tensors) else rest).append(i)
    return fused, rest


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules run in for params of ``dtype``: fp32, or fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def host_float(value) -> float:
    """A hyperparameter the fused ops take only as a float (SGD weight_decay, Adam betas).

    A CUDA Tensor here costs one host sync per step, as in torch.optim's fused path.
    """
    return float(value) if isinstance(value, torch.Tensor) else value


_BACKEND_DOC = {
    True: """``"torch"``, ``"triton"`` or None: Triton for parameters on one
            CUDA device when triton imports, else torch (fusedopt/_dispatch.py).""",
    False: """``"torch"`` or None; this optimizer has no Triton kernel (the
            class docstring says why): it steps on the torch path on every device, and
            ``"triton"`` is refused with the reason.""",
}
# The memory-lean options (fusedopt/_elementwise.py), on every class with a kernel.
_MEMORY_DOC = {
    True: """
        stochastic_rounding (bool): round every bf16/fp16 store of a param or state value
            stochastically (unbiased: updates below half an ulp still move the value in
            expectation) instead of to nearest. The random bits are a hash of (rounding_seed, the
            param's position, its step count, the element), the same on both backends; SGD and
            Lion then keep a ``state["step"]`` counter for it.
        master_weights (bool): keep an exact fp32 master for 16-bit params: a bf16 param keeps
            ``state["master_remainder"]`` (int16, +2 bytes: the param and it are the fp32 value
            bit for bit; the param is that value rounded to nearest, ties away from zero), an fp16
            param ``state["master_param"]`` (an fp32 copy, +4 bytes). fp32/fp64 params need none.
            ``master_param(p)`` returns the fp32 value.
        state_dtype (torch.dtype, optional): the dtype the state tensors are stored in
            (torch.float32, torch.bfloat16 or torch.float16; default the param's, as torch.optim);
            the math is fp32 either way.
        rounding_seed (int, optional): the seed of stochastic rounding's bits; when None, drawn
            from torch's default generator by an optimizer that rounds (at construction, or at
            the first step that rounds), never by one that does not. Each of these four that is
            set (and the seed of a group that rounds) is kept in the param groups, so it is in
            ``state_dict()``, may differ per group, and a resumed run continues the same random
            stream; left at their defaults, the groups and the state_dict are torch.optim's.""",
    False: "",
}
_GRAD_DOC = {
    True: """The Triton backend never writes
        ``.grad``: after ``step`` it holds the unclipped gradient. The torch backend leaves the
        clipped gradient there, as ``clip_grad_value_``/``clip_grad_norm_`` do.""",
    False: """After ``step``, ``.grad`` holds the
        clipped gradient, as after ``clip_grad_value_``/``clip_grad_norm_``.""",
}


def _reflow(text: str, indent: str, width: int = 100) -> str:
    """``text``'s paragraphs (split at blank lines) refilled to ``width`` columns at ``indent``."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent,
                                     break_long_words=False, break_on_hyphens=False)
                       for p in paragraphs if p)


def class_doc(summary: str, update_math: str, args: str, name: str, state_note: str = "",
              reference: str | None = None, kernels: bool = True) -> str:
    """A class docstring: summary, the update rules (the clip's lines first), Args, differences
    from the reference (torch.optim.<name> unless ``reference`` names another). ``kernels``:
    whether the class has a Triton path (ClippedStep._NO_KERNELS unset).

    ``update_math``: the class's rules after the clip, plain text for a terminal (help(),
    IPython's ``?``; no LaTeX), one per line at 8 spaces, a condition from column 56 where there
    is one. The summary is wrapped at 96 columns and the Differences paragraphs refilled at 100
    (help() removes the docstring's 4-space indent and shows every line 4 columns in), so that no
    line passes 100 columns, as written or as shown."""
    reference = reference or f"torch.optim.{name}"
    backend_doc, grad_doc = _BACKEND_DOC[kernels], _GRAD_DOC[kernels]
    memory_doc = _MEMORY_DOC[kernels]
    differences = _reflow(
        "clipping happens inside ``step``, over every param with a grad in every group, and "
        "``grad_norm`` holds the pre-clip total norm (a 0-dim tensor on the params' device, None "
        "until a step with ``max_grad_norm`` set). ``step_skipped`` is the last step's skip flag "
        "(a 0-dim fp32 tensor on the device, 1.0 when skipped) when it could skip (a GradScaler, "
        "or ``nonfinite`` other than \"propagate\"), else None. Sharded, both are global: the "
        "same on every rank (``grad_norm`` is a plain tensor where ``clip_grad_norm_`` on "
        "DTensors returns a replicated DTensor of the same value)." + state_note + " " + grad_doc,
        " " * 8)
    summary = "\n    ".join(textwrap.wrap(summary, 96, break_long_words=False,
                                         break_on_hyphens=False))
    return f"""{summary}

    The step, one rule per line, in order. p is a parameter, g its gradient, t the number of p's
    steps (this one included), ||g|| the norm_type norm over the gradients of every param group
    (and of every rank of norm_group); other names are the constructor's arguments. "x <- ..."
    gives x a new value (p, g, or a state tensor: m, v, ...), "x = ..." names one.

        g <- clamp(g, -v, v)                            if max_grad_value = v
        g <- g * min(1, n / (||g|| + 1e-6))             if max_grad_norm = n
{update_math}

    Args:
{args}
        max_grad_norm (float, optional): clip the total norm of all gradients to this, as
            ``clip_grad_norm_``. ``float('inf')`` computes ``grad_norm`` and never clips.
        norm_type (float): 2.0 (default) or ``float('inf')``.
        max_grad_value (float, optional): clamp every gradient element to ``[-v, v]`` first, as
            ``clip_grad_value_``. These three, once set, are kept in every param group as
            torch keeps lr: in ``state_dict()`` (a resumed run takes the saved ones), changed
            between steps by writing the groups or ``opt.max_grad_norm = v``; every group must
            hold the same values (one norm clips them all).
        nonfinite (str): what a step does with an inf or NaN gradient: ``"propagate"`` (default,
            torch.optim's behaviour), ``"skip"`` (skip the whole update on the device, no host
            sync: parameters, state and step counters stay as they were; ``step_skipped`` says
            whether it happened) or ``"raise"`` (the same, then FloatingPointError; this one
            syncs). Under a GradScaler, the scaler's own skip applies instead.
        backend (str, optional): {backend_doc}
        norm_group (ProcessGroup or "world", optional): declares that the parameters are
            disjoint shards across this group (ZeRO's partitions, FSDP1's flat shards), so the
            clip's norm is summed over it with one all-reduce per step; "world" is the default
            group and, unlike a ProcessGroup, can be pickled (ZeroRedundancyOptimizer keeps its
            keywords in its state_dict). DTensor parameters (FSDP2, HSDP, tensor parallel) need
            none: their placements say it.{memory_doc}

    Differences from {reference}:
{differences}
    """


def _duplicate_message(name, where, first, second, p) -> str:
    return (f"fusedopt.{name}: {where} lists one parameter twice (positions {first} and {second}, "
            f"shape {tuple(p.shape)}); torch.optim warns and steps it twice, which one fused "
            "launch cannot do: list each parameter once")


def _storage_key(g: torch.Tensor):
    """What identifies a gradient's memory: its address (the object for an empty tensor or a
    wrapper subclass without storage, whose data_ptr() is 0). A DTensor's is its local shard's:
    FSDP2's gradient DTensors report the shard's byte offset in its block's buffer as data_ptr(),
    the same number for the same parameter of two identical blocks."""
    g = local(g)
    try:
        return g.data_ptr() or id(g)
    except RuntimeError:  # no storage (some subclasses)
        return id(g)


class ClippedStep:
    """Mixed in before a torch.optim class: clip settings, input checks and ``step``.

    Subclasses call ``_init_clip`` before the torch constructor and ``_after_torch_init`` after it,
    and implement ``_update_(group, params, grads, grad_scale, device, found_inf)`` for one
    (device, dtype) group of one param group: ``grads`` are local and value-clamped,
    ``grad_scale`` (0-dim or None) divides them (the clip and AMP's unscale) and is written back,
    ``found_inf`` (0-dim 0/1 or None) skips the update on the device. Elementwise optimizers get
    all of it, and the Triton rows and launch, from fusedopt/_elementwise.ElementwiseStep.
    """

    def _init_clip(self, max_grad_norm, norm_type, max_grad_value, nonfinite, backend,
                   norm_group=None) -> None:
        asked = dict(max_grad_norm=max_grad_norm, norm_type=norm_type, max_grad_value=max_grad_value)
        asked = {k: _clip.check_setting(k, v) for k, v in asked.items()}
        # the settings that differ from their defaults: every param group gets them (add_param_group)
        self._clip_defaults = {k: v for k, v in asked.items() if v != _clip.CLIP_DEFAULTS[k]}
        self._clip = _clip.ClipSettings(*asked.values())  # this step's, read by the step's passes
        self.nonfinite = _nonfinite.check_policy(nonfinite)
        self.backend = check_backend(backend)
        self.norm_group = check_norm_group(norm_group)
        self.grad_norm: torch.Tensor | None = None
        self.step_skipped: torch.Tensor | None = None

    # What the last step ran (fusedopt/_report.StepReport: backend, tensors in the kernels and on
    # the torch path, and why); None before the first step. ``backend`` is what was asked.
    last_step: StepReport | None = None

    # GradScaler.step hands this step grad_scale and found_inf instead of unscaling the grads
    # itself and syncing to decide whether to call step (nonfinite.StepGuard.for_step). A class
    # attribute, so that it survives pickling (torch sets it per instance, for fused=True only).
    _step_supports_amp_scaling = True

    def _after_torch_init(self) -> None:
        # fail at construction, not at the first step; meta params (deferred initialisation) are
        # decided at step(), once they are materialized
        params = [p for g in self.param_groups for p in g["params"]]
        choose_backend(self.backend, {p.device for p in params if p.device.type != "meta"},
                       self._kernel_obstacle(params))
        self._track_state()

    # Why this optimizer has no Triton path (a sentence), or None: its step then always takes
    # the torch path, and backend="triton" is refused with this reason.
    _NO_KERNELS: str | None = None

    def _kernel_obstacle(self, params) -> str | None:
        return self._NO_KERNELS or first_subclass(params)

    def _track_state(self) -> None:
        """opt.state as a TrackedState (fusedopt/_state.py), which the Triton path's plan trusts;
        any change to it drops the plan at once (and with it the plan's hold on old tensors)."""
        self.state = tracked_copy(self.state)
        self.state.listener = self._drop_plan

    def _drop_plan(self) -> None:
        self.__dict__.pop("_step_plan", None)

    max_grad_norm = _clip_property("max_grad_norm")
    norm_type = _clip_property("norm_type")
    max_grad_value = _clip_property("max_grad_value")

    # -- input checks ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        name = type(self).__name__
        for key in _CLIP_ATTRS:  # torch fills the new group's missing keys from defaults
            if key in self._clip_defaults:
                self.defaults[key] = self._clip_defaults[key]
            else:
                self.defaults.pop(key, None)
        if isinstance(param_group, dict) and self.param_groups:
            # a group asking for another clip than the others' is refused now, not at the step
            _clip.settings_of(name, [self.param_groups[0], {**self.defaults, **param_group}])
        differentiable = param_group.get("differentiable", self.defaults.get("differentiable", False))
        if differentiable:
            raise NotImplementedError(
                f"fusedopt.{name} does not support differentiable=True (its step is not "
                f"differentiable through the update); use torch.optim.{name} for that")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch raises its own TypeError for a set
            param_group = dict(param_group, params=list(params))  # a generator is read once
            params = param_group["params"]
        seen = {}
        for i, p in enumerate(params):
            p = p[1] if isinstance(p, tuple) else p  # named parameters: (name, tensor)
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                kind = "complex" if p.is_complex() else "non-floating-point"
                raise TypeError(
                    f"fusedopt.{name}: parameter {i} of the new group (shape {tuple(p.shape)}) has "
                    f"{kind} dtype {p.dtype}; only floating-point parameters are supported")
            if isinstance(p, torch.Tensor):
                self._check_new_param(i, p)
            if id(p) in seen:
                raise ValueError(_duplicate_message(name, "the new group", seen[id(p)], i, p))
            seen[id(p)] = i
        super().add_param_group(param_group)

    def _check_new_param(self, i: int, p: torch.Tensor) -> None:
        """A class's own refusal of parameter ``i`` of a group being added (Muon's 2-D rule,
        DTensors where whole-tensor reductions are needed), before the group is added."""

    def _gather(self) -> list[list[torch.Tensor]]:
        """Per param group, the params that have a grad; every check runs before anything is written.

        The slow path of every step (the torch backend's, and the Triton backend's whenever its
        plan must be rebuilt): the grads' layouts, a param listed twice (torch.optim warns and
        steps it twice; one fused launch cannot: refused) and one grad shared by two params
        (clip and unscale in place would touch it twice, and the fused ops write it back:
        refused). Param dtypes are checked when a group is added.
        """
        name = type(self).__name__
        gathered, seen, grad_owner = [], {}, {}
        for gi, group in enumerate(self.param_groups):
            with_grad = []
            for pi, p in enumerate(group["params"]):
                if id(p) in seen:
                    raise ValueError(_duplicate_message(name, f"group {gi}", seen[id(p)], (gi, pi), p))
                seen[id(p)] = (gi, pi)
                g = p.grad
                if g is None:
                    continue
                if g.layout is not torch.strided:
                    raise RuntimeError(
                        f"fusedopt.{name} does not support sparse gradients (group "
                        f"{gi}, parameter {pi}, shape {tuple(p.shape)}, layout {g.layout}); "
                        "densify with .to_dense() or use torch.optim.SparseAdam")
                key = _storage_key(g)
                if key in grad_owner:
                    (gj, pj) = grad_owner[key]
                    raise ValueError(
                        f"fusedopt.{name}: parameter {pj} of group {gj} and parameter {pi} of group "
                        f"{gi} share one .grad (shape {tuple(g.shape)}, the same memory); the step "
                        "clips and unscales each param's gradient, so each needs its own: assign "
                        "a copy (p.grad = g.clone())")
                grad_owner[key] = (gi, pi)
                with_grad.append(p)
            gathered.append(with_grad)
        return gathered

    # -- the step -------------------------------------------------------------------------------

    # torch.compile(opt.step), or a compiled function that calls it, runs this step eagerly: it is
    # already one norm pass and one update launch per (param group, dtype), and tracing it would
    # bake in the tensor addresses of its cached launch tables. torch._disable_dynamo is
    # torch.compiler.disable importing torch._dynamo at the first step rather than at import (as
    # torch.optim's zero_grad does): importing fusedopt stays free of it and of Triton.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """Value clamp -> global-norm clip -> update, over every param with a grad in every group.

        Returns the closure's loss, as torch.optim does. See the class docstring for ``.grad``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._clip = _clip.settings_of(type(self).__name__, self.param_groups)
        if "_looked_for_frameworks" not in self.__dict__:  # once: is a framework clipping too?
            self._looked_for_frameworks = True
            if self._clip.max_norm is not None or self._clip.max_value is not None:
                from fusedopt.integrations._on_top import warn_if_clipped_on_top
                warn_if_clipped_on_top(self)
        guard = _nonfinite.StepGuard.for_step(self)
        self._nonfinite_where = None
        plan = self.__dict__.get("_step_plan")  # the Triton path's, from an earlier step
        inputs = None if plan is None else plan.inputs(self)
        if inputs is not None:
            self.step_skipped = plan.run(self, inputs, guard)
            self.last_step = plan.report
        else:
            self._step_plan = None
            gathered = self._gather()
            params = [p for ps in gathered for p in ps]
            devices = {p.device for p in params}
            obstacle = self._kernel_obstacle(params) if devices else None
            if devices and choose_backend(self.backend, devices, obstacle) == "triton":
                from fusedopt._triton_step import step_triton
                self.step_skipped = step_triton(self, gathered, guard, next(iter(devices)))
            else:
                self.last_step = StepReport("torch", 0, len(params), (
                    (torch_reason(self.backend, devices, obstacle), len(params)),))
                self.step_skipped = self._step_torch(gathered, guard)
        if guard.policy == "raise" and self.step_skipped is not None and bool(self.step_skipped):
            # the Triton path never writes .grad, so the culprit can be found after the step
            where = self._nonfinite_where
            where = _nonfinite.culprit(self) if not where else where
            if not where and (self.norm_group is not None or any(
                    is_dtensor(p) for g in self.param_groups for p in g["params"])):
                where = " (on another rank: every rank skips when any finds one)"
            _nonfinite.raise_nonfinite(self, where)
        return loss

    def _norm_reduce(self, params: list[torch.Tensor], guard) -> NormReduce | None:
        """This step's collective for the norm and the skip flag (fusedopt/_distributed.py), or
        None when there is nothing to reduce (no clip, no inf/NaN detection: a GradScaler's
        found_inf is already global) or every rank already sees the whole norm (one device, DDP,
        all parameters replicated). Built every step: it also checks DTensor placements, which
        the update on local shards needs whether or not it clips."""
        reduce = NormReduce.build(type(self).__name__, params, self.norm_group)
        return reduce if self._clip.max_norm is not None or guard.detect else None

    def _step_torch(self, gathered: list[list[torch.Tensor]], guard) -> torch.Tensor | None:
        """The torch path: unscale and check .grad in place (under a guard), clamp it in place,
        take the norm (this rank's share and one all-reduce, when sharded), fold the clip into
        the update. Works on local shards of DTensors. Returns the step's skip flag, or None."""
        params = [p for ps in gathered for p in ps]
        grads = [local(p.grad) for p in params]
        reduce = self._norm_reduce(params, guard)
        first = params[0] if params else next(
            (p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else (  # a rank with no param still joins
            group_device(reduce.group) if reduce is not None else torch.device("cpu"))
        skip = _nonfinite.unscale_and_check_(grads, guard, device) if guard.active else None
        if guard.policy == "raise" and bool(skip):
            self._nonfinite_where = _nonfinite.culprit(self)  # before the clamp makes an inf finite
        settings = self._clip
        if settings.max_value is not None:
            _clip.clamp_grads_(grads, settings.max_value)
        clip = None
        clipping = settings.max_norm is not None
        if reduce is not None:
            share = _clip.norm_share([g for g, c in zip(grads, reduce.counted) if c],
                                     settings.norm_type, device) if clipping else None
            share, found = reduce.all_reduce(share, skip if guard.detect else None,
                                             settings.norm_type == float("inf"), device)
            if guard.detect:
                skip = found
            if clipping:
                dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) \
                    else torch.float32
                self.grad_norm = _clip.root_of_share(share, settings.norm_type, dtype)
        elif clipping:
            self.grad_norm = _clip.total_norm(grads, settings.norm_type, device)
        if clipping:
            clip = _clip.ClipScale(self.grad_norm, settings.max_norm)
        self._step_torch_groups(gathered, clip, skip)
        return skip

    def _step_torch_groups(self, gathered, clip, skip, grads=None) -> None:
        """The torch-path update of ``gathered`` (per param group), one call per (device, dtype);
        ``skip`` (a 0-dim 0/1 flag, or None) skips it on the device. ``grads`` (per param group,
        like ``gathered``): the gradients to use, when not the params' own ``.grad``."""
        for gi, (group, group_params) in enumerate(zip(self.param_groups, gathered)):
            group_grads = [local(p.grad) for p in group_params] if grads is None else grads[gi]
            for (device, dtype), idx in group_by_device_dtype(group_params).items():
                ps = pick(group_params, idx)
                gs = pick(group_grads, idx)
                grad_scale = clip.grad_scale_for(gs, device, dtype) if clip is not None else None
                found_inf = None if skip is None else scalar_on(skip, device)
                self._update_(group, ps, gs, grad_scale, device, found_inf)

    # -- state bookkeeping for the Triton backend's cached plan -----------------------------------

    def state_dict(self):
        """torch.optim's, with plain dicts per parameter (torch.load(weights_only=True) takes no
        other class; ours are fusedopt/_state.py's tracked ones). A ProcessGroup in a param group
        (ZeroRedundancyOptimizer copies its ``norm_group=`` keyword into every group) is left out:
        it cannot be pickled, and consolidate_state_dict() pickles this."""
        out = super().state_dict()
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        out["param_groups"] = [{k: v for k, v in g.items() if not is_process_group(v)}
                               for g in out["param_groups"]]
        return out

    def load_state_dict(self, state_dict) -> None:
        """torch's: the saved groups' clip settings win over the constructor's, as their lr does.
        Groups saved without them (a torch.optim checkpoint, or one that did not clip) take this
        optimizer's; so do keys that torch.distributed.checkpoint's partial load
        (``DefaultLoadPlanner(allow_partial_load=True)``) fills with None."""
        super().load_state_dict(state_dict)
        self._fill_clip_settings()
        self._track_state()  # torch's new dicts

    def _fill_clip_settings(self) -> None:
        """Groups without a clip key (or None, where None is not the value) get this optimizer's."""
        for group in self.param_groups:
            for key in _CLIP_ATTRS:
                if group.get(key) is None:
                    if key in self._clip_defaults:
                        group[key] = self._clip_defaults[key]
                    else:
                        group.pop(key, None)

    # -- keep the clip settings through pickle / deepcopy and show them -------------------------

    def __setstate__(self, state):  # unpickle, deepcopy: the state tracked again, listener set
        super().__setstate__(state)
        # a pickle from fusedopt 0.1.0 kept the clip settings as attributes, not in the groups
        old = {k: self.__dict__.pop(k) for k in _CLIP_ATTRS if k in self.__dict__}
        if "_clip_defaults" not in self.__dict__:
            self._clip_defaults = {k: v for k, v in old.items() if v != _clip.CLIP_DEFAULTS[k]}
            self._fill_clip_settings()
        self._clip = _clip.ClipSettings(*(self._clip_defaults.get(k, d)
                                          for k, d in _clip.CLIP_DEFAULTS.items()))
        self._track_state()

    def _own_state(self) -> dict:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in _OWN_ATTRS})
        return state

    def __getstate__(self):  # pickle
        if is_process_group(self.norm_group):
            raise TypeError(
                f"fusedopt.{type(self).__name__} with norm_group=<ProcessGroup> cannot be pickled "
                "(a process group is a live connection): pickle state_dict() instead, or pass "
                "norm_group=\"world\", which names the default group")
        return self._own_state()

    def __deepcopy__(self, memo):
        """A copy that shares the process group (a connection, not a value), else as pickling."""
        if self.norm_group is not None:
            memo[id(self.norm_group)] = self.norm_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._own_state(), memo))
        return new

    def __repr__(self) -> str:
        try:
            clip = _clip.settings_of(type(self).__name__, self.param_groups)
            shown = [f"{k}={v!r}" for k, v in zip(_CLIP_ATTRS, clip)]
        except (ValueError, TypeError) as e:  # groups that differ, a bad value written in
            shown = [f"clip settings refused ({e})"]
        shown += [f"{k}={getattr(self, k)!r}" for k in _OWN_ATTRS[:3]
                  if k != "norm_group" or self.norm_group is not None]
        settings = ", ".join(shown)
        ran = "none yet" if self.last_step is None else str(self.last_step)
        return f"fusedopt.{super().__repr__()[:-1]}{settings}\nlast step: {ran}\n)"
