"""Adafactor, as torch.optim.Adafactor: the class and its torch path. No kernel twin yet: its
factored second moment needs per-tensor row and column reductions before the update (the class
docstring says what a Triton version would need)."""
import math

import torch

from fusedopt import clip as _clip
from fusedopt._distributed import is_dtensor
from fusedopt.nonfinite import keep_where
from fusedopt.optimizer import ClippedStep, class_doc, compute_dtype, host_float, scalar_on

# Same-shape tensors are stacked and stepped together, up to this many elements per stack (a
# bigger tensor goes alone, as a view when no cast is due): one op per stack instead of ~40 small
# ones per tensor, while the temporaries stay bounded as in torch's for-loop (Adafactor is chosen
# where memory is tight; torch's foreach path holds a whole parameter set of them). CPU time of a
# clipped step, 1 thread, 2 AMD EPYC cores (loaded), torch 2.13, 1000 x (64, 64) + 1000 x (64,):
# every tensor alone 135 ms, stacks of 2^16 elements 46.6, 2^17 43.6, 2^20 46.1; torch for-loop +
# clip_grad_norm_ 75.8, foreach 79.0. ResNet-50's 161 tensors: 2^17 180 ms, alone 185, torch
# for-loop 468; GPT-2 small: 358 ms against 634 (for-loop) and 953 (foreach).
_CHUNK = 1 << 17


def _chunks(grads: list[torch.Tensor]) -> list[list[int]]:
    """Indices of same-shape tensors in runs of at most _CHUNK elements (one tensor at least), in
    first-seen order."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, g in enumerate(grads):
        by_shape.setdefault(g.shape, []).append(i)
    runs = []
    for shape, idx in by_shape.items():
        per = max(1, _CHUNK // max(1, shape.numel()))
        runs.extend(idx[j:j + per] for j in range(0, len(idx), per))
    return runs


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[k, *shape] in ``dtype``: a view of the one tensor when k == 1 and no cast is due, else a
    copy (the cast included)."""
    if len(tensors) == 1:
        return tensors[0].to(dtype).unsqueeze(0)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=tensors[0].device)
    return torch.stack(tensors, out=out)


def _lerp_state_(states, target, weight, dtype, found_inf):
    """torch's ``state.lerp_(target, weight)`` on the stacked ``states``, computed in ``dtype`` and
    written back unless skipped; returns the new values (a fresh tensor, never the state)."""
    old = _stack(states, dtype)
    new = torch.lerp(old, target, weight)
    torch._foreach_copy_(states, list(keep_where(found_inf, old, new).unbind(0)))
    return new


