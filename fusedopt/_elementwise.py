"""What turns a rule of fusedopt/rules.py into an optimizer on both backends.

A class declares, as class attributes and three small methods:

- ``_RULE`` / ``_STEP_RULE``: the names of its rule and step rule in rules.py (``_STEP_RULE``
  None when no scalar depends on the step count);
- ``_STATE``: torch's state keys of the rule's columns s0, s1, s2 (None where unused),
  ``_HAS_STEP``: whether it keeps torch's ``state["step"]`` counter, and ``_SCALAR_STATE``: the
  key of a per-tensor fp32 scalar state the step rule carries (NAdam's ``mu_product``), if any;
- ``_hyper(group)``: h0..h7 as host floats (float64; ``1 - beta`` and ``ln(beta)`` formed here),
  ``_flags(group)``: F0..F2, ``_columns(group)``: which state columns this group uses (bits);
- ``_init_state(group, p, state)``: torch's state for a param's first step.

``ElementwiseStep`` then gives it the Triton rows and launch (kernels/update.py) and a torch path
(``rule_torch_``: the same rule, one tensor or 2**18-element piece at a time, in fp32 or fp64).
SGD and Adam keep torch's fused ops on their torch path (optim/adam.py, optim/sgd.py), CPU
Adagrad torch's fused Adagrad, and fp32/fp64 CPU steps of RMSprop, NAdam, RAdam and Adamax that
cannot skip torch.optim's own code (``_torch_step``), where those are faster.

Adding an elementwise optimizer: its rule (and step rule) in rules.py, its class with the
declaration above, its tests. Nothing here or in kernels/ changes.
"""
import math

import torch

from fusedopt._distributed import local
from fusedopt.nonfinite import keep_where
from fusedopt.optimizer import ClippedStep, compute_dtype, kernel_lr, scalar_on
from fusedopt import rules

N_HYPER = 8


def ln(beta: float) -> float:
    """ln(beta) in float64 for rules.one_minus_pow; beta = 0 (torch allows it) gives -inf, so
    beta ** t = 0."""
    return math.log(beta) if beta > 0 else -math.inf


def _pad(values, n, fill):
    values = tuple(values)
    if len(values) > n:
        raise AssertionError(f"{len(values)} values where the rules take {n}")
    return values + (fill,) * (n - len(values))


