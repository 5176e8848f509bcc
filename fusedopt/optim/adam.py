"""Adam and AdamW: the classes and their torch path. Math: rules.adam_rule, rules.adam_step;
kernel: the shared update (kernels/update.py)."""
import torch

from fusedopt._distributed import local
from fusedopt._elementwise import (ElementwiseStep, fused_counted_, ln, new_state_like, new_step,
                                   rule_torch_)
from fusedopt._grouping import pick
from fusedopt.optimizer import class_doc, host_float, scalar_on, split_for_fused_op


def adam_torch_(opt, group, params, grads, columns, steps, *, lr, grad_scale=None, found_inf=None):
    """One Adam/AdamW step over tensors of one (device, dtype): torch's fused Adam op where it is
    right (optimizer.split_for_fused_op), the rule (fusedopt/_elementwise.rule_torch_) for the
    rest. ``columns[i]``: [exp_avg, exp_avg_sq, max_exp_avg_sq or None].

    ``steps`` are fp32 0-dim tensors on the params' device; they advance here. ``grad_scale``
    divides every gradient in the same pass that updates the parameter (and is written back).
    ``found_inf`` (0-dim fp32, 0 or 1) skips everything on the device, step counters included,
    as torch's fused Adam does under GradScaler.
    """
    amsgrad = group["amsgrad"]
    fused, rest = split_for_fused_op(params, grads, *zip(*columns))
    if rest:
        rule_torch_(opt, group, pick(params, rest), pick(grads, rest), pick(columns, rest),
                    pick(steps, rest), [0] * len(rest), lr, grad_scale, found_inf)
    if fused:
        beta1, beta2 = group["betas"]
        cols = pick(columns, fused)
        op = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        fused_counted_(op, (pick(params, fused), pick(grads, fused), [c[0] for c in cols],
                            [c[1] for c in cols], [c[2] for c in cols] if amsgrad else []),
                       pick(steps, fused), found_inf, amsgrad=amsgrad, lr=lr,
                       beta1=host_float(beta1), beta2=host_float(beta2),
                       weight_decay=group["weight_decay"], eps=group["eps"],
                       maximize=group["maximize"], grad_scale=grad_scale)


class _AdamStep(ElementwiseStep):
    """The declaration shared by Adam and AdamW (fusedopt/_elementwise.py), and their torch path."""

    _RULE, _STEP_RULE = "adam_rule", "adam_step"
    _STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _columns(self, group):
        return 7 if group["amsgrad"] else 3

    def _flags(self, group):
        return group["amsgrad"], group["maximize"], group["decoupled_weight_decay"]

    def _hyper(self, group):
        beta1, beta2 = map(host_float, group["betas"])
        return (beta2, 1.0 - beta1, 1.0 - beta2, ln(beta1), ln(beta2), group["eps"],
                host_float(group["weight_decay"]))

    def _init_state(self, group, p, state):
        # torch's keys; step is fp32 on the param's device (torch's fused/capturable layout, and
        # on CPU also its default one), since the fused ops and kernels read it there.
        if not state:
            state["step"] = new_step(p)
            state["exp_avg"] = new_state_like(p)
            state["exp_avg_sq"] = new_state_like(p)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = new_state_like(p)

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        if self._lean(group, params[0].dtype):
            return self._update_rule_(group, params, grads, grad_scale, device, found_inf)
        states = [self._state_for(group, p) for p in params]
        adam_torch_(  # on local shards of DTensors (fusedopt/_distributed.py); step is plain
            self, group, list(map(local, params)), grads,
            [[None if s is None else local(s) for s in self._state_tensors(group, st, p)]
             for st, p in zip(states, params)],
            [st["step"] for st in states], lr=scalar_on(group["lr"], device),
            grad_scale=grad_scale, found_inf=found_inf)


_MATH = """\
        g <- -g                                         if maximize
        g <- g + weight_decay * p                       Adam (decoupled_weight_decay=False)
        p <- p * (1 - lr * weight_decay)                AdamW; Adam(decoupled_weight_decay=True)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        v_max <- max(v_max, v)                          if amsgrad (state max_exp_avg_sq)
        v_hat = v_max if amsgrad, else v
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)"""

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
                 backend=None, norm_group=None, stochastic_rounding=False, master_weights=False,
                 state_dtype=None, rounding_seed=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        self._init_memory(stochastic_rounding, master_weights, state_dtype, rounding_seed)
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
                 backend=None, norm_group=None, stochastic_rounding=False, master_weights=False,
                 state_dtype=None, rounding_seed=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        self._init_memory(stochastic_rounding, master_weights, state_dtype, rounding_seed)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._after_torch_init()