def adafactor_torch_(params, grads, states, *, lr, beta2_decay, eps1, eps2, d, weight_decay,
                     maximize, grad_scale=None, found_inf=None):
    """One Adafactor step over tensors of one (device, dtype), as torch.optim.Adafactor's for-loop,
    in fp32 (fp64 for fp64) whatever the dtype, with no host read.

    ``states[i]``: param i's state (torch's keys; ``step`` an fp32 0-dim tensor on the device,
    advanced here). ``grad_scale`` (0-dim, or None) divides every gradient, and the divided one is
    written back as torch's fused ops do. ``found_inf`` (0-dim fp32 0/1, or None) skips the step
    on the device: parameters, state and step counters keep their values, bit for bit. ``lr`` is
    a float or a 0-dim tensor on the device. torch forms the step-dependent scalars on the host
    from ``step.item()`` and the norms' ``.item()``; here they are float64 device tensors with one
    element per tensor, formed for all tensors at once and sliced per stack.
    """
    device, acc = params[0].device, compute_dtype(params[0].dtype)
    skip = None if found_inf is None else found_inf != 0
    chunks = _chunks(grads)
    order = [i for idx in chunks for i in idx]
    lr64 = lr.double() if isinstance(lr, torch.Tensor) else float(lr)
    t = torch.stack([states[i]["step"] for i in order]).double() + 1  # torch: step_t += 1
    one_minus_beta2 = t.pow(beta2_decay).to(acc)  # 1 - beta2_t = t ** beta2_decay
    rho = 1.0 / t.sqrt()  # min(lr, 1 / t ** 0.5)
    rho = torch.minimum(rho, lr64) if isinstance(lr64, torch.Tensor) else rho.clamp_(max=lr64)
    # ||p||, before the weight decay: one foreach launch (clip.py: accurate for large CPU tensors)
    p_norm = torch.stack(_clip.group_norms([params[i] for i in order], 2.0, params[0].dtype)).double()
    decay = None
    if weight_decay != 0:  # torch: param.mul_(1 - lr * weight_decay)
        decay = 1 - lr64 * weight_decay
        # always a 0-dim tensor: torch 2.13's CPU _foreach_mul_(bf16 list, float) rounds the float
        # to bf16 first (0.998 -> 0.99609375, twice the decay), where torch's param.mul_(float)
        # and the Tensor overload do not; 1823 of 4096 bf16 elements differed from torch's
        if not isinstance(decay, torch.Tensor):
            decay = torch.full((), decay, dtype=torch.float64, device=device)
        if skip is not None:
            decay = torch.where(skip, 1.0, decay)
        decay = decay.to(acc)
    end = 0
    for idx in chunks:
        here = slice(end, end + len(idx))
        end = here.stop
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        sts = [states[i] for i in idx]
        shape = gs[0].shape
        numel, ones = shape.numel(), (1,) * len(shape)
        if grad_scale is not None and gs[0].dtype == acc:
            torch._foreach_div_(gs, grad_scale)  # into .grad before the stack copies it
        g = _stack(gs, acc)
        if grad_scale is not None and gs[0].dtype != acc:
            g.div_(grad_scale)
            torch._foreach_copy_(gs, list(g.unbind(0)))

        weight = one_minus_beta2[here].view(len(idx), *ones)
        g2 = g * g
        if len(shape) >= 2:  # factored over the last two dims, the leading ones batch
            # torch takes each mean as vector_norm(g, dim).square_() / size: on CPU, vector_norm
            # over dim -2 took 7.0 ms for a 768 x 3072 grad where g2 and its two means took 0.59
            # (1 thread, torch 2.13), and summing squares is also closer to fp64 (1.7e-7 against
            # 1.3e-6 relative, columns of 768)
            row = _lerp_state_([st["row_var"] for st in sts], g2.mean(dim=-1, keepdim=True),
                               weight, acc, found_inf)
            col = _lerp_state_([st["col_var"] for st in sts], g2.mean(dim=-2, keepdim=True),
                               weight, acc, found_inf)
            del g2
            # torch: (row @ col) / max(mean(row, dim=-2), eps1); the division is taken on the row
            # factor (m elements) instead of on the product (m * n)
            var = torch.matmul(row / row.mean(dim=-2, keepdim=True).clamp_(min=eps1), col)
        else:
            var = _lerp_state_([st["variance"] for st in sts], g2, weight, acc, found_inf)
            del g2
        update = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)  # g / max(sqrt(var), eps1)
        del var, g
        u_norm = torch.stack(_clip.group_norms(list(update.unbind(0)), 2.0, acc)).double()
        # alpha = max(eps2, RMS(p)) * rho; the update is alpha * U / max(1, RMS(U) / d)
        alpha = (p_norm[here] / math.sqrt(numel)).clamp_(min=eps2) * rho[here]
        denom = (u_norm / (math.sqrt(numel) * d)).clamp_(min=1.0)
        step_size = alpha / denom if maximize else -alpha / denom  # maximize: torch negates g
        if skip is not None:
            # p + (-0.0) * 1 is p bit for bit (-0.0 and NaN included); the update may be NaN here
            step_size = torch.where(skip, 1.0, step_size)
            update.masked_fill_(skip, -0.0)
        if decay is not None:
            torch._foreach_mul_(ps, decay)
        torch._foreach_addcmul_(ps, list(update.unbind(0)),
                                list(step_size.to(acc).view(len(idx), *ones).unbind(0)))
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1.0 if found_inf is None else 1.0 - found_inf)


_MATH = """\
        g <- -g                                         if maximize
        (eps1, eps2) = eps;  RMS(x) = ||x||_2 / sqrt(x.numel())
        beta2_t = 1 - t^beta2_decay
        rho_t = min(lr, 1 / sqrt(t))
        alpha_t = max(eps2, RMS(p)) * rho_t
        p <- p * (1 - lr * weight_decay)                (after RMS(p) above)
        if p has 2+ dims (state row_var R, col_var C, factored over the last two dims):
            R <- beta2_t * R + (1 - beta2_t) * mean(g^2, dim=-1)
            C <- beta2_t * C + (1 - beta2_t) * mean(g^2, dim=-2)
            V = (R @ C) / max(mean(R, dim=-2), eps1)
        else (state variance V):
            V <- beta2_t * V + (1 - beta2_t) * g^2
        U = g / max(sqrt(V), eps1)
        p <- p - alpha_t * U / max(1, RMS(U) / d)"""

_STATE_NOTE = """
        ``state['step']`` is an fp32 tensor on the param's device (torch keeps it on the CPU and
        reads it with ``.item()`` every step; here the step's scalars are formed on the device).
        With ``eps=(None, ...)``, epsilon1 is the machine epsilon of the dtype of the group's first
        parameter with a gradient, for the whole group, as in torch 2.13. Parameters with no
        elements are stepped (their state made, their step counted), where torch raises
        ZeroDivisionError. DTensor parameters are refused: fusedopt steps them on their local
        shards (fusedopt/_distributed.py), and Adafactor's factors and RMS(p) are reductions over
        whole tensors."""

