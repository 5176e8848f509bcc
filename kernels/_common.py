"""Pieces every fusedopt kernel shares: the rules as Triton functions, the block walk, masked and
unmasked loads, the clip coefficient formed on the device from the norm partials, the rounding of
every stored value (round_to) and the launch options (FP_FUSION).

Used by kernels/norm.py and kernels/update.py; the host side of the tables these read is
fusedopt/_multi_tensor.py.

The kernels inline their table reads and loads rather than calling small helpers: the interpreter
re-patches triton.language on every nested @triton.jit call (0.15-0.25 ms each in a
micro-benchmark on the CI machine's CPU, an earlier note said ~1 ms; measured with
triton 3.9), so helper calls per block, not arithmetic, set how long the CI tests take.
"""
import dataclasses
import types

import torch
import triton
import triton.language as tl

# Partials per dtype group: the norm pass writes one per program, so its grid is at most this.
# 1024 programs keep ~4 MB of loads in flight on a 132-SM H100 (BLOCK 1024 x 4 B each); the update
# programs each re-read every slot (4 KB per dtype group) from L2. Not yet swept on a GPU.
NUM_PARTIALS = 1024
# Elements per block: 4 warps x 32 threads x 8 fp32 = two 128-bit accesses per thread per tensor.
# Not yet swept on a GPU.
BLOCK_SIZE = 1024
NUM_WARPS = 4

# Update programs per SM on a GPU: each walks blocks pid, pid + grid, ... (4 warps each: half of an
# H100 SM's 64 warps). Not yet swept on a GPU.
PROGRAMS_PER_SM = 16


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How the kernels are launched: elements per block, warps per program, norm partials per
    dtype group (the norm pass's largest grid) and update programs per SM. The defaults are the
    constants above; bench/tune.py sweeps the alternatives on a GPU. The partial count and the
    block size fix which elements each partial sums, so they fix the norm's last bits."""
    block_size: int = BLOCK_SIZE
    num_warps: int = NUM_WARPS
    num_partials: int = NUM_PARTIALS
    programs_per_sm: int = PROGRAMS_PER_SM


DEFAULT_LAUNCH = LaunchConfig()

# FMA contraction (a * b + c as one fma.rn) on every launch: torch's CUDA fused optimizer kernels
# are compiled by nvcc with its default --fmad=true, so contracting keeps the GPU close to torch's
# fused Adam/SGD. Pinned, not left to Triton's default: triton 3.9 warns that its default turns to
# off in 3.10, and an upgrade must not change our numbers. The interpreter has no FMA (numpy
# rounds each op), so the CPU tests see the uncontracted math either way.
FP_FUSION = True

NORM_NONE, NORM_L2, NORM_INF = 0, 2, 1  # the NORM constexpr: which norm, if any

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
KERNEL_DTYPES = tuple(_TRITON_DTYPES)  # fp64 stays on the torch path


def triton_dtype(dtype: torch.dtype):
    return _TRITON_DTYPES[dtype]


@triton.jit
def sign(x):
    """torch.sign for the rules (triton.language has none): -1, 0 or 1; NaN stays NaN (x * 0.0
    is 0 for finite x and NaN only for NaN, since an inf x is caught by the comparisons)."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x * 0.0))


def _jit_rules():
    """fusedopt/rules.py's functions as ``triton.jit`` twins: name -> JITFunction.

    rules.py calls its ``tl`` functions through fusedopt/_torch_lang.py; each twin has the same
    code object with globals where ``tl`` is triton.language and every other rule (one_minus_pow)
    is its twin, so that nested calls resolve inside the kernel. One shared scope: a twin defined
    later is seen by those defined before.
    """
    from fusedopt import rules
    scope = dict(vars(rules), tl=tl, sign=sign)  # rules.sign is torch.sign
    out = {}
    for name, fn in vars(rules).items():
        if isinstance(fn, types.FunctionType) and fn.__module__ == rules.__name__:
            twin = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__,
                                      fn.__closure__)
            twin.__module__, twin.__qualname__, twin.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
            out[name] = scope[name] = triton.jit(twin)
    return out


RULES = _jit_rules()


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` as ``DTYPE`` for a store: every bf16 and fp16 store of a param or state value
    goes through here (fp32 is stored as computed).

    bf16: round to nearest even on the integer bits, as torch does. The interpreter's own cast
    truncates (50 zero-grad AdamW steps shrank bf16 params by 23% where torch moves nothing) and the
    GPU's rounds; with this, both agree bit for bit with torch. Adding 0x7FFF plus the kept half's
    last bit, then cutting 16 bits, rounds half-way cases to even; the carry steps the exponent, so
    values that round past bf16's max become inf, and inf stays inf. A NaN becomes 0x7FC0, as in
    c10::BFloat16 (the carry would turn a NaN with low payload bits into inf, a negative one into
    0); torch's other casts give other NaNs (0xFFFF vectorized on CPU; on CUDA cvt.rn's 0x7FFF).
    Stochastic rounding, under a future flag (with a seed and the offsets), adds 16 random bits in
    place of 0x7FFF plus the last bit.

    fp16: a plain cast. The interpreter casts with numpy (round to nearest even) and the GPU with
    cvt.rn.f16.f32, both as torch; only NaN payloads may differ. Callers skip this call for fp32:
    under the interpreter each nested call costs ~0.2 ms a block, and calling it on fp32 blocks too
    (2 to 4 stores a block) took tests/test_kernels.py from 41.3 to 44.9 s (CI's CPU, triton 3.9).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def max_nan(a, b):
    """max that keeps NaN (torch's inf-norm of a NaN is NaN; PTX max.f32 would drop it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan_reduce(x):
    """tl.max over a vector, NaN if any element is NaN (a plain vector op: the interpreter runs
    a custom-combine tl.reduce element by element, 10x slower)."""
    has_nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=0))


