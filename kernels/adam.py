"""Adam / AdamW update pass: one launch per (param group, dtype) reads g, p, exp_avg, exp_avg_sq
(and max_exp_avg_sq) once and writes p and the moments; the clip coefficient comes from the norm
partials, the step count from each tensor's own device counter (advanced by the norm pass). Grads
are never written. Math: fusedopt/rules.adam_*_rule. Torch twin: fusedopt/adam.py."""
import math

import triton
import triton.language as tl

from fusedopt.kernels._common import (clamp_value, jit_rule, launch_scalars, launch_update,
                                      round_to)
from fusedopt.rules import adam_moments_rule, adam_param_rule

adam_moments_rule_tl = jit_rule(adam_moments_rule)
adam_param_rule_tl = jit_rule(adam_param_rule)

# table columns (tl.constexpr: the only globals a compiled kernel may read)
P, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, NUMEL = (tl.constexpr(i) for i in range(6))
ROW = tl.constexpr(6)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, n, coef, inv_scale, max_value, beta2,
                one_minus_beta1, one_minus_beta2, coupled_wd, decay, step_size,
                bias_correction2_sqrt, eps,
                VALUE_CLIP: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                MASKED: tl.constexpr):
    """One block; MASKED only for a tensor's last, partial block (full blocks get 128-bit access)."""
    mask, other = (offs < n, 0.0) if MASKED else (None, None)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32) * inv_scale
    g = clamp_value(g, max_value, VALUE_CLIP) * coef
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
    m, v = adam_moments_rule_tl(p, g, m, v, beta2, one_minus_beta1, one_minus_beta2, coupled_wd,
                                MAXIMIZE)
    if AMSGRAD:
        # NaN-propagating, as torch.maximum: a plain tl.maximum is PTX max.f32, which drops a NaN
        # v (and the interpreter's np.fmax too). Inline, not _common.max_nan: one nested call
        # fewer per block under the interpreter.
        v_hat = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=other).to(tl.float32), v,
                           propagate_nan=tl.PropagateNan.ALL)
    else:
        v_hat = v
    root = tl.sqrt(v_hat)
    p = adam_param_rule_tl(p, m, root, decay, step_size, bias_correction2_sqrt, eps)
    dtype = p_ptr.dtype.element_ty  # every pointer of the table has the params' dtype
    if dtype != tl.float32:  # fp32 is stored as computed: see _common.round_to on the cost
        p, m, v = round_to(p, dtype), round_to(m, dtype), round_to(v, dtype)
        if AMSGRAD:
            v_hat = round_to(v_hat, dtype)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, v_hat, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)


@triton.jit
def _bias_corrections(step, ln_beta1, ln_beta2):
    """(1 - beta1 ** step, 1 - beta2 ** step) to a few fp32 ulps, as -expm1(step * ln(beta)) with
    ln(beta) formed on the host in float64. 1 - exp(y) cancels for y near 0 (in fp32,
    1 - 0.999 ** 1 came out 6e-5 off and Adam drifted 7e-6 * lr a step further from float64 Adam
    than torch), so |y| < 0.5 takes expm1's Taylor series to y ** 9 (truncation < 3e-10)."""
    y1 = step * ln_beta1
    y2 = step * ln_beta2
    u1 = tl.maximum(y1, -0.5)  # the series' argument, kept where it is used (no overflow)
    u2 = tl.maximum(y2, -0.5)
    s1 = u1 * (1 + u1 * (1 / 2 + u1 * (1 / 6 + u1 * (1 / 24 + u1 * (1 / 120 + u1 * (
        1 / 720 + u1 * (1 / 5040 + u1 * (1 / 40320 + u1 * (1 / 362880)))))))))
    s2 = u2 * (1 + u2 * (1 / 2 + u2 * (1 / 6 + u2 * (1 / 24 + u2 * (1 / 120 + u2 * (
        1 / 720 + u2 * (1 / 5040 + u2 * (1 / 40320 + u2 * (1 / 362880)))))))))
    e1 = tl.where(y1 > -0.5, s1, tl.exp(y1) - 1.0)
    e2 = tl.where(y2 > -0.5, s2, tl.exp(y2) - 1.0)
    return -e1, -e2


