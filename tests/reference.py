"""A float64 reference step built from fusedopt.rules, one tensor at a time.

It proves that rules.py (the math the Triton kernels share) and each class's declaration of its
hyperparameters, flags and state (fusedopt/_elementwise.py) are torch.optim's math, and serves as
the fp64 oracle for low-precision error bounds. Deliberately plain and slow.
"""
import math

import torch

import fusedopt
from fusedopt import rules


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
    """One step of fusedopt.<kind> (its rule and declaration, in float64) on ``params`` in place;
    ``state`` is a dict kept between calls."""
    decl = getattr(fusedopt, kind)([torch.zeros(1, dtype=torch.float64)], **hp)
    group = decl.param_groups[0]
    rule = getattr(rules, decl._RULE)
    step_rule = getattr(rules, decl._STEP_RULE) if decl._STEP_RULE else None
    hyper = list(map(float, decl._hyper(group))) + [0.0] * (8 - len(decl._hyper(group)))
    flags = list(decl._flags(group)) + [False] * (3 - len(decl._flags(group)))
    columns = decl._columns(group)
    lr = float(group["lr"])
    with_grad = [p for p in params if p.grad is not None]
    grads = clipped_grads([p.grad for p in with_grad], **clip)
    for p, g in zip(with_grad, grads):
        st = state.setdefault(p, {})
        x = p.detach().double()
        first = 0
        if kind == "SGD":
            first = int("momentum_buffer" not in st)
            st.setdefault("momentum_buffer", torch.zeros_like(x))
        elif not st:
            decl._init_state(group, x, st)
            st["step"] = torch.zeros((), dtype=torch.float64)
            if decl._SCALAR_STATE:  # fp32, as torch keeps it
                st[decl._SCALAR_STATE] = st[decl._SCALAR_STATE].float()
        values = [st[key] if columns >> i & 1 else 0.0 for i, key in enumerate(decl._STATE)]
        c = (0.0,) * 4
        if decl._HAS_STEP:
            st["step"] = st["step"] + 1
            if step_rule is not None:
                scalar = st[decl._SCALAR_STATE].double() if decl._SCALAR_STATE else 0.0
                c = step_rule(st["step"], scalar, lr, *hyper)
                if decl._SCALAR_STATE:
                    st[decl._SCALAR_STATE] = c[3].float()
        x, *new = rule(x, g, *values, *c, first, lr, *hyper, *flags)
        for i, key in enumerate(decl._STATE):
            if columns >> i & 1:
                st[key] = new[i]
        p.data.copy_(x)
