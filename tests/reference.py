"""A float64 reference step built from fusedopt.rules, one tensor at a time.

It proves that rules.py (the math the Triton kernels share) is torch.optim's math, and later serves
as the fp64 oracle for low-precision error bounds. Deliberately plain and slow.
"""
import math

import torch

from fusedopt.rules import adam_moments_rule, adam_param_rule, sgd_rule


def clipped_grads(grads, max_grad_norm=None, norm_type=2.0, max_grad_value=None):
    """clip_grad_value_ then clip_grad_norm_, written out on float64 copies."""
    grads = [g.double() for g in grads]
    if max_grad_value is not None:
        grads = [g.clamp(-max_grad_value, max_grad_value) for g in grads]
    if max_grad_norm is not None:
        if norm_type == math.inf:
            norm = max((g.abs().max() for g in grads if g.numel()), default=torch.tensor(0.0))
        else:
            norm = sum((g * g).sum() for g in grads).sqrt()
        coef = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        grads = [g * coef for g in grads]
    return grads


def reference_step(kind, params, state, hp, clip):
    """One step of ``kind`` ("SGD", "Adam", "AdamW") on ``params`` in place; ``state`` is a dict."""
    with_grad = [p for p in params if p.grad is not None]
    grads = clipped_grads([p.grad for p in with_grad], **clip)
    for p, g in zip(with_grad, grads):
        st = state.setdefault(p, {})
        x = p.detach().double()
        if kind == "SGD":
            momentum = hp.get("momentum", 0.0)
            first = "momentum_buffer" not in st
            buf = torch.zeros_like(x) if first else st["momentum_buffer"]
            dampening = 0.0 if first or momentum == 0 else hp.get("dampening", 0.0)
            x, buf = sgd_rule(x, g, buf, hp["lr"], momentum, 1.0 - dampening,
                              hp.get("weight_decay", 0.0),
                              hp.get("nesterov", False), hp.get("maximize", False))
            if momentum != 0:
                st["momentum_buffer"] = buf
        else:
            decoupled = kind == "AdamW" or hp.get("decoupled_weight_decay", False)
            beta1, beta2 = hp.get("betas", (0.9, 0.999))
            wd = hp.get("weight_decay", 0.01 if kind == "AdamW" else 0.0)
            lr = hp["lr"]
            if not st:
                st.update(step=0, exp_avg=torch.zeros_like(x), exp_avg_sq=torch.zeros_like(x),
                          max_exp_avg_sq=torch.zeros_like(x))
            st["step"] += 1
            t = st["step"]
            m, v = adam_moments_rule(x, g, st["exp_avg"], st["exp_avg_sq"], beta2, 1.0 - beta1,
                                     1.0 - beta2, 0.0 if decoupled else wd,
                                     hp.get("maximize", False))
            if hp.get("amsgrad", False):
                v_hat = torch.maximum(st["max_exp_avg_sq"], v)
                st["max_exp_avg_sq"] = v_hat
            else:
                v_hat = v
            root = v_hat.sqrt()
            x = adam_param_rule(x, m, root, 1.0 - lr * wd if decoupled else 1.0,
                                lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t), hp.get("eps", 1e-8))
            st["exp_avg"], st["exp_avg_sq"] = m, v
        p.data.copy_(x)
