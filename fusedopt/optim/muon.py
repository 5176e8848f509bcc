"""Muon: the class and its torch path, Newton-Schulz batched over same-shape matrices. No kernel
twin (Muon._NO_KERNELS says why); the reference is torch/optim/_muon.py, whose op order every
line here keeps."""
import math

import torch

from fusedopt._distributed import is_dtensor
from fusedopt._grouping import pick
from fusedopt.nonfinite import keep_where
from fusedopt.optimizer import ClippedStep, class_doc, compute_dtype, scalar_on


def zeropower_via_newtonschulz(X, ns_coefficients, ns_steps, eps):
    """torch's _zeropower_via_newtonschulz on a stack of B wide bf16 matrices (B, r, c), r <= c
    (tall ones transposed by the caller, as torch transposes them), in torch's op order:
    normalise each by its Frobenius norm clamped at eps, then ns_steps of
    gram = X X^T; gram_update = b gram + c gram gram; X = a X + gram_update X.

    On CPU (torch 2.13) the result is bit for bit torch's, matrix by matrix: bmm/baddbmm round
    as mm/addmm do. ``X`` is divided in place; returns the new (B, r, c) bf16 stack."""
    a, b, c = ns_coefficients
    X.div_(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp_(min=eps))
    for _ in range(ns_steps):
        gram = torch.bmm(X, X.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.baddbmm(X, gram_update, X, beta=a)
    return X


def check_newtonschulz(ns_coefficients, ns_steps) -> None:
    """torch's checks, with its errors (it raises them mid-step, after writing the momentum
    buffers of earlier params; fusedopt before anything is written)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def lr_ratio(adjust_lr_fn, shape) -> float:
    """torch's _adjust_lr as a factor: adjusted lr = lr * lr_ratio(adjust_lr_fn, param.shape)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def wide_shapes(tensors) -> dict[tuple[int, int], list[int]]:
    """Indices of 2-D ``tensors`` per shape once tall ones are transposed to wide (rows <= cols),
    in first-seen order: (768, 3072) and (3072, 768) share one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tensors):
        rows, cols = t.shape
        groups.setdefault((min(rows, cols), max(rows, cols)), []).append(i)
    return groups


def _is_tall(t) -> bool:
    return t.size(0) > t.size(1)


def muon_torch_(params, grads, momentum_buffers, *, lr, weight_decay, momentum, nesterov,
                ns_coefficients, ns_steps, eps, adjust_lr_fn, grad_scale=None, found_inf=None):
    """One Muon step over 2-D tensors of one (device, dtype), torch.optim.Muon's math:

    buf = lerp(buf, g, 1 - momentum); u = lerp(g, buf, momentum) if nesterov else buf;
    O = NS(u) in bf16; p *= 1 - lr * weight_decay; p += -(lr * lr_ratio) * O

    with the elementwise passes as foreach ops over all tensors and Newton-Schulz batched per
    wide shape. ``grad_scale`` (0-dim) divides every gradient first, written back into it.
    ``found_inf`` (0-dim fp32, 0 or 1) keeps every parameter and buffer as it was, on the device:
    the new values are formed out of place and selected with torch.where. ``lr`` is a float or
    a 0-dim Tensor on the params' device; nothing is read on the host.
    """
    device, acc = params[0].device, compute_dtype(params[0].dtype)
    if grad_scale is not None:
        torch._foreach_div_(grads, grad_scale)
    if found_inf is None:
        torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
        new_bufs = momentum_buffers
    else:
        new_bufs = torch._foreach_lerp(momentum_buffers, grads, 1 - momentum)
    # decoupled decay first, rounded to the param dtype, as torch's param.mul_ (skipped where it
    # is an exact multiply by 1). A 0-dim tensor, not a float: torch 2.13's CPU _foreach_mul_
    # rounds a float to bf16/fp16 params' dtype first (0.998 became 0.99609375: twice the decay)
    decay = 1 - lr * weight_decay
    if not isinstance(decay, torch.Tensor):
        decay = torch.full((), decay, dtype=acc, device=device)
    if found_inf is not None:
        new_params = torch._foreach_mul(params, decay)
    else:
        new_params = params
        if isinstance(weight_decay, torch.Tensor) or weight_decay != 0:
            torch._foreach_mul_(params, decay)
    for (rows, cols), idx in wide_shapes(params).items():
        bufs = pick(new_bufs, idx)
        updates = torch._foreach_lerp(pick(grads, idx), bufs, momentum) if nesterov else bufs
        # one pass: cast to bf16 (torch's update.bfloat16()) and transpose tall ones
        X = torch.empty((len(idx), rows, cols), dtype=torch.bfloat16, device=device)
        torch.stack([u.mT if _is_tall(u) else u for u in updates], out=X)
        del updates
        O = zeropower_via_newtonschulz(X, ns_coefficients, ns_steps, eps)
        ps = pick(params, idx)
        # torch: param.add_(O, alpha=-lr * lr_ratio). The scale is a device tensor, one per param
        # shape (a Tensor lr is never read on the host), of shape (1, 1) so that it takes part
        # in type promotion: bf16/fp16 params get p + s * O in fp32, rounded once, as torch's
        # CUDA add_ does (its CPU add_ rounds alpha to bf16 first: up to 2^-9 of the step)
        scales = {}
        for p in ps:
            if p.shape not in scales:
                ratio = lr_ratio(adjust_lr_fn, p.shape)
                scales[p.shape] = ((lr * ratio).neg().to(acc).reshape(1, 1)
                                   if isinstance(lr, torch.Tensor)
                                   else torch.full((1, 1), -(lr * ratio), dtype=acc, device=device))
        torch._foreach_addcmul_(pick(new_params, idx),
                                [O[j].mT if _is_tall(p) else O[j] for j, p in enumerate(ps)],
                                [scales[p.shape] for p in ps])
    if found_inf is not None:
        for old, new in zip(momentum_buffers + params, new_bufs + new_params):
            old.copy_(keep_where(found_inf, old, new))


_MATH = """\
        buf <- momentum * buf + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * buf         if nesterov
        u = buf                                         otherwise
        X = bf16(u), transposed if p is tall (rows > cols)
        X <- X / max(||X||_F, eps)
        ns_steps times, with (a, b, c) = ns_coefficients:
            A = X @ X^T
            X <- a * X + (b * A + c * A @ A) @ X
        p <- p * (1 - lr * weight_decay)
        p <- p - lr * ratio * X                         (X transposed back if p is tall)
        ratio = sqrt(max(1, rows / cols))               adjust_lr_fn None or "original"
        ratio = 0.2 * sqrt(max(rows, cols))             adjust_lr_fn "match_rms_adamw\""""


class Muon(ClippedStep, torch.optim.Muon):
    __doc__ = class_doc(
        "Muon (momentum orthogonalised by Newton-Schulz), as ``torch.optim.Muon``, with clipping "
        "inside ``step``.", _MATH,
        """        params, lr (default 1e-3), weight_decay (0.1), momentum (0.95), nesterov (True),
        ns_coefficients ((3.4445, -4.775, 2.0315)), eps (1e-7), ns_steps (5), adjust_lr_fn
        (None, "original" or "match_rms_adamw"): as ``torch.optim.Muon``, with the same defaults
            and the same errors for bad values; ``lr`` may be a Tensor. 2-D parameters only, as
            there (also in ``add_param_group``, where torch checks nothing); DTensor parameters
            are refused (Newton-Schulz needs each whole matrix, and fusedopt steps local
            shards).""",
        "Muon", kernels=False) + """
    How the step runs, per (device, dtype) of a param group (always the torch path): the clip's
    division of the grads, the momentum lerp and the decay are one foreach op each over all
    matrices; for each shape (tall ones transposed to wide, so (768, 3072) and (3072, 768) are
    one batch) the Nesterov lerp, one cast+stack to bf16, the norm, its clamp, the division and
    3 x ns_steps bmm/baddbmm run once for the whole batch; one foreach addcmul applies the
    update. torch.optim.Muon does the same per matrix ("foreach is not supported"): 23 ops per
    matrix with ns_steps=5. Launches per step on CUDA, with S shapes and M matrices:
    about 3 + S (7 + 3 ns_steps) + M (the addcmul mixes bf16 updates into fp32 params, which
    foreach runs tensor by tensor), against about 23 M + the clip's for torch.

    Bytes per parameter element, fp32, clip and Nesterov on, beside the GEMMs: norm 4 + clip
    divide 8 + momentum 12 + Nesterov 12 + bf16 pack 6 + normalise 6 + decay 8 + update 10 =
    66, the same as torch.optim.Muon + clip_grad_norm_ (its clip multiply 8 and .bfloat16() 6
    in place of the divide and the pack); 12 fewer each without Nesterov. The GEMMs do
    ns_steps (4 r + 2 r^2 / c) FLOP per element of an r x c matrix (r <= c): 15,000 to 23,000
    at r = 768 (GPT-2's widths), so the step is matmul-bound, not memory-bound, and has no
    Triton kernel (``_NO_KERNELS``; ``backend="triton"`` is refused).

    Also different from torch.optim.Muon: torch 2.13's, with bf16 params and nesterov=False,
    normalises its own momentum buffer in place (``grad.bfloat16()`` returns the buffer itself
    and ``div_`` writes it; pytorch/pytorch PR 194664); fusedopt keeps the momentum. With
    bf16/fp16 params the update ``p - s O`` is formed in fp32 and rounded once, as torch's CUDA
    ``add_`` does; its CPU ``add_`` rounds ``s = lr * ratio`` to bf16 first (up to 2^-9 of the
    step). A GradScaler's skipped step, or ``nonfinite='skip'``, leaves parameters and buffers
    as they were (a skipped first step still makes the zero buffers torch makes at its next).
    """

    _NO_KERNELS = (
        "Muon's step is Newton-Schulz matmuls (3 x ns_steps bf16 GEMMs per matrix, 15,000 to "
        "23,000 FLOP per parameter at width 768), which torch.bmm runs batched at tensor-core "
        "speed, so an elementwise Triton kernel could only fuse the few passes around them")

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, *, max_grad_norm=None, norm_type=2.0, max_grad_value=None,
                 nonfinite="propagate", backend=None, norm_group=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        super().__init__(params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps,
                         ns_steps, adjust_lr_fn)
        self._after_torch_init()

    def _check_new_param(self, i, p):
        """torch's 2-D check, with its error, for every group (torch checks only the
        constructor's), and DTensors refused before the group is added."""
        if is_dtensor(p):
            raise NotImplementedError(
                f"fusedopt.Muon: parameter {i} of the new group (shape {tuple(p.shape)}) is "
                "a DTensor; Newton-Schulz needs each whole matrix and fusedopt steps local "
                "shards: use torch.optim.Muon for sharded matrices")
        if p.ndim != 2:
            raise ValueError("Muon only supports 2D parameters whereas we found a "
                             f"parameter with size: {p.size()}")

    def _gather(self):
        """torch's Newton-Schulz checks for every group with a grad, before anything is written."""
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                check_newtonschulz(group["ns_coefficients"], group["ns_steps"])
        return super()._gather()

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:  # torch's first step: zeros shaped as the grad
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        muon_torch_(params, grads, bufs, lr=scalar_on(group["lr"], device),
                    weight_decay=group["weight_decay"], momentum=group["momentum"],
                    nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
                    ns_steps=group["ns_steps"], eps=group["eps"],
                    adjust_lr_fn=group["adjust_lr_fn"], grad_scale=grad_scale,
                    found_inf=found_inf)
