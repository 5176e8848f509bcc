"""SGD: the class and its torch path. Math: rules.sgd_rule; kernel: the shared update
(kernels/update.py)."""
import torch
from torch.optim.sgd import sgd as torch_sgd  # the functional SGD behind torch.optim.SGD

from fusedopt._distributed import local, wrap_like
from fusedopt._elementwise import ElementwiseStep, small_cpu_op
from fusedopt._grouping import pick
from fusedopt.nonfinite import keep_where
from fusedopt.optimizer import (class_doc, compute_dtype, host_float, scalar_on,
                                split_for_fused_op)
from fusedopt.rules import sgd_rule


# torch 2.13's torch._fused_sgd_ on CPU is wrong for bf16 and fp16 tensors of 16 elements or more
# (its vectorized path): after one plain step (lr 0.1, no momentum) 86 of 100 bf16 elements were
# off by more than 0.02, up to 0.75 after two steps, against the for-loop SGD. Those take torch's
# foreach SGD instead (sgd_foreach_).
_CPU_FUSED_BROKEN = (torch.bfloat16, torch.float16)


def sgd_torch_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
               maximize, grad_scale=None, found_inf=None):
    """One SGD step over tensors of one (device, dtype): torch._fused_sgd_ where it is right
    (optimizer.split_for_fused_op), rules.sgd_rule for the rest.

    ``momentum_buffers[i]`` is None where a param has no buffer yet (its first step with momentum):
    those take torch's first-step rule (buf = g) and their new buffers are written into the list
    (an empty list without momentum). ``grad_scale`` divides every gradient, which is written back.
    ``found_inf`` (0-dim fp32, 0 or 1) skips the step on the device. A buffer made on a skipped
    first step is zero-filled (torch's fused SGD leaves it uninitialized), so the next step's
    ``b = mu * 0 + (1 - dampening) * g`` is torch's ``b = g`` unless dampening is set.
    """
    bufs = momentum_buffers if momentum != 0 else [None] * len(params)
    device = params[0].device
    if (device.type == "cpu" and params[0].dtype in _CPU_FUSED_BROKEN) or device.type == "meta":
        # meta (deferred initialisation: shapes only): torch 2.13's _fused_sgd_ has no meta kernel
        return sgd_foreach_(params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
                            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                            grad_scale=grad_scale, found_inf=found_inf)
    fused, rest = split_for_fused_op(params, grads, bufs)
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
    for i in rest:
        bufs[i] = sgd_rule_(params[i], grads[i], bufs[i], **hyper)
    if momentum == 0:
        if fused:
            with small_cpu_op(pick(params, fused)):
                torch._fused_sgd_(pick(params, fused), pick(grads, fused), [],
                                  is_first_step=False, **hyper)
        return
    new = [i for i in fused if bufs[i] is None]
    old = [i for i in fused if bufs[i] is not None]
    for i in new:
        bufs[i] = (torch.empty_like if found_inf is None else torch.zeros_like)(grads[i])
    for idx, first in ((old, False), (new, True)):
        if idx:
            with small_cpu_op(pick(params, idx)):
                torch._fused_sgd_(pick(params, idx), pick(grads, idx), pick(bufs, idx),
                                  is_first_step=first, **hyper)


def sgd_foreach_(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov,
                 maximize, grad_scale=None, found_inf=None):
    """torch.optim's own foreach SGD (torch.optim.sgd.sgd), for bf16/fp16 on CPU: the same numbers
    as torch.optim.SGD(foreach=True), at 10x the speed of the fp32 rule there (per-tensor fp32
    copies took 2.3 s on GPT-2 in bf16). Takes any layout. The clip divides .grad first. Also for
    meta params (shapes only), which torch's _fused_sgd_ has no kernel for.

    CPU (or meta) only, so ``found_inf`` is read on the host: there is no device to wait for
    (torch's fused CPU ops read it so too). Keeping the old values by copy instead made a bf16 GPT-2 AMP step
    4.8x slower (674 vs 140 ms). A skipped first step leaves zero buffers, as in sgd_torch_."""
    if found_inf is not None and bool(found_inf):
        for i, g in enumerate(grads):
            if momentum != 0 and bufs[i] is None:
                bufs[i] = torch.zeros_like(g)
        return
    if grad_scale is not None:
        torch._foreach_div_(grads, grad_scale)
    torch_sgd(params, grads, bufs, foreach=True, weight_decay=weight_decay, momentum=momentum,
              lr=host_float(lr), dampening=dampening, nesterov=nesterov, maximize=maximize)