_COST = """
    Cost (the torch path, which every device takes): elements read + written per parameter
    element, fp32, factored: RMS(p) 1, g^2 2, its row and column means 2, the estimate 1, clamp
    2, rsqrt 2, times g 3, RMS(U) 1, the update 3: 17, 68 bytes, as torch's for-loop (which
    takes the means as vector_norm over each dim, reading g twice without writing g^2, and divides
    the m x n estimate in place where this divides the row factor). An elementwise ``variance``
    (under 2 dims): its lerp and state write add 5, 76 bytes, as torch. Weight decay adds 8 bytes
    (as torch), a step that may skip (GradScaler, nonfinite) 8 (the update masked on the device;
    12 more for a variance), clipping 12 (the norm pass, and the grad divided and written back,
    as clip_grad_norm_ + torch: 80 bytes). A stack of k > 1 small tensors copies their grads
    once more (8 bytes).

    A Triton version would need three passes, not the one of the elementwise optimizers: (A) read
    g and p: per-row and per-column partial sums of g^2 (deterministic per-program partials, no
    float atomics), the sum of p^2 per tensor, and the sum of g^2, which is the norm pass itself
    (max |g| for the inf norm); then R, C and the clip coefficient (its square scales the row and
    column sums) from the partials, a few elements per row; (B) read g: the sum of U^2 per tensor,
    since RMS(U) scales the update before any element of it may be written; (C) read p and g,
    write p. 24 bytes per fp32 element with clipping (A 8, B 4, C 12; an elementwise variance: B
    also reads and writes it, C reads it: 36), against 80 for the torch recipe.
"""


class Adafactor(ClippedStep, torch.optim.Adafactor):
    __doc__ = class_doc(
        "Adafactor, as ``torch.optim.Adafactor``, with gradient clipping inside ``step``.", _MATH,
        """        params, lr (default 1e-2), beta2_decay (-0.8), eps ((None, 1e-3)), d (1.0),
        weight_decay (0.0), foreach, maximize (False): as ``torch.optim.Adafactor``, with the
            same defaults and the same errors for bad values; ``lr`` may be a Tensor.
            ``foreach`` changes nothing here: same-shape tensors are stacked (up to 131072
            elements a stack) and each bigger tensor stepped alone, which bounds the temporaries
            as torch's for-loop does. There is no Triton kernel yet: ``backend="triton"`` raises,
            None takes the torch path on every device (see Cost below).""",
        "Adafactor", _STATE_NOTE, kernels=False).rstrip(" ") + _COST

    _NO_KERNELS = ("Adafactor has no Triton kernel yet: its factored second moment needs row and "
                   "column reductions of each gradient (and RMS(U) needs one of the update) "
                   "before the parameter may be written, which the one-pass elementwise update "
                   "kernel cannot do; use backend='torch' or None")

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        super().__init__(params, lr, beta2_decay, eps, d, weight_decay, foreach=foreach,
                         maximize=maximize)
        self._after_torch_init()

    def _check_new_param(self, i, p):
        if is_dtensor(p):
            raise NotImplementedError(
                f"fusedopt.Adafactor: parameter {i} of the new group (shape {tuple(p.shape)}) "
                "is a DTensor; fusedopt steps DTensors on their local shards, but Adafactor's "
                "row and column factors and RMS(param) are reductions over the whole tensor: "
                "use torch.optim.Adafactor for DTensor parameters")

    def _state_for(self, p):
        """p's state, made as torch makes it on a first step (from the grad: ``row_var`` and
        ``col_var`` for 2+ dims, else ``variance``); ``step`` moved to p's device as fp32, where
        the step reads it (a torch.optim state_dict keeps it on the CPU)."""
        state = self.state[p]
        if not state:
            g = p.grad
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if g.dim() > 1:
                state["row_var"] = g.new_zeros((*g.shape[:-1], 1))
                state["col_var"] = g.new_zeros((*g.shape[:-2], 1, g.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        step = state["step"]
        if step.device != p.device or step.dtype != torch.float32:
            state["step"] = step.to(device=p.device, dtype=torch.float32)
        return state

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        eps1, eps2 = group["eps"]
        if eps1 is None:  # torch 2.13: the first param with a grad decides, for the whole group
            eps1 = torch.finfo(next(p for p in group["params"] if p.grad is not None).dtype).eps
        adafactor_torch_(
            params, grads, [self._state_for(p) for p in params], lr=scalar_on(group["lr"], device),
            beta2_decay=host_float(group["beta2_decay"]), eps1=host_float(eps1),
            eps2=host_float(eps2), d=host_float(group["d"]),
            weight_decay=host_float(group["weight_decay"]), maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf)