class ElementwiseStep(ClippedStep):
    """The Triton rows and launch, and the torch path, of a rule-declared optimizer (module
    docstring)."""

    _RULE: str
    _STEP_RULE: str | None = None
    _STATE: tuple = (None, None, None)
    _HAS_STEP = True
    _SCALAR_STATE: str | None = None  # torch's key of a per-tensor fp32 scalar state (NAdam)

    # -- declaration defaults ----------------------------------------------------------------------

    def _columns(self, group) -> int:
        """Bits of the state columns this group's rule reads and writes (default: all declared)."""
        return sum(1 << i for i, key in enumerate(self._STATE) if key is not None)

    def _flags(self, group) -> tuple:
        return (group["maximize"],)

    # -- state ---------------------------------------------------------------------------------------

    def _state_for(self, group, p):
        """p's state, made as torch makes it on a first step (``_init_state``); a step counter
        moved to p's device as fp32, where the kernels and the torch path read it (a torch.optim
        state_dict keeps it on the CPU)."""
        state = self.state[p]
        columns = self._columns(group)
        if not state or any(columns >> i & 1 and key not in state
                            for i, key in enumerate(self._STATE)):
            self._init_state(group, p, state)
        if self._HAS_STEP:
            step = state["step"]
            if step.device != p.device or step.dtype != torch.float32:
                state["step"] = step.to(device=p.device, dtype=torch.float32)
        return state

    def _state_tensors(self, group, state, p):
        """[s0, s1, s2] of one param (None where unused)."""
        columns = self._columns(group)
        return [state[key] if columns >> i & 1 else None for i, key in enumerate(self._STATE)]

    # -- the Triton backend: rows and launch (fusedopt/_triton_step.py) --------------------------------

    def _row_flags(self, group):
        return self._flags(group), self._columns(group)

    def _kernel_row(self, group, p):
        """(element tensors p, s0, s1, s2; scalar tensors [step]; ints [first]) of p's row
        (kernels/update.py): p's address stands in for unused columns (never read)."""
        state = self._state_for(group, p)
        tensors = [p] + [p if s is None else s for s in self._state_tensors(group, state, p)]
        scalars = [state["step"]] if self._HAS_STEP else []
        if self._SCALAR_STATE is not None:
            scalars.append(state[self._SCALAR_STATE])
        return tensors, scalars, [0]

    def _spec(self, group):
        return (self._RULE, self._STEP_RULE, self._columns(group),
                _pad(self._flags(group), 3, False), self._HAS_STEP, self._SCALAR_STATE is not None)

    def _launch_update_(self, group, table, clip, grid, num_warps):
        from fusedopt.kernels.update import update_
        update_(table, clip, self._spec(group), hyper_buffer(table, self._hyper(group)),
                kernel_lr(group["lr"], table.device), grid, num_warps)

    # -- the torch path ------------------------------------------------------------------------------

    # torch's own step for an fp32/fp64 CPU group that cannot skip (no GradScaler, nonfinite
    # "propagate"): ``_torch_step(group, params, grads, states)`` calling torch.optim's
    # functional code, or None. The rule one piece at a time was 0.6-0.73x torch's best recipe
    # on GPT-2 small's shapes (2-core EPYC, fp32): its operators make more passes than torch's
    # in-place ones. A step that may skip keeps the rule path, which skips on the device without
    # a host read; bf16/fp16 keep it too: it computes in fp32 as the kernels do, where torch's
    # for-loop computes in the param dtype (fp16 NAdam's went to NaN within two steps).
    _torch_step = None

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        states = [self._state_for(group, p) for p in params]
        if device.type == "cpu" and found_inf is None and self._torch_step is not None \
                and params and params[0].dtype in (torch.float32, torch.float64):
            if grad_scale is not None:  # the clip, written back as the fused ops write it
                torch._foreach_div_(grads, grad_scale)
            self._torch_step(group, list(map(local, params)), grads,
                             [{k: local(v) for k, v in st.items()} for st in states])
            return
        rule_torch_(self, group, list(map(local, params)), grads,
                    [[None if s is None else local(s) for s in self._state_tensors(group, st, p)]
                     for st, p in zip(states, params)],
                    [st["step"] for st in states] if self._HAS_STEP else None,
                    [0] * len(params), scalar_on(group["lr"], device), grad_scale, found_inf,
                    [st[self._SCALAR_STATE] for st in states] if self._SCALAR_STATE else None)


def hyper_buffer(table, values) -> torch.Tensor:
    """The param group's h0..h7 as a float64 tensor on the table's device, copied there only
    when a value changed since the last step (a scheduler moving betas or weight decay). The
    copy goes into the same buffer, so a CUDA graph captured earlier reads the new values at its
    next replay; a change during capture is refused (_multi_tensor.CAPTURE_ERROR)."""
    key = _pad((float(v) for v in values), N_HYPER, 0.0)
    cached = getattr(table, "hyper", None)
    if cached is None or cached[0] != key:
        from fusedopt._multi_tensor import to_device
        fresh = to_device(torch.tensor(key, dtype=torch.float64), table.device)
        if cached is None:
            table.hyper = (key, fresh)
        else:
            cached[1].copy_(fresh)
            table.hyper = (key, cached[1])
    return table.hyper[1]


# Elements per piece of a large tensor on the torch path: the rule runs operator by operator,
# each making a temporary of the piece's size, so pieces of 2**16 fp32 elements (256 KB) keep
# them in cache. Whole tensors made temporaries of up to 150 MB (GPT-2's embedding), which
# glibc maps fresh every step: RMSprop took 2835 ms a step on GPT-2 small's shapes (2-core EPYC,
# 716k page faults on the embedding alone) where torch's foreach took 296.
CHUNK = 1 << 18


