"""SGD: the class and its torch path. Math: rules.sgd_rule. Kernel twin: kernels/sgd.py."""
import torch

from fusedopt.optimizer import ClippedStep, class_doc, host_float, kernel_lr, scalar_on
from fusedopt.rules import sgd_rule


def sgd_torch_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
               maximize, grad_scale=None):
    """One SGD step over tensors of one (device, dtype), through torch._fused_sgd_.

    ``momentum_buffers[i]`` is None where a param has no buffer yet (its first step with momentum):
    those params take torch's first-step rule (buf = g) in a call of their own, and their new
    buffers are written into the list. ``grad_scale`` divides every gradient in the same pass.
    """
    if params[0].device.type == "cpu" and params[0].dtype in _CPU_FUSED_BROKEN:
        return sgd_rules_(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                          dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                          maximize=maximize, grad_scale=grad_scale)
    common = dict(weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening,
                  nesterov=nesterov, maximize=maximize, grad_scale=grad_scale, found_inf=None)
    if momentum == 0:
        torch._fused_sgd_(params, grads, [], is_first_step=False, **common)
        return
    new = [i for i, b in enumerate(momentum_buffers) if b is None]
    old = [i for i, b in enumerate(momentum_buffers) if b is not None]
    for i in new:
        momentum_buffers[i] = torch.empty_like(grads[i])
    for idx, first in ((old, False), (new, True)):
        if idx:
            torch._fused_sgd_([params[i] for i in idx], [grads[i] for i in idx],
                              [momentum_buffers[i] for i in idx], is_first_step=first, **common)


# torch 2.13's torch._fused_sgd_ on CPU is wrong for bf16 and fp16 tensors of 16 elements or more
# (its vectorized path): after one plain step (lr 0.1, no momentum) 86 of 100 bf16 elements were
# off by more than 0.02, up to 0.75 after two steps, against the for-loop SGD. Those take the rule.
_CPU_FUSED_BROKEN = (torch.bfloat16, torch.float16)


def sgd_rules_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
               maximize, grad_scale=None):
    """torch._fused_sgd_'s contract through rules.sgd_rule on fp32 copies, one tensor at a time:
    the gradient is divided by ``grad_scale`` and written back; new buffers fill the list."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g32 = g.float()
        if grad_scale is not None:
            g32 = g32 / grad_scale
            g.copy_(g32)
        first = momentum != 0 and momentum_buffers[i] is None
        buf = torch.zeros_like(g32) if first or momentum == 0 else momentum_buffers[i].float()
        new_p, new_buf = sgd_rule(p.float(), g32, buf, lr, momentum,
                                  0.0 if first or momentum == 0 else dampening, weight_decay,
                                  nesterov, maximize)
        p.copy_(new_p)
        if first:
            momentum_buffers[i] = new_buf.to(p.dtype)
        elif momentum != 0:
            momentum_buffers[i].copy_(new_buf)


class SGD(ClippedStep, torch.optim.SGD):
    __doc__ = class_doc(
        "SGD with momentum (optionally Nesterov), as ``torch.optim.SGD``, with clipping in ``step``.",
        r"""            & g \leftarrow -g \text{ if maximize}; \quad g \leftarrow g + \lambda \theta \\
            & b \leftarrow g \text{ (first step)}, \text{ else } b \leftarrow \mu b + (1 - \tau) g \\
            & d \leftarrow g + \mu b \text{ if nesterov, else } b; \quad
              \theta \leftarrow \theta - \gamma d""",
        """        params, lr (default 1e-3), momentum (0), dampening (0), weight_decay (0), nesterov (False),
        maximize, foreach, differentiable, fused: as ``torch.optim.SGD``, with the same defaults
            and the same errors for bad values. ``foreach`` and ``fused`` change nothing here;
            ``differentiable=True`` raises NotImplementedError. The EMA form of momentum,
            ``b = beta * b + (1 - beta) * g``, is ``momentum=beta, dampening=beta`` (torch's first
            step still sets ``b = g``).""",
        "SGD")

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None,
                 max_grad_norm=None, norm_type=2.0, max_grad_value=None, backend=None):
        self._init_clip(max_grad_norm, norm_type, max_grad_value, backend)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._after_torch_init()

    # Triton backend: table row = p, g, buf addresses | numel | first-step flag (kernels/sgd.py)
    _HAS_STEP = False
    _N_TENSOR_COLUMNS = 3

    def _kernel_row(self, group, p):
        """(element tensors, scalar tensors, ints) of p's row; creates the buffer on its first step."""
        if group["momentum"] == 0:
            return [p, p.grad, p], [], [0]  # the buffer column is never read
        state = self.state[p]
        first = "momentum_buffer" not in state
        if first:
            state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return [p, p.grad, state["momentum_buffer"]], [], [int(first)]

    def _launch_update_(self, group, table, clip, grid):
        from fusedopt.kernels.sgd import sgd_triton_
        sgd_triton_(table, clip, lr=kernel_lr(group["lr"], table.device), momentum=group["momentum"],
                    dampening=group["dampening"], weight_decay=host_float(group["weight_decay"]),
                    nesterov=group["nesterov"], maximize=group["maximize"], grid=grid)

    def _update_(self, group, params, grads, grad_scale, device):
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        sgd_torch_(params, grads, buffers, lr=scalar_on(group["lr"], device), momentum=momentum,
                   dampening=group["dampening"], weight_decay=host_float(group["weight_decay"]),
                   nesterov=group["nesterov"], maximize=group["maximize"], grad_scale=grad_scale)
        for p, buf in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buf
