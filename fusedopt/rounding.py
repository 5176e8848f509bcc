"""Memory-lean stores on the torch path: stochastic rounding and bf16 remainders, bit for bit what
the kernels compute (their twin is kernels/rounding.py; tests/test_memory.py holds the two
together under the interpreter).

**Random bits.** Counter-based, so that any element's bits can be formed anywhere, in any order,
with no generator state. Per element two hashes, ``mix32(index + stream)`` and
``mix32(index + (stream ^ SALT))``, give 16 bits to each of four columns: the param the low half
of the first, s0 its high half, s1 and s2 those of the second (two hashes, not one per column:
four made the fp32 RMSprop update with three bf16 state columns need 130 registers on sm_90).
``stream = mix32(key ^ step)`` per tensor and step, ``key = mix32(seed ^ mix32(position))`` from
the param group's ``rounding_seed`` and the param's position in the optimizer (its state_dict id);
``step`` is the tensor's step counter after this step's increment. ``mix32`` is Chris
Wellons' lowbias32 finalizer with the multipliers 0x21f0aaad and 0x735a2d97 (both below 2**31, so
that int64 products never overflow here; the kernels use wrapping uint32 arithmetic). Everything is
uint32 arithmetic, done here in int64 with a mask after every add and multiply.

**Stochastic rounding** of an fp32 ``x`` to bf16: add 16 random bits to its 16 low bits and cut
them (a carry moves to the next bf16 value): x rounds up with probability exactly (its distance
from the value below) / (the bf16 gap), so E[round(x)] = x. To fp16 in fp16's normal range the same
with 13 bits; below it (|x| < 2**-14, a fixed gap of 2**-24) up with probability frac rounded up
to 16 bits, a bias of at most 2**-16 of a gap. inf and NaN stay as they are.

**Remainders** (NVIDIA Apex's distributed Adam with store_param_remainders): an fp32 master value
is split into the bf16 param, rounded to nearest with ties away from zero, and the int16 of its 16
low bits; a negative remainder says the param was rounded up. ``join_bf16(split_bf16(x)) == x``
for every fp32 bit pattern except NaNs, which become the param 0x7FC0 (the canonical NaN) with
remainder 0.
"""
import torch

MASK = 0xFFFFFFFF
SALT = 0x5BD1E995  # the second hash's stream: stream ^ SALT


def mix32(x):
    """lowbias32: a 32-bit integer hash (Python int or int64 tensor holding uint32 values)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def tensor_key(seed: int, position: int) -> int:
    """A param's rounding key: its position among the optimizer's params (state_dict order)
    hashed with the group's seed."""
    return mix32((seed & MASK) ^ mix32(position & MASK))


def stream(key: int, step: torch.Tensor) -> torch.Tensor:
    """The step's stream of one tensor: int64 0-dim on the step counter's device (no host read)."""
    return mix32(step.to(torch.int64) ^ key)


def element_bits(stream_: torch.Tensor, second: bool, start: int, shape) -> torch.Tensor:
    """One hash per element (int64 holding uint32) for the elements ``start, start + 1, ...``
    (row-major) of a piece of ``shape``: the first (param, s0) or the ``second`` (s1, s2)."""
    n = 1
    for s in shape:
        n *= s
    index = torch.arange(start, start + n, dtype=torch.int64, device=stream_.device) & MASK
    salted = stream_ ^ SALT if second else stream_
    return mix32((index + salted) & MASK).reshape(shape)


def column_bits(hashes: torch.Tensor, column: int) -> torch.Tensor:
    """The 16 random bits of ``column`` (0 the param, 1-3 the state columns) from its hash."""
    return (hashes >> 16) if column % 2 else hashes & 0xFFFF


def random_bits(stream_: torch.Tensor, column: int, start: int, shape) -> torch.Tensor:
    """The 16 random bits (int64) of ``column`` for the elements ``start, ...`` of a piece."""
    return column_bits(element_bits(stream_, column >= 2, start, shape), column)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The fp32 bit pattern of ``x`` as int64 in [0, 2**32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & MASK


def _float(bits: torch.Tensor) -> torch.Tensor:
    """fp32 from int64 bit patterns in [0, 2**32)."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def _is_nan(bits):
    return (bits & 0x7FFFFFFF) > 0x7F800000


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded stochastically to bf16 or fp16 with random bits ``r`` (module
    docstring)."""
    bits = _bits(x.float())
    if dtype == torch.bfloat16:
        hi = ((bits + (r & 0xFFFF)) >> 16) & 0xFFFF
        hi = torch.where(_is_nan(bits), 0x7FC0, hi)
        return torch.where(hi >= 1 << 15, hi - (1 << 16), hi).to(torch.int16).view(torch.bfloat16)
    if dtype != torch.float16:
        raise AssertionError(f"stochastic rounding to {dtype}")
    mag, sign = bits & 0x7FFFFFFF, bits & 0x80000000
    normal = (mag + (r & 0x1FFF)) & 0xFFFFE000
    q = _float(mag) * 16777216.0  # in units of fp16's subnormal gap 2**-24 (exact)
    below = torch.floor(q)
    up = (r & 0xFFFF).to(torch.float32) < (q - below) * 65536.0
    small = _bits((below + up.to(torch.float32)) * 5.960464477539063e-08)
    out = torch.where(mag < 0x38800000, small, normal)  # 0x38800000: 2**-14
    out = torch.where(mag >= 0x7F800000, mag, out)
    return _float(out | sign).to(torch.float16)


def split_bf16(x: torch.Tensor):
    """fp32 master ``x`` -> (bf16 param, int16 remainder) (module docstring)."""
    bits = _bits(x)
    lo = bits & 0xFFFF
    hi = (bits >> 16) + (lo >> 15)
    nan = _is_nan(bits)
    hi = torch.where(nan, 0x7FC0, hi) & 0xFFFF
    lo = torch.where(nan, 0, lo)
    as16 = lambda v: torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16)  # noqa: E731
    return as16(hi).view(torch.bfloat16), as16(lo)


def join_bf16(p: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """(bf16 param, int16 remainder) -> the fp32 master value."""
    hi = p.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    rem = rem.to(torch.int64)
    hi = (hi - (rem < 0).to(torch.int64)) & 0xFFFF
    return _float((hi << 16) | (rem & 0xFFFF))
