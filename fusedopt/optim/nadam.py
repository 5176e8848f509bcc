"""NAdam, as torch.optim.NAdam. Math: rules.nadam_rule, rules.nadam_step."""
import torch
from torch.optim.nadam import nadam as torch_nadam

from fusedopt._elementwise import ElementwiseStep, ln, new_state_like, new_step
from fusedopt.optimizer import class_doc, host_float

_MATH = """\
        g <- -g                                         if maximize
        g <- g + weight_decay * p                       if not decoupled_weight_decay
        p <- p * (1 - lr * weight_decay)                if decoupled_weight_decay
        mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
        P_t = P_(t-1) * mu_t                            (state mu_product; P_0 = 1)
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        d = sqrt(v / (1 - beta2^t)) + eps
        p <- p - lr * (1 - mu_t) / (1 - P_t) * g / d
        p <- p - lr * mu_(t+1) / (1 - P_t * mu_(t+1)) * m / d"""


class NAdam(ElementwiseStep, torch.optim.NAdam):
    __doc__ = class_doc(
        "NAdam (Adam with Nesterov momentum), as ``torch.optim.NAdam``, with gradient clipping "
        "inside ``step``.", _MATH,
        """        params, lr (default 2e-3), betas ((0.9, 0.999)), eps (1e-8), weight_decay (0),
        momentum_decay (4e-3), decoupled_weight_decay (False), foreach, maximize, capturable,
            differentiable: as ``torch.optim.NAdam``, with the same defaults and the same errors
            for bad values; ``lr`` may be a Tensor. ``foreach`` and ``capturable`` change nothing
            here (the step never syncs); ``differentiable=True`` raises NotImplementedError.""",
        "NAdam", "\n        ``state['step']`` and ``state['mu_product']`` are fp32 tensors on the "
                 "param's device.")

    _RULE, _STEP_RULE = "nadam_rule", "nadam_step"
    _STATE = ("exp_avg", "exp_avg_sq", None)
    _SCALAR_STATE = "mu_product"

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None, stochastic_rounding=False, master_weights=False,
                 state_dtype=None, rounding_seed=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        self._init_memory(stochastic_rounding, master_weights, state_dtype, rounding_seed)
        super().__init__(params, lr, betas, eps, weight_decay, momentum_decay,
                         decoupled_weight_decay, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable)
        self._after_torch_init()

    def _flags(self, group):
        return group["decoupled_weight_decay"], group["maximize"]

    def _hyper(self, group):
        beta1, beta2 = map(host_float, group["betas"])
        return (beta1, 1.0 - beta1, beta2, 1.0 - beta2, ln(beta2), group["eps"],
                host_float(group["weight_decay"]), group["momentum_decay"])

    def _state_for(self, group, p):
        state = super()._state_for(group, p)
        mu = state["mu_product"]
        if mu.device != p.device or mu.dtype != torch.float32:  # a torch.optim checkpoint's
            state["mu_product"] = mu.to(device=p.device, dtype=torch.float32)
        return state

    def _torch_step(self, group, params, grads, states):
        # for-loop: 197 ms a step on GPT-2 small's shapes against foreach's 220 (2-core EPYC)
        beta1, beta2 = group["betas"]
        torch_nadam(params, grads, [st["exp_avg"] for st in states],
                    [st["exp_avg_sq"] for st in states], [st["mu_product"] for st in states],
                    [st["step"] for st in states],
                    decoupled_weight_decay=group["decoupled_weight_decay"], foreach=False,
                    maximize=group["maximize"], beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], momentum_decay=group["momentum_decay"],
                    eps=group["eps"])

    def _init_state(self, group, p, state):
        state["step"] = new_step(p)
        state["mu_product"] = torch.ones((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = new_state_like(p)
        state["exp_avg_sq"] = new_state_like(p)
