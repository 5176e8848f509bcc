"""Adagrad, as torch.optim.Adagrad (dense gradients). Math: rules.adagrad_rule, rules.adagrad_step.
On CPU the torch path is torch's own fused Adagrad (torch has no fused Adagrad for CUDA)."""
import torch

from fusedopt._distributed import local
from fusedopt._elementwise import (ElementwiseStep, fused_counted_, new_state_like, new_step,
                                   rule_torch_)
from fusedopt._grouping import pick
from fusedopt.optimizer import class_doc, host_float, scalar_on, split_for_fused_op

_MATH = """\
        g <- -g                                         if maximize
        g <- g + weight_decay * p
        s <- s + g^2                                    (s starts at initial_accumulator_value)
        p <- p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)"""


class Adagrad(ElementwiseStep, torch.optim.Adagrad):
    __doc__ = class_doc(
        "Adagrad, as ``torch.optim.Adagrad``, with gradient clipping inside ``step``.", _MATH,
        """        params, lr (default 1e-2), lr_decay (0), weight_decay (0), initial_accumulator_value (0),
        eps (1e-10), foreach, maximize, differentiable, fused: as ``torch.optim.Adagrad``, with
            the same defaults and the same errors for bad values; ``lr`` may be a Tensor.
            ``foreach`` and ``fused`` change nothing here; ``differentiable=True`` raises
            NotImplementedError. Sparse gradients are refused (torch's sparse Adagrad stays the
            tool for them).""",
        "Adagrad", "\n        ``state['step']`` is an fp32 tensor on the param's device.")

    _RULE, _STEP_RULE = "adagrad_rule", "adagrad_step"
    _STATE = ("sum", None, None)

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None, stochastic_rounding=False, master_weights=False,
                 state_dtype=None, rounding_seed=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        self._init_memory(stochastic_rounding, master_weights, state_dtype, rounding_seed)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
                         foreach, maximize=maximize, differentiable=differentiable, fused=fused)
        self._after_torch_init()

    def _hyper(self, group):
        return (group["lr_decay"], group["eps"], host_float(group["weight_decay"]))

    def _init_state(self, group, p, state):
        # torch makes it in __init__ (step on the CPU, sum full of initial_accumulator_value);
        # this makes it for params added later, or after a state was cleared, from the
        # constructor's value as torch's _init_group does: a group's own value is ignored there
        state["step"] = new_step(p)
        state["sum"] = new_state_like(p, self.defaults["initial_accumulator_value"])

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        """torch._fused_adagrad_ on CPU, where it is right (split_for_fused_op), as the torch
        recipe's best: 54 ms a step on GPT-2 small's shapes (2-core EPYC) where the rule one
        piece at a time took 199; the rule elsewhere (CUDA, other layouts)."""
        if device.type != "cpu" or self._lean(group, params[0].dtype):
            return super()._update_(group, params, grads, grad_scale, device, found_inf)
        states = [self._state_for(group, p) for p in params]
        ps = list(map(local, params))
        sums = [local(st["sum"]) for st in states]
        steps = [st["step"] for st in states]
        lr = scalar_on(group["lr"], device)
        fused, rest = split_for_fused_op(ps, grads, sums)
        if rest:
            rule_torch_(self, group, pick(ps, rest), pick(grads, rest),
                        [[sums[i], None, None] for i in rest], pick(steps, rest), [0] * len(rest),
                        lr, grad_scale, found_inf)
        if fused:
            fused_counted_(torch._fused_adagrad_,
                           (pick(ps, fused), pick(grads, fused), pick(sums, fused)),
                           pick(steps, fused), found_inf, lr=lr, lr_decay=group["lr_decay"],
                           weight_decay=host_float(group["weight_decay"]), eps=group["eps"],
                           maximize=group["maximize"], grad_scale=grad_scale)