def sgd_rule_(p, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
              grad_scale=None, found_inf=None):
    """One tensor through rules.sgd_rule in fp32 (fp64 for fp64), any layout: the fused op's
    contract (g divided by grad_scale and written back; ``found_inf`` keeps the old values, a new
    buffer zero). Returns the buffer (new on a first step)."""
    acc = compute_dtype(p.dtype)
    g_acc = g.to(acc)
    if grad_scale is not None:
        g_acc = g_acc / grad_scale
        g.copy_(g_acc)
    first = momentum != 0 and buf is None
    new_p, new_buf, _, _ = sgd_rule(p.to(acc), g_acc, 0.0 if buf is None else buf.to(acc), 0.0,
                                    0.0, 0.0, 0.0, 0.0, 0.0, int(first), lr, momentum,
                                    1.0 - dampening, weight_decay, 0.0, 0.0, 0.0, 0.0, 0.0,
                                    momentum != 0, nesterov, maximize)
    p.copy_(keep_where(found_inf, p, new_p))
    if momentum == 0:
        return None
    if first:
        return keep_where(found_inf, torch.zeros_like(new_buf), new_buf).to(p.dtype)
    buf.copy_(keep_where(found_inf, buf, new_buf))
    return buf


class SGD(ElementwiseStep, torch.optim.SGD):
    __doc__ = class_doc(
        "SGD with momentum (optionally Nesterov), as ``torch.optim.SGD``, with clipping in ``step``.",
        """\
        g <- -g                                         if maximize
        g <- g + weight_decay * p
        b <- g                                          if momentum != 0, on p's first step
        b <- momentum * b + (1 - dampening) * g         if momentum != 0, on later steps
        d = g + momentum * b                            if momentum != 0 and nesterov
        d = b                                           if momentum != 0, not nesterov
        d = g                                           if momentum = 0 (dampening unused)
        p <- p - lr * d""",
        """        params, lr (default 1e-3), momentum (0), dampening (0), weight_decay (0), nesterov (False),
        maximize, foreach, differentiable, fused: as ``torch.optim.SGD``, with the same defaults
            and the same errors for bad values. ``foreach`` and ``fused`` change nothing here;
            ``differentiable=True`` raises NotImplementedError. The EMA form of momentum,
            ``b = beta * b + (1 - beta) * g``, is ``momentum=beta, dampening=beta`` (torch's first
            step still sets ``b = g``).""",
        "SGD")

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None, stochastic_rounding=False, master_weights=False,
                 state_dtype=None, rounding_seed=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        self._init_memory(stochastic_rounding, master_weights, state_dtype, rounding_seed)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._after_torch_init()

    # the declaration (fusedopt/_elementwise.py); its torch path is _update_ below
    _RULE = "sgd_rule"
    _STATE = ("momentum_buffer", None, None)
    _HAS_STEP = False

    def _columns(self, group):
        return int(group["momentum"] != 0)

    def _flags(self, group):
        return group["momentum"] != 0, group["nesterov"], group["maximize"]

    def _hyper(self, group):
        return group["momentum"], 1.0 - group["dampening"], host_float(group["weight_decay"])

    def _init_state(self, group, p, state):
        """torch makes SGD's buffer at the first step, from the gradient (``_first_step``)."""

    def _first_step(self, group, p, state):
        """1 on p's first step with momentum: its buffer made here, uninitialised, in the state
        dtype, flagged so that the rule sets b = g."""
        if group["momentum"] == 0 or state.get("momentum_buffer") is not None:
            return 0  # None: what torch <= 2.0 saved before a first step
        dtype = self._memory(group, p.dtype)[0]
        state["momentum_buffer"] = torch.empty_like(p, dtype=dtype,
                                                    memory_format=torch.preserve_format)
        return 1

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        if self._lean(group, params[0].dtype):
            return self._update_rule_(group, params, grads, grad_scale, device, found_inf)
        momentum = group["momentum"]
        kept = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        buffers = list(map(local, kept))  # DTensors step on local shards (fusedopt/_distributed.py)
        sgd_torch_(list(map(local, params)), grads, buffers, lr=scalar_on(group["lr"], device),
                   momentum=momentum, dampening=group["dampening"],
                   weight_decay=host_float(group["weight_decay"]), nesterov=group["nesterov"],
                   maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf)
        for p, old, buf in zip(params, kept, buffers):
            if old is None:  # a new buffer: a DTensor like p when p is one
                self.state[p]["momentum_buffer"] = wrap_like(p, buf)
