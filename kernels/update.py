"""The one update pass of every elementwise optimizer: one launch per (param group, dtype) reads g,
p and up to three state columns once and writes p and the state; the rule (fusedopt/rules.py) is a
``tl.constexpr`` argument, so each optimizer is its rule, not a copy of this walk.

What the skeleton owns, for every rule: the block walk (program pid takes blocks pid, pid + grid,
...), unmasked full blocks and a masked tail (128-bit access), the clip coefficient, unscale and
skip flag (``_common.launch_scalars``), the value clamp, the step scalars (the rule's ``_step``
twin, in float64 once per block), the loads, the rounding of every low-precision store (to
nearest even, or stochastically under SR: kernels/rounding.py) and the stores. Grads are never
written.

Memory-lean variants (fusedopt/_elementwise.py, the ``master_weights``, ``state_dtype`` and
``stochastic_rounding`` options): the state columns have their own element type (STATE_DTYPE),
and a master column M holds bf16 params' int16 remainders (MASTER 1: the fp32 master is the param
and its remainder, joined on load and split on store) or fp16 params' fp32 copies (MASTER 2).

The hyperparameters come from a float64 device buffer per param group (``hyper_ptr``), refreshed
by the host only when a value changes (fusedopt/_elementwise.py): a scheduler moving betas or
weight decay recompiles nothing, and a captured CUDA graph reads the buffer's current values. lr is
a float argument, or read through a pointer when it is a Tensor.
"""
import triton
import triton.language as tl

from fusedopt.kernels._common import (FP_FUSION, RULES, clamp_value, launch_scalars, round_to,
                                      triton_dtype)
from fusedopt.kernels.rounding import element_bits, join_bf16, split_bf16, stochastic, stream

# table columns (tl.constexpr: the only globals a compiled kernel may read): param, state and
# master addresses (a column a variant does not use holds p's address, never read), the fp32
# step counter's address (0 without one), numel, SGD's first-step flag, the rounding key
# (fusedopt/rounding.tensor_key; 0 without SR), the fp32 scalar state's address (NAdam's
# mu_product; 0 without one) and its snapshot slot's (see SCALAR_STATE)
P, S0, S1, S2, M, STEP, NUMEL, FIRST, KEY, X, SNAP = (tl.constexpr(i) for i in range(11))
ROW = tl.constexpr(11)
MASTER_NONE, MASTER_REMAINDER, MASTER_COPY = 0, 1, 2  # the MASTER constexpr