@triton.jit
def clamp_value(g, max_value, VALUE_CLIP: tl.constexpr):
    """clip_grad_value_: clamp to [-max_value, max_value] (NaN stays NaN, as torch.clamp)."""
    if VALUE_CLIP:
        g = tl.where(g < -max_value, -max_value, g)
        g = tl.where(g > max_value, max_value, g)
    return g


@triton.jit
def total_norm(partials_ptr, n_partials, NORM: tl.constexpr, NUM_PARTIALS: tl.constexpr):
    """The total norm from every dtype group's partials, summed in one fixed order."""
    offs = tl.arange(0, NUM_PARTIALS)
    acc = tl.zeros([NUM_PARTIALS], dtype=tl.float32)
    for i in range(0, n_partials, NUM_PARTIALS):
        part = tl.load(partials_ptr + i + offs)
        if NORM == 2:
            acc += part
        else:
            acc = max_nan(acc, part)
    if NORM == 2:
        return tl.sqrt_rn(tl.sum(acc, axis=0))  # IEEE, as torch's norm (tl.sqrt: approx.ftz)
    return max_nan_reduce(acc)


@triton.jit
def launch_scalars(partials_ptr, n_partials, out_ptr, write_out, max_norm, found_ptr,
                   inv_scale_ptr, lr_ptr, lr, NORM: tl.constexpr, FOUND_IN: tl.constexpr,
                   DETECT: tl.constexpr, UNSCALE: tl.constexpr, LR_FROM_PTR: tl.constexpr,
                   NUM_PARTIALS: tl.constexpr):
    """What every program of an update launch forms once, in this order of the arguments above:

    - coef: clip_grad_norm_'s min(1, max_norm / (norm + 1e-6)), NaN kept (NORM);
    - skip: 1.0 when GradScaler's found_inf is set (FOUND_IN) or the norm pass met an inf/NaN
      (DETECT: its inf/NaN partials, sums of g * 0, follow the norm partials and are NaN exactly
      then), else 0.0. Every program of every launch of the step reads the same inputs, so all
      skip or none;
    - inv_scale: 1 / GradScaler's scale (UNSCALE); lr: from the pointer when LR_FROM_PTR.

    Program 0 of the step's first launch (write_out) stores the norm and the flag in out_ptr[0:2].
    One helper, not one per item: under the interpreter each nested call costs ~0.2 ms a program.
    """
    coef = 1.0
    if NORM != 0:
        norm = total_norm(partials_ptr, n_partials, NORM, NUM_PARTIALS)
        if write_out != 0:
            if tl.program_id(0) == 0:
                tl.store(out_ptr, norm)
        coef = max_norm / (norm + 1e-6)
        coef = tl.where(coef > 1.0, 1.0, coef)
    skip = 0.0
    if FOUND_IN:
        skip = tl.where(tl.load(found_ptr) != 0, 1.0, 0.0)
    if DETECT:
        offs = tl.arange(0, NUM_PARTIALS)
        acc = tl.zeros([NUM_PARTIALS], dtype=tl.float32)
        for i in range(0, n_partials, NUM_PARTIALS):
            acc += tl.load(partials_ptr + n_partials + i + offs)
        bad = tl.sum(acc, axis=0)
        skip = tl.where(bad != bad, 1.0, skip)
    if FOUND_IN or DETECT:
        if write_out != 0:
            if tl.program_id(0) == 0:
                tl.store(out_ptr + 1, skip)
    inv_scale = 1.0
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    return coef, skip, inv_scale, lr
