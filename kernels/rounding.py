"""Memory-lean stores in the kernels: stochastic rounding and bf16 remainders, the twins of
fusedopt/rounding.py (its docstring defines the random bits, the rounding and the split; the two
agree bit for bit, tests/test_memory.py). Here the arithmetic is uint32, which wraps as the torch
path's masks do.
"""
import triton
import triton.language as tl

SALT = tl.constexpr(0x5BD1E995)  # fusedopt/rounding.SALT: the second hash's stream


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (fusedopt/rounding.mix32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def stream(key, step):
    """A tensor's stream for this step: ``key`` (int64 from the row, a uint32 value) and the fp32
    step counter after this step's increment."""
    return mix32(key.to(tl.uint32) ^ step.to(tl.uint32))


@triton.jit
def element_bits(stream_, offs, SECOND: tl.constexpr):
    """32 random bits per element (fusedopt/rounding.random_bits): 16 for each of two columns,
    the param and s0 from the first hash, s1 and s2 from the SECOND."""
    if SECOND:
        stream_ = stream_ ^ SALT
    return mix32(offs.to(tl.uint32) + stream_)


@triton.jit
def stochastic(x, DTYPE: tl.constexpr, r):
    """fp32 ``x`` rounded stochastically to ``DTYPE`` (bf16 or fp16) with the 16 random bits in
    the low half of ``r``; to nearest is _common.round_to."""
    bits = x.to(tl.uint32, bitcast=True)
    if DTYPE == tl.bfloat16:
        hi = (bits + (r & 0xFFFF)) >> 16
        hi = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, hi)
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        mag = bits & 0x7FFFFFFF
        normal = (mag + (r & 0x1FFF)) & 0xFFFFE000
        q = mag.to(tl.float32, bitcast=True) * 16777216.0  # units of 2**-24 (exact)
        below = tl.floor(q)
        up = tl.where((r & 0xFFFF).to(tl.float32) < (q - below) * 65536.0, 1.0, 0.0)
        small = ((below + up) * 5.960464477539063e-08).to(tl.uint32, bitcast=True)
        out = tl.where(mag < 0x38800000, small, normal)  # 0x38800000: 2**-14
        out = tl.where(mag >= 0x7F800000, mag, out)
        return (out | (bits & 0x80000000)).to(tl.float32, bitcast=True).to(tl.float16)


@triton.jit
def join_bf16(p, rem):
    """(bf16 param, int16 remainder) -> fp32 master (fusedopt/rounding.join_bf16)."""
    hi = p.to(tl.uint16, bitcast=True).to(tl.uint32)
    rem = rem.to(tl.int32)
    hi = tl.where(rem < 0, hi - 1, hi) & 0xFFFF
    return ((hi << 16) | (rem.to(tl.uint32) & 0xFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def split_bf16(x):
    """fp32 master -> (bf16 param, int16 remainder) (fusedopt/rounding.split_bf16)."""
    bits = x.to(tl.uint32, bitcast=True)
    lo = bits & 0xFFFF
    hi = (bits >> 16) + (lo >> 15)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    hi = tl.where(nan, 0x7FC0, hi) & 0xFFFF
    lo = tl.where(nan, 0, lo)
    return (hi.to(tl.uint16).to(tl.bfloat16, bitcast=True),
            lo.to(tl.uint16).to(tl.int16, bitcast=True))
