"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"). Math: rules.lion_rule.

torch.optim has no Lion: the reference is the paper's Algorithm 2 as the widely used
lion-pytorch computes it (decoupled weight decay, lr 1e-4, betas (0.9, 0.99)); its state is one
``exp_avg`` per parameter and no step count, as there.
"""
import torch

from fusedopt._elementwise import ElementwiseStep, new_state_like
from fusedopt.optimizer import class_doc, host_float

_MATH = """\
        g <- -g                                         if maximize
        p <- p * (1 - lr * weight_decay)
        p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g"""


def _check_beta(i, beta):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"Invalid beta parameter at index {i}: {beta} (Lion takes 0 <= beta <= 1)")


class Lion(ElementwiseStep, torch.optim.Optimizer):
    __doc__ = class_doc(
        "Lion (EvoLved Sign Momentum), with gradient clipping inside ``step``.", _MATH,
        """        params, lr (default 1e-4), betas ((0.9, 0.99)), weight_decay (0, decoupled: applied as
        ``p * (1 - lr * weight_decay)``), maximize (False): as the paper's Algorithm 2 and
            lion-pytorch. ``lr`` may be a Tensor. Lion's update has the size of lr in every
            element, so the lr is typically 3-10x smaller than AdamW's and weight_decay 3-10x
            larger, as the paper advises.""",
        "Lion", reference="lion-pytorch (torch.optim has no Lion)")

    _RULE = "lion_rule"
    _STATE = ("exp_avg", None, None)
    _HAS_STEP = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, nonfinite="propagate",
                 backend=None, norm_group=None, stochastic_rounding=False, master_weights=False,
                 state_dtype=None, rounding_seed=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, nonfinite, backend, norm_group)
        self._init_memory(stochastic_rounding, master_weights, state_dtype, rounding_seed)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_beta(0, betas[0])
        _check_beta(1, betas[1])
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        differentiable=False)
        super().__init__(params, defaults)
        self._after_torch_init()

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint from before an option existed
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)

    def _hyper(self, group):
        beta1, beta2 = map(host_float, group["betas"])
        return beta1, 1.0 - beta1, beta2, 1.0 - beta2, host_float(group["weight_decay"])

    def _init_state(self, group, p, state):
        state["exp_avg"] = new_state_like(p)
