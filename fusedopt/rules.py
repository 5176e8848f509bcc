"""The math of each elementwise optimizer, once: the same functions run on torch tensors (the torch
path, and tests/reference.py's float64 oracle) and, jitted, inside the one update kernel
(fusedopt/kernels/update.py), which takes a rule as a ``tl.constexpr`` argument.

Every optimizer is two functions with fixed signatures, so that one kernel skeleton calls them all:

``<name>_step(t, x, lr, h0, ..., h7) -> (c0, c1, c2, c3)``
    The per-tensor scalars that depend on the step count ``t`` (bias corrections, schedules), in
    float64 once per block, as torch forms them on the host in float64. ``t`` is the count after
    this step's increment; ``lr`` and ``h`` are float64 here. ``x``: the optimizer's per-tensor
    scalar state before this step (NAdam's mu_product), whose new value is ``c3``; 0.0 without
    one. Only for optimizers with a step.
``<name>_rule(p, g, s0, s1, s2, c0, c1, c2, c3, first, lr, h0, ..., h7, F0, F1, F2)
        -> (p, s0, s1, s2)``
    One step on fp32 values (fp64 for fp64 params): ``g`` is already unscaled, value-clamped and
    norm-clipped; ``s0..s2`` the state columns the class declares (unused ones are 0.0 and
    returned as they came); ``c`` the step scalars as fp32; ``first`` 1 on a tensor's first SGD
    step (buffer not yet made), else 0; ``h`` the hyperparameters (fp32 in the kernel); ``F`` the
    compile-time flags (maximize, amsgrad, ...).

``h`` and ``F`` are what the class's ``_hyper(group)`` and ``_flags(group)`` return
(fusedopt/_elementwise.py), formed on the host in float64: ``1 - beta`` is formed there (in fp32,
1 - fp32(0.999) is 1.3e-5 off 0.001) and ``ln(beta)`` too.

Only operators, the ``tl`` functions sqrt, exp, abs, where, maximum and ``sign`` appear. On fp32,
tl.sqrt compiles to ``sqrt.approx.ftz.f32`` on sm_80/90 (triton 3.9) and is numpy's correctly
rounded sqrt under the interpreter; the torch twin rounds correctly too (_torch_lang.sqrt), so
that the torch path and the interpreter agree bit for bit. tl.sqrt_rn (IEEE, as torch's CUDA ops)
gave fp16 Adagrad's update an 8-byte stack frame on sm_90 (its slow-path call), so the kernels
keep the approximate one: within ~1 ulp of IEEE. ``tl`` is
triton.language in the kernel and fusedopt/_torch_lang.py here. ``sign`` is torch.sign here
and kernels/_common.sign (the same values, NaN kept) in the kernels, which triton.language lacks:
on the CPU torch path two torch.where calls cost 20x one torch.sign (Lion took 714 ms a step on
GPT-2 small's shapes that way). Where a rule writes ``x + w * (y -
x)`` it is torch's ``lerp_``; other forms follow torch.optim's single-tensor code, op by op.
"""
from fusedopt import _torch_lang as tl

sign = tl.sign


def one_minus_pow(t, ln_beta):
    """1 - beta ** t in float64, as torch forms it on the host (ln_beta = -inf for beta = 0)."""
    return 1.0 - tl.exp(t * ln_beta)


# -- SGD ------------------------------------------------------------------------------------------
# s0 momentum_buffer; h momentum, 1 - dampening; weight_decay; F HAS_MOMENTUM, NESTEROV, MAXIMIZE

def sgd_rule(p, g, buf, s1, s2, c0, c1, c2, c3, first, lr, momentum, one_minus_dampening,
             weight_decay, h3, h4, h5, h6, h7, HAS_MOMENTUM, NESTEROV, MAXIMIZE):
    """torch.optim.SGD. First step with momentum (``first``): torch sets buf = g, dampening
    ignored. Without momentum d = g."""
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    d = g
    if HAS_MOMENTUM:
        if first != 0:
            buf = g
        else:
            buf = momentum * buf + one_minus_dampening * g
        if NESTEROV:
            d = g + momentum * buf
        else:
            d = buf
    return p - lr * d, buf, s1, s2


# -- Adam / AdamW ---------------------------------------------------------------------------------
# s0 exp_avg, s1 exp_avg_sq, s2 max_exp_avg_sq; h beta2, 1 - beta1, 1 - beta2, ln beta1, ln beta2,
# eps, weight_decay; F AMSGRAD, MAXIMIZE, DECOUPLED

def adam_step(t, x, lr, beta2, one_minus_beta1, one_minus_beta2, ln_beta1, ln_beta2, eps,
              weight_decay, h7):
    """(lr / (1 - beta1 ** t), sqrt(1 - beta2 ** t))"""
    return lr / one_minus_pow(t, ln_beta1), tl.sqrt(one_minus_pow(t, ln_beta2)), 0.0, 0.0