@triton.jit(do_not_specialize=["n_blocks", "n_partials", "write_out"])
def _adam_kernel(
    table_ptr,         # int64 [n_tensors, 6]: p, exp_avg, exp_avg_sq, max_exp_avg_sq, step
                       #   addresses, numel
    grad_ptrs_ptr,     # int64 [n_tensors]: grad addresses (they change every step: their own copy)
    block_tensor_ptr,  # int32 [n_blocks]: the tensor of each block
    block_index_ptr,   # int32 [n_blocks]: the block's index inside its tensor
    partials_ptr,      # fp32: every dtype group's norm partials (NORM), then inf/NaN ones (DETECT)
    out_ptr,           # fp32 [2]: total norm, skip flag; stored by program 0 when write_out
    lr_ptr,            # fp32 [1]: a Tensor lr (LR_FROM_PTR)
    inv_scale_ptr,     # fp32 [1]: 1 / GradScaler's scale (UNSCALE)
    found_ptr,         # fp32 [1]: GradScaler's found_inf (FOUND_IN)
    n_blocks, n_partials, write_out,
    lr,                # float lr (not LR_FROM_PTR)
    beta2,
    one_minus_beta1, one_minus_beta2, ln_beta1, ln_beta2,  # formed on the host in float64
    eps,
    weight_decay,      # L2 decay (coupled, Adam) or decoupled (AdamW), by DECOUPLED
    max_norm,          # clip_grad_norm_'s max_norm (NORM != 0)
    max_value,         # clip_grad_value_'s bound (VALUE_CLIP)
    DTYPE: tl.constexpr, NORM: tl.constexpr, VALUE_CLIP: tl.constexpr, UNSCALE: tl.constexpr,
    FOUND_IN: tl.constexpr, DETECT: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
):
    coef, skip, inv_scale, lr = launch_scalars(
        partials_ptr, n_partials, out_ptr, write_out, max_norm, found_ptr, inv_scale_ptr, lr_ptr,
        lr, NORM, FOUND_IN, DETECT, UNSCALE, LR_FROM_PTR, NUM_PARTIALS)
    if DECOUPLED:
        coupled_wd = 0.0
        decay = 1.0 - lr * weight_decay
    else:
        coupled_wd = weight_decay
        decay = 1.0
    for b in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t = tl.load(block_tensor_ptr + b).to(tl.int64)
        row = table_ptr + t * ROW
        start = tl.load(block_index_ptr + b).to(tl.int64) * BLOCK
        step_ptr = tl.load(row + STEP).to(tl.pointer_type(tl.float32))
        if skip != 0:
            # the norm pass advanced the counter; a skipped step takes it back (torch's fused Adam
            # does the same under GradScaler). Nothing else reads it in this launch.
            if start == 0:
                tl.store(step_ptr, tl.load(step_ptr) - 1.0)
        else:
            n = tl.load(row + NUMEL)
            bias_correction1, bias_correction2 = _bias_corrections(tl.load(step_ptr), ln_beta1,
                                                                   ln_beta2)
            step_size = lr / bias_correction1
            bias_correction2_sqrt = tl.sqrt(bias_correction2)
            p_ptr = tl.multiple_of(tl.load(row + P).to(tl.pointer_type(DTYPE)), 16)
            g_ptr = tl.multiple_of(tl.load(grad_ptrs_ptr + t).to(tl.pointer_type(DTYPE)), 16)
            m_ptr = tl.multiple_of(tl.load(row + EXP_AVG).to(tl.pointer_type(DTYPE)), 16)
            v_ptr = tl.multiple_of(tl.load(row + EXP_AVG_SQ).to(tl.pointer_type(DTYPE)), 16)
            vmax_ptr = tl.multiple_of(tl.load(row + MAX_EXP_AVG_SQ).to(tl.pointer_type(DTYPE)), 16)
            offs = start + tl.arange(0, BLOCK)
            if start + BLOCK <= n:
                _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, n, coef, inv_scale,
                            max_value, beta2, one_minus_beta1, one_minus_beta2, coupled_wd, decay,
                            step_size, bias_correction2_sqrt, eps, VALUE_CLIP, AMSGRAD, MAXIMIZE,
                            False)
            else:
                _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, n, coef, inv_scale,
                            max_value, beta2, one_minus_beta1, one_minus_beta2, coupled_wd, decay,
                            step_size, bias_correction2_sqrt, eps, VALUE_CLIP, AMSGRAD, MAXIMIZE,
                            True)


def adam_triton_(table, clip, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                 decoupled_weight_decay, grid, num_warps):
    """Launch the Adam/AdamW update over ``table`` (columns p, exp_avg, exp_avg_sq, max_exp_avg_sq
    (p's address when not amsgrad), step, numel; grads apart); ``clip`` and ``lr`` as in _common.launch_update."""
    launch_update(_adam_kernel, table, clip, grid, lr,
                  (beta2, 1.0 - beta1, 1.0 - beta2, _ln(beta1), _ln(beta2), eps, weight_decay),
                  num_warps,
                  AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay)


def _ln(beta: float) -> float:
    """ln(beta) in float64 for _bias_corrections; beta = 0 (allowed by torch) gives -inf, so
    beta ** step = 0 and the correction is 1."""
    return math.log(beta) if beta > 0 else -math.inf