@triton.jit
def _block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, m_ptr, offs, n, coef, inv_scale, max_value, c0,
           c1, c2, c3, first, lr, h0, h1, h2, h3, h4, h5, h6, h7, stream_, RULE: tl.constexpr,
           STATES: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
           VALUE_CLIP: tl.constexpr, MASKED: tl.constexpr, MASTER: tl.constexpr,
           SR: tl.constexpr):
    """One block; MASKED only for a tensor's last, partial block (full blocks get 128-bit access).
    STATES: bit i set when state column i is used."""
    mask, other = (offs < n, 0.0) if MASKED else (None, None)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32) * inv_scale
    g = clamp_value(g, max_value, VALUE_CLIP) * coef
    if MASTER == 1:
        p = join_bf16(tl.load(p_ptr + offs, mask=mask, other=other),
                      tl.load(m_ptr + offs, mask=mask, other=0 if MASKED else None))
    elif MASTER == 2:
        p = tl.load(m_ptr + offs, mask=mask, other=other)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    if STATES & 1:
        s0 = tl.load(s0_ptr + offs, mask=mask, other=other).to(tl.float32)
    if STATES & 2:
        s1 = tl.load(s1_ptr + offs, mask=mask, other=other).to(tl.float32)
    if STATES & 4:
        s2 = tl.load(s2_ptr + offs, mask=mask, other=other).to(tl.float32)
    p, s0, s1, s2 = RULE(p, g, s0, s1, s2, c0, c1, c2, c3, first, lr, h0, h1, h2, h3, h4, h5, h6,
                         h7, F0, F1, F2)
    sdtype = s0_ptr.dtype.element_ty
    dtype = p_ptr.dtype.element_ty
    # random bits (fusedopt/rounding.py): the first hash's halves round s0 (high) and p (low),
    # the second's s1 and s2. Each is made just before its stores and dead after them: made up
    # front, both lived across every store and triton 3.6 gave the fp32 RMSprop update with three
    # bf16 state columns 166 registers on sm_80 (fp16 AdamW with an fp32 copy and bf16 states 152)
    r = 0
    if SR:
        r = element_bits(stream_, offs, False)
    # fp32 is stored as computed: under the interpreter each nested call costs ~0.2 ms a block,
    # and rounding fp32 blocks too (2 to 4 stores a block) took tests/test_kernels.py from 41.3
    # to 44.9 s (CI's CPU, triton 3.9)
    if STATES & 1:
        if sdtype != tl.float32:
            s0 = stochastic(s0, sdtype, r >> 16) if SR else round_to(s0, sdtype)
        tl.store(s0_ptr + offs, s0, mask=mask)
    if MASTER == 1:
        p, rem = split_bf16(p)
        tl.store(m_ptr + offs, rem, mask=mask)
    elif MASTER == 2:
        tl.store(m_ptr + offs, p, mask=mask)
        p = p.to(dtype)  # fp16: to nearest even, as torch (the master is exact)
    elif dtype != tl.float32:
        p = stochastic(p, dtype, r) if SR else round_to(p, dtype)
    tl.store(p_ptr + offs, p, mask=mask)
    if SR:
        if STATES & 6:
            if sdtype != tl.float32:
                r = element_bits(stream_, offs, True)
    if STATES & 2:
        if sdtype != tl.float32:
            s1 = stochastic(s1, sdtype, r) if SR else round_to(s1, sdtype)
        tl.store(s1_ptr + offs, s1, mask=mask)
    if STATES & 4:
        if sdtype != tl.float32:
            s2 = stochastic(s2, sdtype, r >> 16) if SR else round_to(s2, sdtype)
        tl.store(s2_ptr + offs, s2, mask=mask)


