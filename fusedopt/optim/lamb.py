"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes"), computing what NVIDIA Apex's FusedLAMB computes: the class and its torch path. No
kernel twin yet: the class docstring gives the design a Triton version would take.

The reference is Apex's apex/optimizers/fused_lamb.py (FusedLAMB.step) and
csrc/multi_tensor_lamb.cu (multi_tensor_lamb_cuda, LAMBStage1Functor, LAMBStage2Functor).
"""
import torch

from fusedopt import clip as _clip
from fusedopt._distributed import is_dtensor, local
from fusedopt._elementwise import new_state_like, new_step
from fusedopt.optimizer import ClippedStep, class_doc, compute_dtype, host_float, scalar_on


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's L2 norm, 0-dim, in order (clip.group_norms: large fp32 CPU tensors summed in
    fp64; torch's CPU _foreach_norm was 2.7e-3 off on 38.6M elements and 7.8e-5 on 4M, and a
    trust ratio carries that error whole)."""
    return _clip.group_norms(tensors, 2.0, tensors[0].dtype)


def _as(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``tensors`` in ``dtype``: the tensors themselves, or fp32 copies of bf16/fp16 ones."""
    if tensors[0].dtype == dtype:
        return tensors
    out = [torch.empty_like(t, dtype=dtype) for t in tensors]  # the same strides
    torch._foreach_copy_(out, tensors)
    return out


def lamb_torch_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
                grad_scale=None, found_inf=None) -> None:
    """One LAMB step, as Apex's multi_tensor_lamb_cuda, over plain tensors of one (device, dtype).

    ``grads`` are already value-clamped; ``grad_scale`` (0-dim fp32, or None) divides each of
    them (the clip) and the quotient is written back into them. ``steps`` are fp32 0-dim
    counters on the device, advanced here. ``found_inf`` (0-dim fp32 0/1, or None) keeps every
    old value, counters included, on the device. Math in fp32 (fp64 for fp64); no host read:
    the per-tensor scalars (bias corrections, trust ratios) are vectors on the device.

    A skip is exact and in place: the (clipped) gradient is zeroed where it would enter the
    moments, and the moment weights and the step size are multiplied by 0, so m + 0 * (0 - m),
    1 * v + 0 and p + 0 * u give the old values bit for bit. (Selecting old values afterwards
    would need a copy of p, m and v each step and one torch.where per tensor; a multiply by 0
    alone keeps the NaN of an inf gradient.) Memory: one scratch list like the params (the
    denominator, then u), which is the gradient's copy when there is one.
    """
    n = len(params)
    acc = compute_dtype(params[0].dtype)
    g = _as(grads, acc)
    if grad_scale is not None:  # the clip, written back: the torch path leaves the clipped grad
        torch._foreach_div_(g, grad_scale)
        if g is not grads:
            torch._foreach_copy_(grads, g)
    p, m, v = _as(params, acc), _as(exp_avgs, acc), _as(exp_avg_sqs, acc)

    # per-tensor scalars from the counters (each param has its own: one may miss a grad)
    t = torch.stack(steps) + 1.0
    torch._foreach_add_(steps, 1.0)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * n)
    if bias_correction:  # 1 - beta ** t in float64, as Apex forms it on the host
        bc1 = 1.0 - torch.pow(beta1, t.double())
        bc2 = 1.0 - torch.pow(beta2, t.double())
        # (m / bc1) / (sqrt(v / bc2) + eps) = m / (sqrt(v * bc1^2 / bc2) + eps * bc1)
        v_scale = list((bc1 * bc1 / bc2).to(acc).unbind())
        eps_t = list((eps * bc1).to(acc).unbind())

    # the gradient that enters the moments: L2 mode adds the decay (not into .grad)
    if not adam_w_mode and weight_decay != 0:
        if g is grads:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        else:
            torch._foreach_add_(g, p, alpha=weight_decay)
    if found_inf is not None:  # zeroed on a skipped step (it holds the inf)
        flag = found_inf.to(t.device) != 0
        if g is grads:
            g = [torch.where(flag, 0.0, x) for x in g]
        else:
            for x in g:
                x.masked_fill_(flag, 0.0)
        keep = 1.0 - found_inf.to(device=t.device, dtype=acc)  # 0 on a skipped step

    # moments: m = beta1 * m + beta3 * g, v = beta2 * v + (1 - beta2) * g^2
    if grad_averaging:  # beta3 = 1 - beta1
        torch._foreach_lerp_(m, g, (1.0 - beta1) if found_inf is None
                             else [keep * (1.0 - beta1)] * n)
    else:  # beta3 = 1
        torch._foreach_mul_(m, beta1 if found_inf is None else 1.0 - keep * (1.0 - beta1))
        torch._foreach_add_(m, g)
    torch._foreach_mul_(v, beta2 if found_inf is None else 1.0 - keep * (1.0 - beta2))
    torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)

    # u = m_hat / (sqrt(v_hat) + eps) (+ weight_decay * p in adam_w_mode), in one scratch list
    if g is grads:
        if bias_correction:
            u = torch._foreach_mul(v, v_scale)
            torch._foreach_sqrt_(u)
        else:
            u = torch._foreach_sqrt(v)
    else:  # the gradient's copy is free now
        u = g
        torch._foreach_copy_(u, v)
        if bias_correction:
            torch._foreach_mul_(u, v_scale)
        torch._foreach_sqrt_(u)
    del g
    torch._foreach_add_(u, eps_t if bias_correction else eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, m)
    if adam_w_mode and weight_decay != 0:
        torch._foreach_add_(u, p, alpha=weight_decay)

    # trust ratio ||p|| / ||u|| per tensor, 1 where either is 0 (Apex's LAMBStage2Functor);
    # only for decayed params unless use_nvlamb
    if use_nvlamb or weight_decay != 0:
        p_norm = torch.stack(_norms(p))
        u_norm = torch.stack(_norms(u))
        ratio = torch.where((p_norm != 0) & (u_norm != 0), p_norm / u_norm, 1.0)
    else:
        ratio = torch.ones(n, dtype=acc, device=t.device)
    step_size = lr * ratio if found_inf is None else lr * ratio * keep
    torch._foreach_addcmul_(p, u, list((-step_size).to(acc).unbind()))  # p - (lr * ratio) * u

    for dst, new in ((params, p), (exp_avgs, m), (exp_avg_sqs, v)):
        if new is not dst:  # fp32 copies of bf16/fp16: rounded back
            torch._foreach_copy_(dst, new)


def _check_whole(params, where: str, first: int = 0) -> None:
    """A trust ratio needs each parameter's whole norm; a sharded DTensor holds part of it.
    ``first``: the index of ``params[0]`` in ``where``."""
    for i, p in enumerate(params, first):
        if is_dtensor(p) and not all(pl.is_replicate() for pl in p.placements):
            raise NotImplementedError(
                f"fusedopt.LAMB: parameter {i} of {where} (shape {tuple(p.shape)}) is a DTensor "
                f"with placements {tuple(p.placements)}; LAMB's trust ratio needs each "
                "parameter's whole norm, which the torch path takes on this rank's shard only: "
                "sharded DTensors (FSDP2, tensor parallel) are not supported yet")


_MATH = """\
        g <- g + weight_decay * p                       if not adam_w_mode (L2; .grad unchanged)
        m <- beta1 * m + beta3 * g                      beta3 = 1 - beta1 if grad_averaging, else 1
        v <- beta2 * v + (1 - beta2) * g^2
        c1 = 1 - beta1^t, c2 = 1 - beta2^t              if bias_correction
        c1 = c2 = 1                                     otherwise
        u = (m / c1) / (sqrt(v / c2) + eps)
        u <- u + weight_decay * p                       if adam_w_mode
        r = ||p||_2 / ||u||_2                           if (weight_decay != 0 or use_nvlamb)
                                                        and both norms != 0
        r = 1                                           otherwise
        p <- p - lr * r * u"""

_ARGS = """        params, lr (default 1e-3), bias_correction (True), betas ((0.9, 0.999)),
        eps (1e-6), weight_decay (0.01), amsgrad (False), adam_w_mode (True), grad_averaging (True),
            use_nvlamb (False, keyword-only here): as Apex's FusedLAMB, with its defaults.
            ``adam_w_mode`` False adds ``weight_decay * p`` to the gradient (L2) instead of to the
            update; ``grad_averaging`` False takes beta3 = 1; ``use_nvlamb`` applies the trust
            ratio to parameters without weight decay too. ``amsgrad=True`` raises
            NotImplementedError (a RuntimeError, as Apex raises). ``lr`` may be a Tensor;
            ``adam_w_mode``, ``grad_averaging`` and ``use_nvlamb`` may differ per param group.
            Bad values raise ValueError naming them (Apex checks none)."""

_DIFFERENCES = """

        Against Apex's FusedLAMB otherwise: ``max_grad_norm`` defaults to None (no clip), as
        in every fusedopt class, where Apex's is 1.0: pass ``max_grad_norm=1.0`` for Apex's
        default. The clip is ``clip_grad_norm_``'s, ``g * min(1, n / (norm + 1e-6))``, where
        Apex divides by ``max(1, norm / n)``: the same below the threshold; above it the
        coefficients differ by a factor ``1 + 1e-6 / norm`` (2e-6 relative at a norm of 0.5);
        near it (norm in (n - 1e-6, n]) fusedopt scales by at least ``1 - 1e-6 / n`` where Apex
        does not. ``norm_type=inf`` and ``max_grad_value`` are fusedopt's additions. ``step``
        is per parameter (torch's convention: ``state['step']``, an fp32 0-dim tensor on the
        param's device) where Apex keeps one int per param group: the same while every param
        has a grad on every step; a param without a grad on a step keeps its count where
        Apex's group count moves on (and so its next bias correction). A skipped step (a
        GradScaler, ``nonfinite``) changes nothing, counters included. Apex takes fp16 and fp32
        params; fusedopt bf16 and fp64 too. Apex's ``set_grad_none`` is not taken:
        ``zero_grad()`` sets grads to None by default, as Apex's did. An Apex state_dict loads:
        a param's missing ``step`` is read from its group's ``step``. Sharded DTensors are
        refused (the trust ratio needs whole norms); with ``norm_group`` (ZeRO, FSDP1) the
        ratio is per tensor this rank holds. Apex writes the update into ``.grad``, rounded to
        the grad's dtype (fp16) before its norm and the param write; fusedopt keeps it in fp32
        (fp64 for fp64) and never in ``.grad``. LAMB has no Triton kernels yet (below): every
        step takes the torch path, and ``backend="triton"`` is refused with the reason.
       """

_COST = """
    Cost of this torch path (fp32, default options), in bytes per parameter element, one
    torch._foreach_* pass each: ||p|| 4; m (lerp) 12; v (mul, addcmul) 8 + 12; denominator
    into the one scratch list (mul, sqrt, add) 8 + 8 + 8; u there (reciprocal, * m,
    + weight_decay * p) 8 + 12 + 12; ||u|| 4; p (addcmul by -lr * ratio) 12: 12 passes, 108
    bytes; with ``max_grad_norm`` the norm pass 4 and the clip written back into ``.grad`` 8:
    120. Peak memory: one fp32 list like the params. Dividing m by the denominator into a
    second list would save the reciprocal's 8 bytes at twice the peak; on CPU the new list's
    first touch costs more than the pass (resnet50 shapes, 25.6M elements, 1 thread: 72 ms
    for an out-of-place _foreach_mul against 11 ms for _foreach_reciprocal_). bf16/fp16 add
    fp32 copies in (g, p, m, v: 6 bytes each; the g copy is the scratch) and rounded copies out
    (p, m, v: 6 each). A step that may skip (GradScaler, ``nonfinite``) zeroes the gradient
    into the scratch list (torch.where per tensor: 8 bytes) and weights the moments and step
    by 1 - found_inf on the device: a skipped step leaves p, m and v bit for bit. On CUDA the
    ops that take a per-tensor scalar (bias corrections, trust ratios: lists of 0-dim
    tensors, so no host read) take torch's per-tensor foreach route: launches grow with the
    number of tensors.

    A Triton version (the design, not built): 3 launches per (device, dtype) group. The norm
    pass as now (g read: 4 bytes fp32, when clipping or detecting inf/NaN). Pass 1 reads g, p,
    m, v, applies clip/clamp/unscale, writes m and v, forms u in registers from the m and v as
    stored (rounded), and writes per-(tensor, block) partials of ||p||^2 and ||u||^2 into fixed
    slots (deterministic, no atomics): 24 bytes. Without a trust ratio (weight_decay 0 and no
    use_nvlamb) pass 1 writes p itself, 28 bytes as Adam's update, and pass 2 is skipped.
    Pass 2 reduces its tensor's partials to the trust ratio, recomputes u from the new m, v (and
    p) by the same formula, bit for bit, and writes p - lr * ratio * u: reads p, m, v, writes p:
    16 bytes. 44 bytes in all with the clip (40 without), against this path's 120 and Apex's 52
    (norms of g and p 4 + 4; stage 1 reads g, p, m, v and writes u, m, v: 28; norm of u 4;
    stage 2 reads u, p and writes p: 12).
    """


class LAMB(ClippedStep, torch.optim.Optimizer):
    __doc__ = class_doc(
        "LAMB (layer-wise adaptive moments), as NVIDIA Apex's FusedLAMB computes it, with "
        "gradient clipping inside ``step``.", _MATH, _ARGS, "LAMB",
        _DIFFERENCES, reference="NVIDIA Apex's FusedLAMB (torch.optim has no LAMB)",
        kernels=False) + _COST

    _NO_KERNELS = ("LAMB's per-tensor trust ratios need each tensor's norms of p and of the "
                   "update between the moment update and the parameter write, which the one-pass "
                   "elementwise update kernel cannot take (the two-pass design is in the "
                   "fusedopt.LAMB docstring); LAMB steps on backend='torch'")

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True, *,
                 use_nvlamb=False, max_grad_norm=None, norm_type=2.0, max_grad_value=None,
                 nonfinite="propagate", backend=None, norm_group=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} "
                                 "(LAMB takes 0 <= beta < 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if amsgrad:
            raise NotImplementedError(
                "fusedopt.LAMB does not support amsgrad=True (nor does Apex's FusedLAMB, which "
                "raises RuntimeError)")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                        grad_averaging=grad_averaging, use_nvlamb=use_nvlamb,
                        differentiable=False)
        super().__init__(params, defaults)
        self._after_torch_init()

    def _state_for(self, group, p):
        """p's state: Apex's exp_avg and exp_avg_sq, and torch's per-param step (fp32 on p's
        device). A state without a step (an Apex state_dict) counts from its group's step."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = new_state_like(p)
            state["exp_avg_sq"] = new_state_like(p)
        if "step" not in state:
            state["step"] = new_step(p).add_(float(group.get("step", 0)))
        step = state["step"]
        if step.device != p.device or step.dtype != torch.float32:  # a CPU step from a checkpoint
            state["step"] = step.to(device=p.device, dtype=torch.float32)
        return state

    def _check_new_param(self, i, p):
        _check_whole([p], "the new group", first=i)

    def _gather(self):
        """ClippedStep's, refusing sharded DTensors before anything is written (a param may have
        become one after the constructor saw it)."""
        gathered = super()._gather()
        for gi, params in enumerate(gathered):
            _check_whole(params, f"group {gi}")
        return gathered

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        states = [self._state_for(group, p) for p in params]
        beta1, beta2 = map(host_float, group["betas"])
        lamb_torch_(
            list(map(local, params)), grads, [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states],
            lr=scalar_on(group["lr"], device), beta1=beta1, beta2=beta2,
            eps=host_float(group["eps"]), weight_decay=host_float(group["weight_decay"]),
            bias_correction=group["bias_correction"], adam_w_mode=group["adam_w_mode"],
            grad_averaging=group["grad_averaging"], use_nvlamb=group["use_nvlamb"],
            grad_scale=grad_scale, found_inf=found_inf)
