"""Adam and AdamW: the classes and their torch path. Math: rules.adam_*_rule.
Kernel twin: kernels/adam.py."""
import math

import torch

from fusedopt._distributed import local
from fusedopt._grouping import pick
from fusedopt.nonfinite import keep_where
from fusedopt.optimizer import (ClippedStep, class_doc, compute_dtype, host_float, kernel_lr,
                                scalar_on, split_for_fused_op)
from fusedopt.rules import adam_moments_rule, adam_param_rule


def adam_torch_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2,
                weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale=None,
                found_inf=None):
    """One Adam/AdamW step over tensors of one (device, dtype): torch's fused Adam op where it is
    right (optimizer.split_for_fused_op), rules.adam_*_rule for the rest.

    ``steps`` are fp32 0-dim tensors on the params' device; they advance here. ``grad_scale``
    divides every gradient in the same pass that updates the parameter (and is written back).
    ``found_inf`` (0-dim fp32, 0 or 1) skips everything on the device, step counters included,
    as torch's fused Adam does under GradScaler.
    """
    vmax = max_exp_avg_sqs if amsgrad else [None] * len(params)
    fused, rest = split_for_fused_op(params, grads, exp_avgs, exp_avg_sqs, vmax)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                 maximize=maximize, grad_scale=grad_scale)
    for i in rest:
        adam_rule_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], vmax[i], steps[i],
                   decoupled_weight_decay=decoupled_weight_decay, found_inf=found_inf, **hyper)
    if fused:
        fused_steps = pick(steps, fused)
        torch._foreach_add_(fused_steps, 1)
        op = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
        op(pick(params, fused), pick(grads, fused), pick(exp_avgs, fused), pick(exp_avg_sqs, fused),
           pick(vmax, fused) if amsgrad else [], fused_steps, amsgrad=amsgrad,
           found_inf=found_inf, **hyper)
        if found_inf is not None:
            torch._foreach_sub_(fused_steps, [found_inf] * len(fused_steps))


def adam_rule_(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step, *, lr, beta1, beta2, weight_decay,
               eps, maximize, decoupled_weight_decay, grad_scale=None, found_inf=None):
    """One tensor through rules.adam_*_rule in fp32 (fp64 for fp64), any layout, with the fused
    op's contract (``found_inf`` keeps every old value). Reads the step count on the host: one
    sync per call on a GPU (this path is only for layouts the fused op gets wrong)."""
    acc = compute_dtype(p.dtype)
    g_acc = g.to(acc)
    if grad_scale is not None:
        g_acc = g_acc / grad_scale
        g.copy_(g_acc)
    t = float(step) + 1.0
    if found_inf is None:
        step += 1
    else:
        step += 1.0 - found_inf
    x = p.to(acc)
    m, v = adam_moments_rule(x, g_acc, exp_avg.to(acc), exp_avg_sq.to(acc), beta2, 1.0 - beta1,
                             1.0 - beta2, 0.0 if decoupled_weight_decay else weight_decay, maximize)
    if max_exp_avg_sq is not None:
        v_hat = torch.maximum(max_exp_avg_sq.to(acc), v)
        max_exp_avg_sq.copy_(keep_where(found_inf, max_exp_avg_sq, v_hat))
    else:
        v_hat = v
    root = v_hat.sqrt()
    new_p = adam_param_rule(x, m, root, 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
                            lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t), eps)
    p.copy_(keep_where(found_inf, p, new_p))
    exp_avg.copy_(keep_where(found_inf, exp_avg, m))
    exp_avg_sq.copy_(keep_where(found_inf, exp_avg_sq, v))