@triton.jit(do_not_specialize=["n_blocks", "n_partials", "write_out"])
def _update_kernel(
    table_ptr,         # int64 [n_tensors, ROW]: the columns above
    grad_ptrs_ptr,     # int64 [n_tensors]: grad addresses (they change every step: their own copy)
    block_tensor_ptr,  # int32 [n_blocks]: the tensor of each block
    block_index_ptr,   # int32 [n_blocks]: the block's index inside its tensor
    partials_ptr,      # fp32: every dtype group's norm partials (NORM), then inf/NaN ones (DETECT)
    out_ptr,           # fp32 [2]: total norm, skip flag; stored by program 0 when write_out
    lr_ptr,            # fp32 [1]: a Tensor lr (LR_FROM_PTR)
    inv_scale_ptr,     # fp32 [1]: 1 / GradScaler's scale (UNSCALE)
    found_ptr,         # fp32 [1]: GradScaler's found_inf (FOUND_IN)
    hyper_ptr,         # fp64 [8]: the param group's h0..h7 (fusedopt/rules.py)
    n_blocks, n_partials, write_out,
    lr,                # float lr (not LR_FROM_PTR)
    max_norm,          # clip_grad_norm_'s max_norm (NORM != 0)
    max_value,         # clip_grad_value_'s bound (VALUE_CLIP)
    RULE: tl.constexpr,       # rules.<name>_rule, jitted
    STEP_RULE: tl.constexpr,  # rules.<name>_step, jitted (called when STEP_SCALARS)
    STATES: tl.constexpr,     # bit i: state column i is used
    HAS_STEP: tl.constexpr,   # a step counter (advanced by the norm pass, taken back on a skip)
    STEP_SCALARS: tl.constexpr,  # STEP_RULE makes c0..c3 from it
    SCALAR_STATE: tl.constexpr,  # a per-tensor fp32 scalar state (column X), new value c3: the
                                 # norm pass copied its old value to SNAP, which every block
                                 # reads, so block 0 may write X without a race
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,  # the rule's flags
    DTYPE: tl.constexpr,        # param (and grad) element type
    STATE_DTYPE: tl.constexpr,  # state columns' element type
    MASTER: tl.constexpr,       # MASTER_NONE / _REMAINDER (bf16 params) / _COPY (fp16 params)
    SR: tl.constexpr,           # stochastic rounding of every 16-bit store (needs HAS_STEP)
 NORM: tl.constexpr, VALUE_CLIP: tl.constexpr, UNSCALE: tl.constexpr,
    FOUND_IN: tl.constexpr, DETECT: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr, NUM_PARTIALS: tl.constexpr,
):
    coef, skip, inv_scale, lr = launch_scalars(
        partials_ptr, n_partials, out_ptr, write_out, max_norm, found_ptr, inv_scale_ptr, lr_ptr,
        lr, NORM, FOUND_IN, DETECT, UNSCALE, LR_FROM_PTR, NUM_PARTIALS)
    # fp32 copies for the rule, live across the block loop; the float64 values only feed
    # STEP_RULE and are re-read per block (8 loads of one cached line): kept live instead, their
    # 16 registers made the fp32 AdamW update with every flag spill on sm_90 (72 registers + an
    # 8-byte stack frame, triton 3.9) and fp16 AMSGrad on sm_80/90 under triton 3.6
    h0 = tl.load(hyper_ptr).to(tl.float32)
    h1 = tl.load(hyper_ptr + 1).to(tl.float32)
    h2 = tl.load(hyper_ptr + 2).to(tl.float32)
    h3 = tl.load(hyper_ptr + 3).to(tl.float32)
    h4 = tl.load(hyper_ptr + 4).to(tl.float32)
    h5 = tl.load(hyper_ptr + 5).to(tl.float32)
    h6 = tl.load(hyper_ptr + 6).to(tl.float32)
    h7 = tl.load(hyper_ptr + 7).to(tl.float32)
    for b in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t = tl.load(block_tensor_ptr + b).to(tl.int64)
        row = table_ptr + t * ROW
        start = tl.load(block_index_ptr + b).to(tl.int64) * BLOCK
        n = tl.load(row + NUMEL)
        first = tl.load(row + FIRST)
        offs = start + tl.arange(0, BLOCK)
        p_ptr = tl.multiple_of(tl.load(row + P).to(tl.pointer_type(DTYPE)), 16)
        s0_ptr = tl.multiple_of(tl.load(row + S0).to(tl.pointer_type(STATE_DTYPE)), 16)
        s1_ptr = tl.multiple_of(tl.load(row + S1).to(tl.pointer_type(STATE_DTYPE)), 16)
        s2_ptr = tl.multiple_of(tl.load(row + S2).to(tl.pointer_type(STATE_DTYPE)), 16)
        if MASTER == 1:
            m_ptr = tl.multiple_of(tl.load(row + M).to(tl.pointer_type(tl.int16)), 16)
        elif MASTER == 2:
            m_ptr = tl.multiple_of(tl.load(row + M).to(tl.pointer_type(tl.float32)), 16)
        else:
            m_ptr = p_ptr
        if skip != 0:
            if HAS_STEP:
                # the norm pass advanced the counter; a skipped step takes it back (torch's fused
                # Adam does the same under GradScaler). Nothing else reads it in this launch.
                if start == 0:
                    step_ptr = tl.load(row + STEP).to(tl.pointer_type(tl.float32))
                    tl.store(step_ptr, tl.load(step_ptr) - 1.0)
            if first != 0:  # state made for a skipped first step: zeros, not garbage
                zeros = tl.zeros([BLOCK], dtype=STATE_DTYPE)
                if STATES & 1:
                    tl.store(s0_ptr + offs, zeros, mask=offs < n)
                if STATES & 2:
                    tl.store(s1_ptr + offs, zeros, mask=offs < n)
                if STATES & 4:
                    tl.store(s2_ptr + offs, zeros, mask=offs < n)
        else:
            c0 = 0.0
            c1 = 0.0
            c2 = 0.0
            c3 = 0.0
            step = 0.0
            if STEP_SCALARS or SR:
                step = tl.load(tl.load(row + STEP).to(tl.pointer_type(tl.float32)))
            stream_ = 0
            if SR:
                stream_ = stream(tl.load(row + KEY), step)
            if STEP_SCALARS:
                x = 0.0
                if SCALAR_STATE:
                    x = tl.load(tl.load(row + SNAP).to(tl.pointer_type(tl.float32))).to(tl.float64)
                e0, e1, e2, e3 = STEP_RULE(
                    step.to(tl.float64), x, tl.cast(lr, tl.float64), tl.load(hyper_ptr),
                    tl.load(hyper_ptr + 1), tl.load(hyper_ptr + 2), tl.load(hyper_ptr + 3),
                    tl.load(hyper_ptr + 4), tl.load(hyper_ptr + 5), tl.load(hyper_ptr + 6),
                    tl.load(hyper_ptr + 7))
                c0, c1 = tl.cast(e0, tl.float32), tl.cast(e1, tl.float32)
                c2, c3 = tl.cast(e2, tl.float32), tl.cast(e3, tl.float32)
                if SCALAR_STATE:
                    if start == 0:
                        tl.store(tl.load(row + X).to(tl.pointer_type(tl.float32)), c3)
            g_ptr = tl.multiple_of(tl.load(grad_ptrs_ptr + t).to(tl.pointer_type(DTYPE)), 16)
            if start + BLOCK <= n:
                _block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, m_ptr, offs, n, coef, inv_scale,
                       max_value, c0, c1, c2, c3, first, lr, h0, h1, h2, h3, h4, h5, h6, h7,
                       stream_, RULE, STATES, F0, F1, F2, VALUE_CLIP, False, MASTER, SR)
            else:
                _block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, m_ptr, offs, n, coef, inv_scale,
                       max_value, c0, c1, c2, c3, first, lr, h0, h1, h2, h3, h4, h5, h6, h7,
                       stream_, RULE, STATES, F0, F1, F2, VALUE_CLIP, True, MASTER, SR)


