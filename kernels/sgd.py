"""SGD update pass: one launch per (param group, dtype) reads g, p and the momentum buffer once and
writes p and the buffer; the clip coefficient comes from the norm partials. Grads are never
written. Math: fusedopt/rules.sgd_rule. Torch twin: fusedopt/sgd.py."""
import triton
import triton.language as tl

from fusedopt.kernels._common import (clamp_value, jit_rule, launch_scalars, launch_update,
                                      round_to)
from fusedopt.rules import sgd_rule

sgd_rule_tl = jit_rule(sgd_rule)

# table columns (tl.constexpr: the only globals a compiled kernel may read)
P, BUF, NUMEL, FIRST = (tl.constexpr(i) for i in range(4))
ROW = tl.constexpr(4)


@triton.jit
def _sgd_block(p_ptr, g_ptr, buf_ptr, offs, n, coef, inv_scale, first, lr, momentum,
               one_minus_dampening, weight_decay, max_value, VALUE_CLIP: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               MASKED: tl.constexpr):
    """One block; MASKED only for a tensor's last, partial block (full blocks get 128-bit access)."""
    mask, other = (offs < n, 0.0) if MASKED else (None, None)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32) * inv_scale
    g = clamp_value(g, max_value, VALUE_CLIP) * coef
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    if HAS_MOMENTUM:
        # first step: torch sets buf = g, which the rule gives with buf = 0 and no dampening
        buf = tl.load(buf_ptr + offs, mask=mask, other=other).to(tl.float32)
        buf = tl.where(first != 0, 0.0, buf)
        p, buf = sgd_rule_tl(p, g, buf, lr, momentum, tl.where(first != 0, 1.0, one_minus_dampening),
                             weight_decay, NESTEROV, MAXIMIZE)
    else:
        p, buf = sgd_rule_tl(p, g, 0.0, lr, 0.0, 1.0, weight_decay, False, MAXIMIZE)
    dtype = p_ptr.dtype.element_ty  # the buffer has the param's dtype
    if dtype != tl.float32:  # fp32 is stored as computed: see _common.round_to on the cost
        p = round_to(p, dtype)
        if HAS_MOMENTUM:
            buf = round_to(buf, dtype)
    if HAS_MOMENTUM:
        tl.store(buf_ptr + offs, buf, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)


@triton.jit(do_not_specialize=["n_blocks", "n_partials", "write_out"])
def _sgd_kernel(
    table_ptr,         # int64 [n_tensors, 4]: param and buffer addresses, numel, first-step flag
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
    momentum,
    one_minus_dampening,  # 1 - dampening, formed on the host in float64
    weight_decay,
    max_norm,          # clip_grad_norm_'s max_norm (NORM != 0)
    max_value,         # clip_grad_value_'s bound (VALUE_CLIP)
    DTYPE: tl.constexpr, NORM: tl.constexpr, VALUE_CLIP: tl.constexpr, UNSCALE: tl.constexpr,
    FOUND_IN: tl.constexpr, DETECT: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    coef, skip, inv_scale, lr = launch_scalars(
        partials_ptr, n_partials, out_ptr, write_out, max_norm, found_ptr, inv_scale_ptr, lr_ptr,
        lr, NORM, FOUND_IN, DETECT, UNSCALE, LR_FROM_PTR, NUM_PARTIALS)
    for b in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t = tl.load(block_tensor_ptr + b).to(tl.int64)
        row = table_ptr + t * ROW
        start = tl.load(block_index_ptr + b).to(tl.int64) * BLOCK
        n = tl.load(row + NUMEL)
        p_ptr = tl.multiple_of(tl.load(row + P).to(tl.pointer_type(DTYPE)), 16)
        g_ptr = tl.multiple_of(tl.load(grad_ptrs_ptr + t).to(tl.pointer_type(DTYPE)), 16)
        buf_ptr = tl.multiple_of(tl.load(row + BUF).to(tl.pointer_type(DTYPE)), 16)
        first = tl.load(row + FIRST)
        offs = start + tl.arange(0, BLOCK)
        if skip != 0:
            if HAS_MOMENTUM:
                if first != 0:  # a buffer made for a skipped first step: zeros, not garbage
                    tl.store(buf_ptr + offs, tl.zeros([BLOCK], dtype=DTYPE), mask=offs < n)
        elif start + BLOCK <= n:
            _sgd_block(p_ptr, g_ptr, buf_ptr, offs, n, coef, inv_scale, first, lr, momentum,
                       one_minus_dampening, weight_decay, max_value, VALUE_CLIP, HAS_MOMENTUM,
                       NESTEROV, MAXIMIZE, False)
        else:
            _sgd_block(p_ptr, g_ptr, buf_ptr, offs, n, coef, inv_scale, first, lr, momentum,
                       one_minus_dampening, weight_decay, max_value, VALUE_CLIP, HAS_MOMENTUM,
                       NESTEROV, MAXIMIZE, True)


def sgd_triton_(table, clip, *, lr, momentum, dampening, weight_decay, nesterov, maximize, grid,
                num_warps):
    """Launch the SGD update over ``table`` (columns p, buf, numel, first-step flag; grads apart);
    ``clip`` and ``lr`` as in _common.launch_update."""
    launch_update(_sgd_kernel, table, clip, grid, lr, (momentum, 1.0 - dampening, weight_decay),
                  num_warps,
                  HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize)