def adam_rule(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, bias_correction2_sqrt, c2,
              c3, first, lr, beta2, one_minus_beta1, one_minus_beta2, ln_beta1, ln_beta2, eps,
              weight_decay, h7, AMSGRAD, MAXIMIZE, DECOUPLED):
    """torch.optim.Adam (DECOUPLED: AdamW's decay, 1 - lr * weight_decay on p)."""
    if MAXIMIZE:
        g = -g
    decay = 1.0
    if DECOUPLED:
        decay = 1.0 - lr * weight_decay
    else:
        g = g + weight_decay * p
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    v = exp_avg_sq
    if AMSGRAD:  # NaN kept, as torch.maximum (PTX max.f32 would drop it)
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        v = max_exp_avg_sq
    p = p * decay - step_size * exp_avg / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    return p, exp_avg, exp_avg_sq, max_exp_avg_sq


# -- Adagrad --------------------------------------------------------------------------------------
# s0 sum; h lr_decay, eps, weight_decay; F MAXIMIZE

def adagrad_step(t, x, lr, lr_decay, eps, weight_decay, h3, h4, h5, h6, h7):
    """(lr / (1 + (t - 1) * lr_decay),)"""
    return lr / (1.0 + (t - 1.0) * lr_decay), 0.0, 0.0, 0.0


def adagrad_rule(p, g, state_sum, s1, s2, clr, c1, c2, c3, first, lr, lr_decay, eps, weight_decay,
                 h3, h4, h5, h6, h7, MAXIMIZE, F1, F2):
    """torch.optim.Adagrad (dense)."""
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    state_sum = state_sum + g * g
    return p - clr * (g / (tl.sqrt(state_sum) + eps)), state_sum, s1, s2


# -- RMSprop --------------------------------------------------------------------------------------
# s0 square_avg, s1 momentum_buffer, s2 grad_avg; h alpha, 1 - alpha, eps, weight_decay, momentum;
# F CENTERED, HAS_MOMENTUM, MAXIMIZE. Its step count changes nothing in the math.

def rmsprop_rule(p, g, square_avg, buf, grad_avg, c0, c1, c2, c3, first, lr, alpha,
                 one_minus_alpha, eps, weight_decay, momentum, h5, h6, h7, CENTERED, HAS_MOMENTUM,
                 MAXIMIZE):
    """torch.optim.RMSprop."""
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    if CENTERED:
        grad_avg = grad_avg + one_minus_alpha * (g - grad_avg)
        avg = tl.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = tl.sqrt(square_avg) + eps
    if HAS_MOMENTUM:
        buf = momentum * buf + g / avg
        p = p - lr * buf
    else:
        p = p - lr * (g / avg)
    return p, square_avg, buf, grad_avg


# -- Adamax ---------------------------------------------------------------------------------------
# s0 exp_avg, s1 exp_inf; h 1 - beta1, beta2, ln beta1, eps, weight_decay; F MAXIMIZE

def adamax_step(t, x, lr, one_minus_beta1, beta2, ln_beta1, eps, weight_decay, h5, h6, h7):
    """(lr / (1 - beta1 ** t),)"""
    return lr / one_minus_pow(t, ln_beta1), 0.0, 0.0, 0.0


def adamax_rule(p, g, exp_avg, exp_inf, s2, clr, c1, c2, c3, first, lr, one_minus_beta1, beta2,
                ln_beta1, eps, weight_decay, h5, h6, h7, MAXIMIZE, F1, F2):
    """torch.optim.Adamax."""
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_inf = tl.maximum(beta2 * exp_inf, tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL)
    return p - clr * (exp_avg / exp_inf), exp_avg, exp_inf, s2


def decay_and_moments(p, g, exp_avg, exp_avg_sq, lr, one_minus_beta1, beta2, one_minus_beta2,
                      weight_decay, DECOUPLED, MAXIMIZE):
    """The start RAdam and NAdam share with torch's: maximize, weight decay (decoupled on p, or
    L2 into g), then Adam's moments. Returns (p, g, exp_avg, exp_avg_sq)."""
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g
    return p, g, exp_avg, exp_avg_sq


# -- RAdam ----------------------------------------------------------------------------------------
# s0 exp_avg, s1 exp_avg_sq; h 1 - beta1, beta2, 1 - beta2, ln beta1, ln beta2, eps, weight_decay;
# F DECOUPLED, MAXIMIZE

def radam_step(t, x, lr, one_minus_beta1, beta2, one_minus_beta2, ln_beta1, ln_beta2, eps,
               weight_decay, h7):
    """(lr / (1 - beta1 ** t), rectification * sqrt(1 - beta2 ** t), 1.0 where rectified, else
    0.0). rho_t = rho_inf - 2 t beta2 ** t / (1 - beta2 ** t) cancels to a few units out of
    2 / (1 - beta2): in fp32 it would lose 4 digits, here float64 keeps torch's."""
    bias_correction2 = one_minus_pow(t, ln_beta2)
    rho_inf = 2.0 / one_minus_beta2 - 1.0
    rho_t = rho_inf - 2.0 * t * (1.0 - bias_correction2) / bias_correction2
    rectified = rho_t > 5.0
    safe = tl.where(rectified, rho_t, 5.0)  # no sqrt of a negative where not rectified
    rect = tl.sqrt((safe - 4.0) * (safe - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe))
    return (lr / one_minus_pow(t, ln_beta1), rect * tl.sqrt(bias_correction2),
            tl.where(rectified, 1.0, 0.0), 0.0)