def update_(table, clip, spec, hyper, lr, grid, num_warps):
    """Launch the update of one (param group, dtype) ``table`` (a fusedopt._multi_tensor.LaunchTable
    with the columns above; grads apart). ``spec``: (rule name, step rule name or None, state
    bits, flags, whether a step counter exists, whether a scalar state does) from the class (fusedopt/_elementwise.py). ``hyper``: the group's float64 device
    buffer. ``lr``: a float, or a 1-element fp32 Tensor on the device (read there: no sync, no
    recompile). ``clip``: fusedopt._triton_step.KernelClip; only its first launch of a step
    stores the norm and the flag. Pointers a variant never reads get ``clip.out`` as a stand-in.
    ``spec`` goes on with the state dtype, the master kind (MASTER_*) and stochastic rounding.
    """
    rule, step_rule, states, flags, has_step, scalar_state, state_dtype, master, sr = spec
    lr_is_tensor = not isinstance(lr, float)
    _update_kernel[(grid,)](
        table.rows, table.grads, table.block_tensor, table.block_index, clip.partials,
        clip.out, lr if lr_is_tensor else clip.out,
        clip.out if clip.inv_scale is None else clip.inv_scale,
        clip.out if clip.found_in is None else clip.found_in, hyper, table.n_blocks,
        clip.n_partials, int(clip.write_out), 0.0 if lr_is_tensor else lr, clip.max_norm,
        clip.max_value,
        RULE=RULES[rule], STEP_RULE=RULES[step_rule or rule], STATES=states,
        HAS_STEP=has_step, STEP_SCALARS=step_rule is not None,
        SCALAR_STATE=scalar_state, F0=flags[0], F1=flags[1], F2=flags[2],
        DTYPE=triton_dtype(table.dtype), STATE_DTYPE=triton_dtype(state_dtype), MASTER=master,
        SR=sr, NORM=clip.norm, VALUE_CLIP=clip.value_clip,
        UNSCALE=clip.inv_scale is not None, FOUND_IN=clip.found_in is not None,
        DETECT=clip.detect, LR_FROM_PTR=lr_is_tensor, BLOCK=table.block_size,
        NUM_PARTIALS=clip.num_partials, num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    clip.write_out = False
