"""The norm pass: one launch per dtype group reads every gradient once and writes one partial
(sum of squares, or max |g|) per program, and, when detecting, one inf/NaN partial (the sum of
g * 0: NaN exactly when a gradient is inf or NaN); Adam's step counters advance in the same launch.
Gradients under AMP are multiplied by 1 / scale first, as GradScaler.unscale_ does.

Deterministic: block b always goes to program b % grid, each program adds its blocks in order,
and the update kernels reduce the partials in one fixed order; no float atomics. The torch twin
is fusedopt/clip.py.
"""
import triton
import triton.language as tl

from fusedopt.kernels._common import FP_FUSION, clamp_value, max_nan_reduce, triton_dtype


@triton.jit(do_not_specialize=["n_blocks"])
def _norm_kernel(
    table_ptr,         # int64 [n_tensors, ROW]: numel, [step address, [scalar state and snapshot
                       #   addresses]]
    grad_ptrs_ptr,     # int64 [n_tensors]: grad addresses
    block_tensor_ptr,  # int32 [n_blocks]: the tensor of each block
    block_index_ptr,   # int32 [n_blocks]: the block's index inside its tensor
    partials_ptr,      # fp32 [NUM_PARTIALS]: this dtype group's slots of the norm partials
    flags_ptr,         # fp32 [NUM_PARTIALS]: this dtype group's slots of the inf/NaN partials
    inv_scale_ptr,     # fp32 [1]: 1 / GradScaler's scale (UNSCALE)
    n_blocks,          # blocks in the launch
    max_value,         # clip_grad_value_'s bound (VALUE_CLIP only)
    DTYPE: tl.constexpr,       # grad element type
    ROW: tl.constexpr,         # table columns
    NORM: tl.constexpr,        # NORM_NONE / NORM_L2 / NORM_INF
    VALUE_CLIP: tl.constexpr,  # clamp before measuring
    UNSCALE: tl.constexpr,     # multiply by 1 / scale first
    DETECT: tl.constexpr,      # write the inf/NaN partials
    HAS_STEP: tl.constexpr,    # column 1 holds an fp32 step counter to advance (Adam)
    SNAPSHOT: tl.constexpr,    # copy the fp32 scalar state (column 2) to its snapshot (column 3)
                               # for the update pass to read (kernels/update.py, SCALAR_STATE)
    BLOCK: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    inv_scale = 1.0
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr)
    for b in range(pid, n_blocks, grid):
        t = tl.load(block_tensor_ptr + b).to(tl.int64)
        row = table_ptr + t * ROW
        start = tl.load(block_index_ptr + b).to(tl.int64) * BLOCK
        if HAS_STEP:
            if start == 0:  # one program per tensor advances its counter, before any update reads it
                step_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
                tl.store(step_ptr, tl.load(step_ptr) + 1.0)
                if SNAPSHOT:
                    x_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
                    tl.store(tl.load(row + 3).to(tl.pointer_type(tl.float32)), tl.load(x_ptr))
        if NORM != 0 or DETECT:
            n = tl.load(row)
            g_ptr = tl.multiple_of(tl.load(grad_ptrs_ptr + t).to(tl.pointer_type(DTYPE)), 16)
            offs = start + tl.arange(0, BLOCK)
            if start + BLOCK <= n:  # full block: unmasked, 128-bit loads
                g = tl.load(g_ptr + offs).to(tl.float32)
            else:
                g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            if UNSCALE:
                g = g * inv_scale
            if DETECT:
                bad += g * 0.0  # before the clamp, which would make an inf finite
            g = clamp_value(g, max_value, VALUE_CLIP)
            if NORM == 2:
                acc += g * g
            elif NORM == 1:
                acc = tl.maximum(acc, tl.abs(g), propagate_nan=tl.PropagateNan.ALL)
    slots = tl.arange(0, NUM_PARTIALS)
    if DETECT:
        tl.store(flags_ptr + pid, tl.sum(bad, axis=0))
        if pid == 0:
            tl.store(flags_ptr + slots, tl.zeros([NUM_PARTIALS], dtype=tl.float32),
                     mask=slots >= grid)
    if NORM != 0:
        if NORM == 2:
            tl.store(partials_ptr + pid, tl.sum(acc, axis=0))
        else:
            tl.store(partials_ptr + pid, max_nan_reduce(acc))
        if pid == 0:  # slots past the grid belong to no program: zero them (no memset launch)
            tl.store(partials_ptr + slots, tl.zeros([NUM_PARTIALS], dtype=tl.float32),
                     mask=slots >= grid)


def norm_pass_(table, clip, slot, dtype, max_value, has_step, snapshot, grid, num_warps):
    """Launch the norm pass over ``table`` (a fusedopt._multi_tensor.LaunchTable with columns
    numel[, step] and the grads) into dtype group ``slot`` of ``clip``'s partials
    (fusedopt._triton_step.KernelClip) with ``grid`` <= ``clip.num_partials`` programs; the grid
    fixes which blocks each partial sums, so it fixes the result's bits."""
    width = clip.num_partials
    partials = clip.partials[slot * width:(slot + 1) * width] if clip.norm else clip.out
    _norm_kernel[(grid,)](
        table.rows, table.grads, table.block_tensor, table.block_index, partials,
        clip.flags(slot, width), clip.out if clip.inv_scale is None else clip.inv_scale,
        table.n_blocks, 0.0 if max_value is None else max_value,
        DTYPE=triton_dtype(dtype), ROW=table.row_width, NORM=clip.norm,
        VALUE_CLIP=max_value is not None, UNSCALE=clip.inv_scale is not None, DETECT=clip.detect,
        HAS_STEP=has_step, SNAPSHOT=snapshot, BLOCK=table.block_size, NUM_PARTIALS=width, num_warps=num_warps,
        enable_fp_fusion=FP_FUSION)