class _AdamStep(ClippedStep):
    """The step shared by Adam and AdamW: state as torch.optim.Adam keeps it, then adam_torch_."""

    def _state_for(self, p, amsgrad):
        state = self.state[p]
        if len(state) == 0:
            # torch's keys; step is fp32 on the param's device (torch's fused/capturable layout,
            # and on CPU also its default one), since the fused ops and kernels read it there.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            # a state_dict from torch.optim(foreach/for-loop) on CUDA keeps step on the CPU
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # Triton backend: table row = p, exp_avg, exp_avg_sq, max_exp_avg_sq, step | numel
    _HAS_STEP = True

    def _row_flags(self, group):
        return group["amsgrad"]

    def _kernel_row(self, group, p):
        """(element tensors, scalar tensors, ints) of p's row (kernels/adam.py)."""
        amsgrad = group["amsgrad"]
        s = self._state_for(p, amsgrad)
        vmax = s["max_exp_avg_sq"] if amsgrad else p  # never read without amsgrad
        return [p, s["exp_avg"], s["exp_avg_sq"], vmax], [s["step"]], []

    def _launch_update_(self, group, table, clip, grid, num_warps):
        from fusedopt.kernels.adam import adam_triton_
        beta1, beta2 = group["betas"]
        adam_triton_(table, clip, lr=kernel_lr(group["lr"], table.device), beta1=host_float(beta1),
                     beta2=host_float(beta2), eps=group["eps"],
                     weight_decay=host_float(group["weight_decay"]),
                     amsgrad=group["amsgrad"], maximize=group["maximize"],
                     decoupled_weight_decay=group["decoupled_weight_decay"], grid=grid,
                     num_warps=num_warps)

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        amsgrad = group["amsgrad"]
        states = [self._state_for(p, amsgrad) for p in params]
        beta1, beta2 = group["betas"]
        adam_torch_(  # on local shards of DTensors (fusedopt/_distributed.py); step is plain
            list(map(local, params)), grads,
            [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
            [local(s["max_exp_avg_sq"]) for s in states] if amsgrad else [],
            [s["step"] for s in states],
            lr=scalar_on(group["lr"], device), beta1=host_float(beta1), beta2=host_float(beta2),
            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=amsgrad,
            maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"],
            grad_scale=grad_scale, found_inf=found_inf)


_MATH = r"""            & g \leftarrow -g \text{ if maximize}; \quad
              \text{Adam: } g \leftarrow g + \lambda\theta; \quad
              \text{AdamW: } \theta \leftarrow \theta (1 - \gamma\lambda) \\
            & m \leftarrow \beta_1 m + (1 - \beta_1) g; \quad
              v \leftarrow \beta_2 v + (1 - \beta_2) g^2; \quad
              \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad, else } v \\
            & \theta \leftarrow \theta - \frac{\gamma}{1 - \beta_1^t} \, m \,/\,
              \big(\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon\big)"""

_STATE_NOTE = ("\n        ``state['step']`` is an fp32 tensor on the param's device (torch's fused layout; on\n"
               "        CPU also its default one).")


class Adam(_AdamStep, torch.optim.Adam):
    __doc__ = class_doc(
        "Adam, as ``torch.optim.Adam``, with gradient clipping inside ``step``.", _MATH,
        """        params, lr (default 1e-3), betas ((0.9, 0.999)), eps (1e-8), weight_decay (0), amsgrad
        (False), foreach, maximize, capturable, differentiable, fused, decoupled_weight_decay
        (False): as ``torch.optim.Adam``, with the same defaults and the same errors for bad
            values; ``lr`` and ``betas`` may be Tensors. ``foreach``, ``fused`` and ``capturable``
            change nothing here (the step never syncs); ``differentiable=True`` raises
            NotImplementedError.""",
        "Adam", _STATE_NOTE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._after_torch_init()


class AdamW(_AdamStep, torch.optim.AdamW):
    __doc__ = class_doc(
        "AdamW (decoupled weight decay), as ``torch.optim.AdamW``, with clipping inside ``step``.",
        _MATH,
        """        params, lr (default 1e-3), betas ((0.9, 0.999)), eps (1e-8), weight_decay (1e-2), amsgrad
        (False), maximize, foreach, capturable, differentiable, fused: as ``torch.optim.AdamW``,
            with the same defaults and the same errors for bad values; ``lr`` and ``betas`` may be
            Tensors. ``foreach``, ``fused`` and ``capturable`` change nothing here (the step never
            syncs); ``differentiable=True`` raises NotImplementedError.""",
        "AdamW", _STATE_NOTE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._after_torch_init()
