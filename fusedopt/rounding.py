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
import sys

import torch

MASK = 0xFFFFFFFF
LO, HI = (0, 1) if sys.byteorder == "little" else (1, 0)  # the int16 halves of an fp32
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


def _int32(v):
    """uint32 values held in int64 (a tensor or a Python int) as the int32 of the same bits."""
    if isinstance(v, int):
        return v - (1 << 32) if v >= 1 << 31 else v
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """uint32's logical right shift on the int32 of the same bits (>> on int32 is arithmetic)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """mix32 on int32 tensors holding uint32 bits: the adds and multiplies wrap as uint32's do
    (two's complement), the shifts are made logical. 10x faster than the int64 form on the CPU
    (98 -> 10 ms for 2**22 elements, 2-core EPYC) and bit for bit the same."""
    x = x ^ _shr(x, 16)
    x = x * _int32(0x21F0AAAD)
    x = x ^ _shr(x, 15)
    x = x * _int32(0x735A2D97)
    return x ^ _shr(x, 15)


def hashes32(stream_: torch.Tensor, second: bool, start: int, shape) -> torch.Tensor:
    """One hash per element, as int32 holding its uint32 bits, for the elements ``start, start +
    1, ...`` (row-major) of a piece of ``shape``: the first (param, s0) or the ``second`` (s1,
    s2). What the torch path uses; element_bits is the same as uint32 values."""
    n = 1
    for s in shape:
        n *= s
    if start + n <= 1 << 31:
        index = torch.arange(start, start + n, dtype=torch.int32, device=stream_.device)
    else:
        index = _int32(torch.arange(start, start + n, dtype=torch.int64,
                                    device=stream_.device) & MASK)
    salted = _int32((stream_ ^ SALT) if second else stream_)
    return _mix32_int32(index + salted).reshape(shape)


def element_bits(stream_: torch.Tensor, second: bool, start: int, shape) -> torch.Tensor:
    """hashes32 as int64 values in [0, 2**32), the kernel's uint32 values."""
    return hashes32(stream_, second, start, shape).to(torch.int64) & MASK


def column_bits(hashes: torch.Tensor, column: int) -> torch.Tensor:
    """The 16 random bits of ``column`` (0 the param, 1-3 the state columns) from its hash
    (int32 or int64)."""
    return (hashes >> 16) & 0xFFFF if column % 2 else hashes & 0xFFFF


def random_bits(stream_: torch.Tensor, column: int, start: int, shape) -> torch.Tensor:
    """The 16 random bits (int64) of ``column`` for the elements ``start, ...`` of a piece."""
    return column_bits(element_bits(stream_, column >= 2, start, shape), column)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded stochastically to bf16 or fp16 with ``r``, 16 random bits per element
    (0 to 65535, any integer dtype) (module docstring). int32 arithmetic on the fp32 bits: a
    carry out of the top bit (only from NaN patterns, replaced) wraps."""
    x = x.float().contiguous()
    bits = x.view(torch.int32)
    r = r.to(torch.int32)
    nan = torch.isnan(x)
    if dtype == torch.bfloat16:
        hi = (bits + r) >> 16  # arithmetic: the sign's copies fill what int16 drops
        return torch.where(nan, 0x7FC0, hi).to(torch.int16).view(torch.bfloat16)
    if dtype != torch.float16:
        raise AssertionError(f"stochastic rounding to {dtype}")
    mag = bits & 0x7FFFFFFF
    normal = torch.where(mag >= 0x7F800000, mag, (mag + (r & 0x1FFF)) & _int32(0xFFFFE000))
    q = mag.view(torch.float32) * 16777216.0  # in units of fp16's subnormal gap 2**-24 (exact)
    below = torch.floor(q)
    up = r.to(torch.float32) < (q - below) * 65536.0
    small = ((below + up.to(torch.float32)) * 5.960464477539063e-08).view(torch.int32)
    out = torch.where(mag < 0x38800000, small, normal)  # 0x38800000: 2**-14
    return (out | (bits & _int32(0x80000000))).view(torch.float32).to(torch.float16)


def split_bf16(x: torch.Tensor):
    """fp32 master ``x`` -> (bf16 param, int16 remainder) (module docstring), on the int16
    halves of its bits."""
    flat = x.contiguous().reshape(-1)  # a 0-dim tensor has no element-size view
    halves = flat.view(torch.int16).view(-1, 2)
    lo, hi = halves[:, LO].reshape(x.shape), halves[:, HI].reshape(x.shape)
    nan = torch.isnan(x)
    hi = hi + (lo < 0).to(torch.int16)  # rounded up when the low half is 0x8000 or more
    return (torch.where(nan, 0x7FC0, hi).view(torch.bfloat16),
            torch.where(nan, 0, lo).to(torch.int16))


def join_bf16(p: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """(bf16 param, int16 remainder) -> the fp32 master value."""
    hi = p.contiguous().view(torch.int16) - (rem < 0).to(torch.int16)
    halves = (rem.to(torch.int16), hi) if LO == 0 else (hi, rem.to(torch.int16))
    return torch.stack(halves, dim=-1).view(torch.float32).squeeze(-1)
