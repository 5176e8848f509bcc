"""Adam / AdamW update pass: one launch per (param group, dtype) reads g, p, exp_avg, exp_avg_sq
(and max_exp_avg_sq) once and writes p and the moments; the clip coefficient comes from the norm
partials, the step count from each tensor's own device counter (advanced by the norm pass). Grads
are never written. Math: fusedopt/rules.adam_*_rule. Torch twin: fusedopt/adam.py."""
import triton
import triton.language as tl

from fusedopt.kernels._common import clamp_value, clip_coef, jit_rule, launch_update, step_guard
from fusedopt.rules import adam_moments_rule, adam_param_rule

adam_moments_rule_tl = jit_rule(adam_moments_rule)
adam_param_rule_tl = jit_rule(adam_param_rule)

# table columns (tl.constexpr: the only globals a compiled kernel may read)
P, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, NUMEL = (tl.constexpr(i) for i in range(6))
ROW = tl.constexpr(6)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, n, coef, inv_scale, max_value, beta1,
                beta2, coupled_wd, decay, step_size, bias_correction2_sqrt, eps,
                VALUE_CLIP: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                MASKED: tl.constexpr):
    """One block; MASKED only for a tensor's last, partial block (full blocks get 128-bit access)."""
    mask, other = (offs < n, 0.0) if MASKED else (None, None)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32) * inv_scale
    g = clamp_value(g, max_value, VALUE_CLIP) * coef
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
    m, v = adam_moments_rule_tl(p, g, m, v, beta1, beta2, coupled_wd, MAXIMIZE)
    if AMSGRAD:
        v_hat = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=other).to(tl.float32), v)
        tl.store(vmax_ptr + offs, v_hat.to(vmax_ptr.dtype.element_ty), mask=mask)
    else:
        v_hat = v
    root = tl.sqrt(v_hat)
    p = adam_param_rule_tl(p, m, root, decay, step_size, bias_correction2_sqrt, eps)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


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
    beta1, beta2, eps,
    weight_decay,      # L2 decay (coupled, Adam) or decoupled (AdamW), by DECOUPLED
    max_norm,          # clip_grad_norm_'s max_norm (NORM != 0)
    max_value,         # clip_grad_value_'s bound (VALUE_CLIP)
    DTYPE: tl.constexpr, NORM: tl.constexpr, VALUE_CLIP: tl.constexpr, UNSCALE: tl.constexpr,
    FOUND_IN: tl.constexpr, DETECT: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
):
    coef = 1.0
    if NORM != 0:
        coef = clip_coef(partials_ptr, n_partials, out_ptr, write_out, max_norm, NORM,
                         NUM_PARTIALS)
    skip = 0.0
    if FOUND_IN or DETECT:
        skip = step_guard(partials_ptr, n_partials, found_ptr, out_ptr, write_out, FOUND_IN,
                          DETECT, NUM_PARTIALS)
    inv_scale = 1.0
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    if DECOUPLED:
        coupled_wd = 0.0
        decay = 1.0 - lr * weight_decay
    else:
        coupled_wd = weight_decay
        decay = 1.0
    log2_beta1 = tl.log2(beta1)
    log2_beta2 = tl.log2(beta2)
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
            step = tl.load(step_ptr)
            step_size = lr / (1.0 - tl.exp2(step * log2_beta1))                 # lr / (1 - beta1 ** step)
            bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))  # sqrt(1 - beta2 ** step)
            p_ptr = tl.multiple_of(tl.load(row + P).to(tl.pointer_type(DTYPE)), 16)
            g_ptr = tl.multiple_of(tl.load(grad_ptrs_ptr + t).to(tl.pointer_type(DTYPE)), 16)
            m_ptr = tl.multiple_of(tl.load(row + EXP_AVG).to(tl.pointer_type(DTYPE)), 16)
            v_ptr = tl.multiple_of(tl.load(row + EXP_AVG_SQ).to(tl.pointer_type(DTYPE)), 16)
            vmax_ptr = tl.multiple_of(tl.load(row + MAX_EXP_AVG_SQ).to(tl.pointer_type(DTYPE)), 16)
            offs = start + tl.arange(0, BLOCK)
            if start + BLOCK <= n:
                _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, n, coef, inv_scale,
                            max_value, beta1, beta2, coupled_wd, decay, step_size,
                            bias_correction2_sqrt, eps, VALUE_CLIP, AMSGRAD, MAXIMIZE, False)
            else:
                _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, n, coef, inv_scale,
                            max_value, beta1, beta2, coupled_wd, decay, step_size,
                            bias_correction2_sqrt, eps, VALUE_CLIP, AMSGRAD, MAXIMIZE, True)


def adam_triton_(table, clip, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                 decoupled_weight_decay, grid):
    """Launch the Adam/AdamW update over ``table`` (columns p, exp_avg, exp_avg_sq, max_exp_avg_sq
    (p's address when not amsgrad), step, numel; grads apart); ``clip`` and ``lr`` as in _common.launch_update."""
    launch_update(_adam_kernel, table, clip, grid, lr, (beta1, beta2, eps, weight_decay),
                  AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay)