def radam_rule(p, g, exp_avg, exp_avg_sq, s2, step_size, rect_bc2_sqrt, rectified, c3, first, lr,
               one_minus_beta1, beta2, one_minus_beta2, ln_beta1, ln_beta2, eps, weight_decay, h7,
               DECOUPLED, MAXIMIZE, F2):
    """torch.optim.RAdam: the adaptive step once rho_t > 5, plain momentum before."""
    p, g, exp_avg, exp_avg_sq = decay_and_moments(p, g, exp_avg, exp_avg_sq, lr, one_minus_beta1,
                                                  beta2, one_minus_beta2, weight_decay,
                                                  DECOUPLED, MAXIMIZE)
    adaptive = rect_bc2_sqrt / (tl.sqrt(exp_avg_sq) + eps)
    d = tl.where(rectified != 0.0, step_size * exp_avg * adaptive, step_size * exp_avg)
    return p - d, exp_avg, exp_avg_sq, s2


# -- Lion -----------------------------------------------------------------------------------------
# s0 exp_avg; h beta1, 1 - beta1, beta2, 1 - beta2, weight_decay; F MAXIMIZE

def lion_rule(p, g, exp_avg, s1, s2, c0, c1, c2, c3, first, lr, beta1, one_minus_beta1, beta2,
              one_minus_beta2, weight_decay, h5, h6, h7, MAXIMIZE, F1, F2):
    """Lion (Chen et al. 2023, Algorithm 2), as lion-pytorch's reference step: decoupled decay
    p *= 1 - lr * wd; update = sign(beta1 * m + (1 - beta1) * g); p -= lr * update;
    m = beta2 * m + (1 - beta2) * g. sign(NaN) is NaN, as torch.sign."""
    if MAXIMIZE:
        g = -g
    p = p * (1.0 - lr * weight_decay)
    update = sign(beta1 * exp_avg + one_minus_beta1 * g)
    exp_avg = beta2 * exp_avg + one_minus_beta2 * g
    return p - lr * update, exp_avg, s1, s2


# -- NAdam ----------------------------------------------------------------------------------------
# s0 exp_avg, s1 exp_avg_sq; scalar state mu_product; h beta1, 1 - beta1, beta2, 1 - beta2,
# ln beta2, eps, weight_decay, momentum_decay; F DECOUPLED, MAXIMIZE

def nadam_step(t, x, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, ln_beta2, eps,
               weight_decay, momentum_decay):
    """(lr (1 - mu_t) / (1 - P_t), lr mu_{t+1} / (1 - P_t mu_{t+1}), 1 - beta2 ** t, P_t) with
    mu_t = beta1 (1 - 0.5 * 0.96 ** (t * momentum_decay)) and P_t = x * mu_t the running product
    (torch's mu_product). torch keeps P in fp32 and multiplies there, its mu cast to fp32 first:
    the product of two fp32 values is exact in float64, so rounding it once to fp32 is torch's
    value bit for bit; the rest is float64 as torch's host math."""
    ln_096 = -0.040821994520255166  # ln(0.96)
    mu = beta1 * (1.0 - 0.5 * tl.exp(t * momentum_decay * ln_096))
    mu_next = beta1 * (1.0 - 0.5 * tl.exp((t + 1.0) * momentum_decay * ln_096))
    product = (x * mu.to(tl.float32).to(tl.float64)).to(tl.float32).to(tl.float64)
    return (lr * (1.0 - mu) / (1.0 - product), lr * mu_next / (1.0 - product * mu_next),
            one_minus_pow(t, ln_beta2), product)


def nadam_rule(p, g, exp_avg, exp_avg_sq, s2, grad_coef, avg_coef, bias_correction2, c3, first,
               lr, beta1, one_minus_beta1, beta2, one_minus_beta2, ln_beta2, eps, weight_decay,
               momentum_decay, DECOUPLED, MAXIMIZE, F2):
    """torch.optim.NAdam (Dozat 2016), momentum_decay schedule and all."""
    p, g, exp_avg, exp_avg_sq = decay_and_moments(p, g, exp_avg, exp_avg_sq, lr, one_minus_beta1,
                                                  beta2, one_minus_beta2, weight_decay,
                                                  DECOUPLED, MAXIMIZE)
    denom = tl.sqrt(exp_avg_sq / bias_correction2) + eps
    p = p - grad_coef * (g / denom)
    p = p - avg_coef * (exp_avg / denom)
    return p, exp_avg, exp_avg_sq, s2
