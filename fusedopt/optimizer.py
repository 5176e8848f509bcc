"""Shared base of fusedopt's optimizers: the clip settings, the checks on every input, and step().

Each class (sgd.py, adam.py) subclasses its torch.optim namesake through ``ClippedStep``, so the
constructor validation, defaults, state_dict and load_state_dict are torch's own; ``step`` is ours:
gather the (param, grad) pairs of every group, value-clamp, take the global norm, then hand each
(device, dtype) group to the class's ``_update_`` with the clip folded in.
"""
import torch

from fusedopt import clip as _clip
from fusedopt._dispatch import check_backend, choose_backend
from fusedopt._grouping import group_by_device_dtype, pick

# Instance attributes that torch.optim.Optimizer.__getstate__ would drop (pickle, deepcopy).
_OWN_ATTRS = ("max_grad_norm", "norm_type", "max_grad_value", "backend", "grad_norm")


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


def class_doc(summary: str, update_math: str, args: str, name: str, state_note: str = "") -> str:
    """A class docstring: summary, the math block (clip lines first), Args, differences from torch."""
    return rf"""{summary}

    .. math::
        \begin{{aligned}}
            & g \leftarrow \mathrm{{clamp}}(\nabla f, -v, v)
                \hspace{{5mm}} \text{{(if max\_grad\_value }} v \text{{)}} \\
            & g \leftarrow g \cdot \min\!\big(1, n / (\lVert g \rVert + 10^{{-6}})\big)
                \hspace{{5mm}} \text{{(if max\_grad\_norm }} n \text{{, norm over all groups)}} \\
{update_math}
        \end{{aligned}}

    Args:
{args}
        max_grad_norm (float, optional): clip the total norm of all gradients to this, as
            ``clip_grad_norm_``. ``float('inf')`` computes ``grad_norm`` and never clips.
        norm_type (float): 2.0 (default) or ``float('inf')``.
        max_grad_value (float, optional): clamp every gradient element to ``[-v, v]`` first, as
            ``clip_grad_value_``.
        backend (str, optional): ``"torch"``, ``"triton"`` or None: Triton for parameters on one
            CUDA device when triton imports, else torch (fusedopt/_dispatch.py).

    Differences from torch.optim.{name}:
        clipping happens inside ``step``, over every param with a grad in every group, and
        ``grad_norm`` holds the pre-clip total norm (a 0-dim tensor on the params' device, None
        until a step with ``max_grad_norm`` set).{state_note} The Triton backend never writes
        ``.grad``: after ``step`` it holds the unclipped gradient. The torch backend leaves the
        clipped gradient there, as ``clip_grad_value_``/``clip_grad_norm_`` do.
    """


class ClippedStep:
    """Mixed in before a torch.optim class: clip settings, input checks and ``step``.

    Subclasses call ``_init_clip`` before the torch constructor and ``_after_torch_init`` after it,
    and implement ``_update_(group, params, grads, clip, device, dtype)`` for one (device, dtype)
    group of one param group.
    """

    def _init_clip(self, max_grad_norm, norm_type, max_grad_value, backend) -> None:
        self.max_grad_norm = _clip.check_positive("max_grad_norm", max_grad_norm)
        self.norm_type = _clip.check_norm_type(norm_type)
        self.max_grad_value = _clip.check_positive("max_grad_value", max_grad_value)
        self.backend = check_backend(backend)
        self.grad_norm: torch.Tensor | None = None

    def _after_torch_init(self) -> None:
        # torch sets this for fused=True, and GradScaler would then hand grad_scale/found_inf to
        # step(), which this step does not take yet: GradScaler must unscale_ and check infs itself.
        self._step_supports_amp_scaling = False
        devices = {p.device for g in self.param_groups for p in g["params"]}
        choose_backend(self.backend, devices)  # fail at construction, not at the first step

    # -- input checks ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        name = type(self).__name__
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
        for i, p in enumerate(params):
            p = p[1] if isinstance(p, tuple) else p  # named parameters: (name, tensor)
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                kind = "complex" if p.is_complex() else "non-floating-point"
                raise TypeError(
                    f"fusedopt.{name}: parameter {i} of the new group (shape {tuple(p.shape)}) has "
                    f"{kind} dtype {p.dtype}; only floating-point parameters are supported")
        super().add_param_group(param_group)

    def _gather(self) -> list[list[torch.Tensor]]:
        """Per param group, the params that have a grad; every check runs before anything is written.

        Per-param work here is paid every step (about 0.3 us a param on the 2-core CI machine), so
        it checks only what can change between steps: the grad's layout. Param dtypes are checked
        when a group is added.
        """
        gathered = []
        for gi, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.layout is not torch.strided:
                    pi = next(i for i, q in enumerate(group["params"]) if q is p)
                    raise RuntimeError(
                        f"fusedopt.{type(self).__name__} does not support sparse gradients (group "
                        f"{gi}, parameter {pi}, shape {tuple(p.shape)}, layout {p.grad.layout}); "
                        "densify with .to_dense() or use torch.optim.SparseAdam")
            gathered.append(with_grad)
        return gathered

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Value clamp -> global-norm clip -> update, over every param with a grad in every group.

        Returns the closure's loss, as torch.optim does. See the class docstring for ``.grad``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = self._gather()
        params = [p for ps in gathered for p in ps]
        if params and choose_backend(self.backend, {p.device for p in params}) == "triton":
            from fusedopt._triton_step import step_triton
            step_triton(self, gathered)
        else:
            self._step_torch(gathered)
        return loss

    def _step_torch(self, gathered: list[list[torch.Tensor]]) -> None:
        """The torch path: clamp .grad in place, take the norm, fold the clip into the update."""
        params = [p for ps in gathered for p in ps]
        grads = [p.grad for p in params]
        if self.max_grad_value is not None:
            _clip.clamp_grads_(grads, self.max_grad_value)
        clip = None
        if self.max_grad_norm is not None:
            first = params[0] if params else next(
                (p for g in self.param_groups for p in g["params"]), torch.empty(0))
            self.grad_norm = _clip.total_norm(grads, self.norm_type, first.device)
            clip = _clip.ClipScale(self.grad_norm, self.max_grad_norm)
        self._step_torch_groups(gathered, clip)

    def _step_torch_groups(self, gathered, clip) -> None:
        """The torch-path update of ``gathered`` (per param group), one call per (device, dtype)."""
        for group, group_params in zip(self.param_groups, gathered):
            for (device, dtype), idx in group_by_device_dtype(group_params).items():
                ps = pick(group_params, idx)
                gs = [p.grad for p in ps]
                grad_scale = clip.grad_scale_for(gs, device, dtype) if clip is not None else None
                self._update_(group, ps, gs, grad_scale, device)

    # -- state bookkeeping for the Triton backend's cached tables ---------------------------------

    def _state_changed(self) -> None:
        """State tensors were created or replaced: the Triton tables must be rebuilt."""
        self._state_version = self.__dict__.get("_state_version", 0) + 1

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._state_changed()

    # -- keep the clip settings through pickle / deepcopy and show them -------------------------

    def __getstate__(self):
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in _OWN_ATTRS})
        return state

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in _OWN_ATTRS[:4])
        return f"fusedopt.{super().__repr__()[:-1]}{settings}\n)"