def _pieces(tensors):
    """The tensors (None kept) cut into matching flat pieces of CHUNK elements when all are
    contiguous; else whole, once."""
    live = [t for t in tensors if t is not None]
    n = live[0].numel()
    if n <= CHUNK or not all(t.is_contiguous() for t in live):
        yield tensors
        return
    flat = [None if t is None else t.view(-1) for t in tensors]
    for start in range(0, n, CHUNK):
        yield [None if t is None else t[start:start + CHUNK] for t in flat]


def rule_torch_(opt, group, params, grads, columns, steps, firsts, lr, grad_scale=None,
                found_inf=None, scalar_states=None):
    """One step of ``opt``'s rule over tensors of one (device, dtype), one tensor (or CHUNK-sized
    piece of one) at a time, in fp32 (fp64 for fp64), any layout, with the fused ops' contract:
    each grad is divided by ``grad_scale`` and written back; ``found_inf`` (0-dim fp32, 0 or 1)
    keeps every old value, step counters included, on the device. ``columns[i]``: [s0, s1, s2]
    of param i (None where unused), updated in place; ``steps``: fp32 0-dim counters (None
    without), advanced here; ``scalar_states``: the fp32 0-dim scalar states (None without), set
    to the step rule's c3. No host read: the step scalars are formed on the device from the
    counter, in float64."""
    rule = getattr(rules, opt._RULE)
    step_rule = getattr(rules, opt._STEP_RULE) if opt._STEP_RULE else None
    hyper = _pad(map(float, opt._hyper(group)), N_HYPER, 0.0)
    flags = _pad(opt._flags(group), 3, False)
    lr64 = lr.double() if isinstance(lr, torch.Tensor) else float(lr)
    for i, (param, grad) in enumerate(zip(params, grads)):
        acc = compute_dtype(param.dtype)
        c = (0.0,) * 4
        if steps is not None:
            step = steps[i]
            if step_rule is not None:
                x = scalar_states[i].double() if scalar_states is not None else 0.0
                c = step_rule((step + 1).double(), x, lr64, *hyper)
                if scalar_states is not None:
                    scalar_states[i].copy_(keep_where(found_inf, scalar_states[i], c[3]))
                c = tuple(x.to(acc) if isinstance(x, torch.Tensor) else x for x in c)
            step.add_(1.0 if found_inf is None else 1.0 - found_inf)
        for p, g, *old in _pieces([param, grad, *columns[i]]):
            g_acc = g.to(acc)
            if grad_scale is not None:
                g_acc = g_acc / grad_scale
                g.copy_(g_acc)
            values = [0.0 if s is None else s.to(acc) for s in old]
            new_p, *new = rule(p.to(acc), g_acc, *values, *c, firsts[i], lr, *hyper, *flags)
            for s, v in zip(old, new):
                if s is not None:
                    s.copy_(keep_where(found_inf, s, v))
            p.copy_(keep_where(found_inf, p, new_p))


def fused_counted_(op, tensors, steps, found_inf, **kwargs):
    """``op(*tensors, steps, found_inf=found_inf, **kwargs)``: one of torch's fused optimizer ops
    (Adam, AdamW, Adagrad), which read their step counters already advanced. A skipped step
    takes them back, on the device (torch's fused Adam does the same under GradScaler)."""
    torch._foreach_add_(steps, 1)
    op(*tensors, steps, found_inf=found_inf, **kwargs)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def new_state_like(p, fill=0.0):
    """A state tensor for p as torch.optim makes it (p's layout; a DTensor like p when p is one)."""
    return torch.full_like(p, fill, memory_format=torch.preserve_format)


def new_step(p) -> torch.Tensor:
    """torch's step counter, fp32 on p's device (torch keeps it on the CPU unless fused or
    capturable; fusedopt keeps it where the kernels and the torch path read it, and a
    torch.optim state_dict loads either way)."""
    return torch.zeros((), dtype=torch.float32, device=p.device)

