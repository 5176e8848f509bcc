"""The math of each optimizer, once, as plain functions on values using only operators.

The same functions run on torch tensors (tests/reference.py walks them in float64 as the oracle of
the torch path) and, through ``triton.jit``, inside the kernels. ``sqrt`` and ``maximum`` are not
operators, so the callers write those few lines themselves, in the order given in each docstring.
Every gradient passed here is already value-clamped and norm-clipped.
"""


def sgd_rule(p, g, buf, lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize):
    """One SGD step on fp32 values, as torch.optim.SGD. Returns (new p, new buf).

    ``one_minus_dampening`` is 1 - dampening formed by the caller in float64, as torch forms its
    ``alpha`` (in fp32, 1 - fp32(0.9) is 2.4e-7 off 0.1). First step with momentum: the caller
    passes buf = 0 and one_minus_dampening = 1.0, which gives torch's ``buf = g`` (torch clones
    the gradient on the first step and ignores dampening there). Without momentum: momentum = 0.0
    and one_minus_dampening = 1.0 make ``buf = g`` and so ``d = g``.
    """
    if maximize:
        g = -g
    g = g + weight_decay * p
    buf = momentum * buf + one_minus_dampening * g
    if nesterov:
        d = g + momentum * buf
    else:
        d = buf
    return p - lr * d, buf


def adam_moments_rule(p, g, exp_avg, exp_avg_sq, beta2, one_minus_beta1, one_minus_beta2,
                      weight_decay, maximize):
    """Adam's moment update, as torch.optim.Adam. Returns (new exp_avg, new exp_avg_sq).

    ``weight_decay`` is the coupled (L2) decay: the caller passes 0.0 for AdamW's decoupled decay,
    which ``adam_param_rule`` applies through ``decay``. exp_avg uses torch's lerp form.
    ``1 - beta`` comes from the caller, formed in float64 as torch forms it: in fp32,
    1 - fp32(0.999) is 1.3e-5 off 0.001.
    """
    if maximize:
        g = -g
    g = g + weight_decay * p
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    return exp_avg, exp_avg_sq


def adam_param_rule(p, exp_avg, root, decay, step_size, bias_correction2_sqrt, eps):
    """Adam's parameter write, as torch.optim.Adam. Returns the new p.

    The caller forms, between the two rules:
        v    = maximum(max_exp_avg_sq, exp_avg_sq)   # AMSGrad only; also the new max_exp_avg_sq
        root = sqrt(v)                               # v = exp_avg_sq without AMSGrad
    and passes host scalars: decay = 1 - lr * weight_decay (decoupled) or 1.0,
    step_size = lr / (1 - beta1 ** step), bias_correction2_sqrt = sqrt(1 - beta2 ** step).
    """
    return p * decay - step_size * exp_avg / (root / bias_correction2_sqrt + eps)
