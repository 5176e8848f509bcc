"""The memory-lean options (``stochastic_rounding``, ``master_weights``, ``state_dtype``,
``rounding_seed``) of every elementwise optimizer, each against an oracle of its own:

1. The rounding primitives of kernels/rounding.py (a probe kernel calls them) equal their torch
   twins in fusedopt/rounding.py bit for bit, over random fp32 words of every exponent and the
   edge cases (+-inf, NaNs, +-0, fp32 subnormals, around bf16's and fp16's max, fp16's subnormal
   range, exact ties), with hashed and with chosen random bits, tensor offsets past 2**32.
2. The random bits are well spread: per-bit frequencies, mean, chi-square over 256 bins, no
   serial or cross-column correlation; other steps, positions and seeds give other bits.
3. Stochastic rounding is unbiased: of 4096 roundings of a value between two bf16 or fp16
   neighbours (fp16's subnormal range included) the count rounded up is inside the 5-sigma
   interval of Binomial(4096, fraction), so the mean is the value within 5 sigma; only those two
   neighbours (computed independently, in float64) come out; representable values are returned
   unchanged. On both twins.
4. split_bf16/join_bf16: join(split(x)) == x for every non-NaN fp32 pattern in 2**20 random words
   and the edge cases; the param is x rounded to nearest, ties away from zero, as computed in
   float64; NaN stays NaN.
5. Whole optimizer steps, torch path against the kernels, bit for bit (NaN as NaN), for all nine
   optimizers and every option combination, params and every state tensor (remainders, fp32
   copies, step counters, moments, NAdam's mu_product); a lean group beside a plain one; the torch
   path's 2**18-element pieces; with a global-norm clip (whose sum order differs between the two)
   within a stated tolerance.
6. bf16 params with remainder master weights and fp32 states train exactly as fp32 params do
   (fed the same bf16 grads): ``master_param`` equals the fp32 run bit for bit and the bf16
   param is it rounded to nearest, ties away; fp16 params' fp32 copies likewise. On the torch
   path against fp32 params on the rule path (stochastic_rounding=True on fp32: a no-op that
   takes it), and within fp32 tolerance of the default fp32 path (torch's fused ops).
7. What the options are for: bf16 updates far below half an ulp (SGD, 300 steps) leave plain bf16
   params where they are, move stochastically rounded ones by the expected amount (each step a
   gap down with probability 1/64: the total over 1024 elements inside its binomial 5-sigma
   interval) and master-weight ones to the exact fp32 result.
8. Reproducibility: the same rounding_seed gives the same results, another seed others;
   torch.manual_seed fixes a drawn seed; the seed lives in (and is read from) each param group
   and travels in state_dict.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

import fusedopt
from fusedopt import rounding
from fusedopt.kernels import rounding as krounding
from conftest import DEVICE, assert_close

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MASK = 0xFFFFFFFF
NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion"]
# independent float formats: explicit mantissa bits and the smallest normal exponent
MANT = {BF16: 7, FP16: 10, FP32: 23}
EMIN = {BF16: -126, FP16: -14, FP32: -126}


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this file runs: its tensors are small, and on a shared 2-core
    machine an OpenMP team of two waits out a scheduler slice per op (a 65k-element int64 xor took
    15 ms instead of 0.02 ms; the rounding tests 30 s instead of 2). Integer and elementwise
    results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def words_to_fp32(words) -> torch.Tensor:
    """fp32 values from uint32 bit patterns (a list or an int64 tensor)."""
    w = torch.as_tensor(words, dtype=torch.int64) & MASK
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32).view(torch.float32)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as a signed int tensor of its width."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32,
                                8: torch.int64}[t.element_size()])


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what=""):
    """Bit for bit, NaN as NaN (payloads may differ): same dtype, shape and every other bit."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        (what, actual.dtype, expected.dtype, actual.shape, expected.shape)
    if actual.is_floating_point():
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), (what, "NaN in one only")
        diff = (as_bits(actual) != as_bits(expected)) & ~nan
    else:
        diff = actual != expected
    if diff.any():
        idx = diff.reshape(-1).nonzero()[:6].flatten().tolist()
        a, e = actual.reshape(-1), expected.reshape(-1)
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} differ, e.g. "
                             + ", ".join(f"[{i}] {a[i].item()!r} vs {e[i].item()!r}" for i in idx))


def ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """The gap above |v| among ``dtype``'s values (float64; v finite), from the format alone."""
    a = v.double().abs()
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    exp = torch.where(a == 0, EMIN[dtype], torch.clamp(e.to(torch.int64) - 1, min=EMIN[dtype]))
    return torch.exp2((exp - MANT[dtype]).double())


def bf16_nearest_ties_away(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16, to nearest with ties away from zero, computed in float64 (an
    oracle that shares nothing with fusedopt's bit arithmetic); NaN stays NaN."""
    x64 = x.double()
    u = ulp(x64, BF16)
    r = torch.copysign(torch.floor(x64.abs() / u + 0.5) * u, x64)  # |x| / u is exact in float64
    r = torch.where(r.abs() >= 2.0 ** 128, torch.copysign(torch.tensor(math.inf), x64), r)
    r = torch.where(x64.isfinite(), r, x64)
    out = r.to(BF16)
    assert torch.equal(out.double()[r.isfinite()], r[r.isfinite()])  # r is a bf16 value
    return out


def edge_words() -> list:
    """fp32 bit patterns where rounding to bf16 or fp16 can go wrong, both signs."""
    words = [
        0x00000000, 0x7F800000,                                  # 0, inf
        0x7F800001, 0x7F808000, 0x7F80FFFF, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF,  # NaNs
        0x00000001, 0x00007FFF, 0x00008000, 0x00018000, 0x0000FFFF, 0x007FFFFF,  # fp32 subnormals
        0x00800000, 0x007F8000, 0x00800001,                      # around the smallest normal
        0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7FFFFF, 0x7F7E8000,  # bf16 max
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FFFFF, 0x47800000,  # fp16 max 65504
        0x38800000, 0x387FFFFF, 0x387FE000, 0x38801000,          # fp16's smallest normal 2**-14
        0x33800000, 0x33000000, 0x33C00000, 0x337FFFFF, 0x32FFFFFF, 0x34000000,  # 2**-24, 2**-25
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F80C000, 0x3F801000, 0x3F803000,  # ties at 1.0
        0x3F7FFFFF, 0x3F7F8000, 0x3FFFFFFF, 0x3FFF8000,          # just below a power of two
    ]
    # fp16 ties (13 low bits 0x1000) near 1.0 and its smallest normal 2**-14
    words += [(k << 13) | 0x1000 for k in [*range(0x1FC00, 0x1FC08), *range(0x1C400, 0x1C408)]]
    # fp16's subnormal range, each binade from 2**-24 to 2**-15: its bottom, middle, top, a tie
    words += [0x33800000 + (e << 23) + m for e in range(10)
              for m in (0, 0x400000, 0x7FFFFF, 0x1000)]
    words += [w | 0x80000000 for w in words]
    return words


def random_words(n, seed) -> torch.Tensor:
    """fp32 patterns: n random words (every exponent), fp16's subnormal range densely, bf16
    ties, and the edge cases."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n // 4,), generator=g) << 31
    small = sign | (torch.randint(90, 113, (n // 4,), generator=g) << 23) \
        | torch.randint(0, 1 << 23, (n // 4,), generator=g)  # 2**-37 .. 2**-14
    ties = (torch.randint(0, 1 << 16, (n // 8,), generator=g) << 16) | 0x8000
    words = torch.cat([torch.randint(0, 1 << 32, (n,), generator=g), small, ties,
                       torch.tensor(edge_words(), dtype=torch.int64)])
    return words_to_fp32(words)


# -- 1. the kernel twins against the torch twins ---------------------------------------------------

@triton.jit
def _rounding_probe(x_ptr, r_ptr, p_in_ptr, rem_in_ptr, key_ptr, step_ptr, stream_ptr, bits_ptr,
                    sr_bf16_ptr, sr_fp16_ptr, srr_bf16_ptr, srr_fp16_ptr, p_ptr, rem_ptr, back_ptr,
                    join_ptr, start, n, BLOCK: tl.constexpr):
    """Every primitive of kernels/rounding.py on n elements, element offsets ``start + i`` as in
    kernels/update.py (int64 there)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    offs = start + i.to(tl.int64)
    s = krounding.stream(tl.load(key_ptr), tl.load(step_ptr))
    tl.store(stream_ptr + i, s.to(tl.int64) + i * 0, mask=i == 0)
    r01 = krounding.element_bits(s, offs, False)
    r23 = krounding.element_bits(s, offs, True)
    tl.store(bits_ptr + i, r01.to(tl.int64), mask=mask)
    tl.store(bits_ptr + n + i, r23.to(tl.int64), mask=mask)
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    tl.store(sr_bf16_ptr + i, krounding.stochastic(x, tl.bfloat16, r01), mask=mask)  # column 0
    tl.store(sr_fp16_ptr + i, krounding.stochastic(x, tl.float16, r23 >> 16), mask=mask)  # 3
    r = tl.load(r_ptr + i, mask=mask, other=0).to(tl.uint32, bitcast=True)
    tl.store(srr_bf16_ptr + i, krounding.stochastic(x, tl.bfloat16, r), mask=mask)
    tl.store(srr_fp16_ptr + i, krounding.stochastic(x, tl.float16, r), mask=mask)
    p, rem = krounding.split_bf16(x)
    tl.store(p_ptr + i, p, mask=mask)
    tl.store(rem_ptr + i, rem, mask=mask)
    tl.store(back_ptr + i, krounding.join_bf16(p, rem), mask=mask)
    tl.store(join_ptr + i, krounding.join_bf16(tl.load(p_in_ptr + i, mask=mask, other=0.0),
                                               tl.load(rem_in_ptr + i, mask=mask, other=0)),
             mask=mask)


PROBE_BLOCK = 1 << 16


def run_probe(x, r, p_in, rem_in, key, step, start):
    """The probe's outputs for fp32 ``x`` (with chosen bits ``r``: int64 words), (bf16, int16)
    pairs to join, a key and an fp32 step counter value."""
    n = x.numel()
    out = dict(stream=torch.zeros(1, dtype=torch.int64), bits=torch.empty(2 * n, dtype=torch.int64),
               sr_bf16=torch.empty(n, dtype=BF16), sr_fp16=torch.empty(n, dtype=FP16),
               srr_bf16=torch.empty(n, dtype=BF16), srr_fp16=torch.empty(n, dtype=FP16),
               p=torch.empty(n, dtype=BF16), rem=torch.empty(n, dtype=torch.int16),
               back=torch.empty(n, dtype=FP32), join=torch.empty(n, dtype=FP32))
    out = {k: v.to(DEVICE) for k, v in out.items()}
    r32 = torch.where(r >= 1 << 31, r - (1 << 32), r).to(torch.int32)
    _rounding_probe[(triton.cdiv(n, PROBE_BLOCK),)](
        x.to(DEVICE), r32.to(DEVICE), p_in.to(DEVICE), rem_in.to(DEVICE),
        torch.tensor([key], dtype=torch.int64, device=DEVICE),
        torch.tensor([float(step)], dtype=FP32, device=DEVICE), out["stream"], out["bits"],
        out["sr_bf16"], out["sr_fp16"], out["srr_bf16"], out["srr_fp16"], out["p"], out["rem"],
        out["back"], out["join"], start, n, BLOCK=PROBE_BLOCK)
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's fp16 casts
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("seed,position,step,start", [
    (0, 0, 1, 0), (12345, 3, 2, 1000), (2 ** 31 - 2, 7, 1000, 2 ** 32 - 5000),
    (2 ** 63 - 1, 2 ** 20, 2 ** 24, 3 * 2 ** 32 + 17)], ids=["first", "small", "wrap", "large"])
def test_kernel_rounding_twins_match_torch_twins_bit_for_bit(seed, position, step, start):
    """stream, element_bits (whole 32-bit hashes, and random_bits' four 16-bit columns from
    them), stochastic (bf16 and fp16, hashed and chosen bits: 0, 0xFFFF, 0x8000, 0x1000, 0x1FFF
    among them, high halves set), split_bf16 and join_bf16 (of split's outputs and of any pair):
    kernel == torch, bit for bit, NaN as NaN. Offsets from ``start`` (past 2**32: wrapped)."""
    x = random_words(4096, seed=position)
    n = x.numel()
    g = torch.Generator().manual_seed(step)
    r = torch.randint(0, 1 << 32, (n,), generator=g)
    chosen = torch.tensor([0, 0xFFFF, 0x8000, 0x7FFF, 0x1000, 0x1FFF, 0xFFFFFFFF, 0xFFFF0000])
    r[: n // 2] = chosen.repeat(n // 16 + 1)[: n // 2]
    p_in = torch.randint(-(1 << 15), 1 << 15, (n,), generator=g).to(torch.int16).view(BF16)
    rem_in = torch.randint(-(1 << 15), 1 << 15, (n,), generator=g).to(torch.int16)
    key = rounding.tensor_key(seed, position)
    assert 0 <= key <= MASK
    out = run_probe(x, r, p_in, rem_in, key, step, start)

    stream = rounding.stream(key, torch.tensor(float(step)))
    assert stream.dtype == torch.int64 and int(out["stream"][0]) == int(stream)
    cols = [rounding.random_bits(stream, c, start, (n,)) for c in range(4)]
    r01, r23 = out["bits"][:n], out["bits"][n:]
    assert_same(r01, rounding.element_bits(stream, False, start, (n,)), "first hash")
    assert_same(r23, rounding.element_bits(stream, True, start, (n,)), "second hash")
    for c, (word, shift) in enumerate([(r01, 0), (r01, 16), (r23, 0), (r23, 16)]):
        assert_same((word >> shift) & 0xFFFF, cols[c], f"random bits, column {c}")
    assert_same(out["sr_bf16"], rounding.stochastic_round(x, BF16, cols[0]), "stochastic bf16")
    assert_same(out["sr_fp16"], rounding.stochastic_round(x, FP16, cols[3]), "stochastic fp16")
    assert_same(out["srr_bf16"], rounding.stochastic_round(x, BF16, r & 0xFFFF), "chosen bf16")
    assert_same(out["srr_fp16"], rounding.stochastic_round(x, FP16, r & 0xFFFF), "chosen fp16")
    p, rem = rounding.split_bf16(x)
    assert_same(out["p"], p, "split: param")
    assert_same(out["rem"], rem, "split: remainder")
    assert_same(out["back"], rounding.join_bf16(p, rem), "join(split)")
    assert_same(out["join"], rounding.join_bf16(p_in, rem_in), "join of any pair")
    # the probe exercised what it claims: NaN, inf, subnormal inputs and both rounding directions
    assert x.isnan().any() and x.isinf().any() and ((x != 0) & (x.abs() < 2 ** -126)).any()
    up = out["srr_bf16"].double().abs() > x.double().abs()
    assert up.any() and (~up & (out["srr_bf16"].double() != x.double())).any()


# -- 2. the random bits are well spread ------------------------------------------------------------

def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).mean() / (a.std() * b.std()))


def test_random_bits_are_well_spread():
    """For three (seed, position, step) streams, each of the four 16-bit columns of 2**16
    elements: values in [0, 2**16), every bit set half the time and the mean at 32767.5 (5 sigma),
    chi-square over 256 bins of the high and of the low byte under df + 6 sd (df 255, sd
    sqrt(510)), no correlation between neighbouring elements or between columns (5 / sqrt(n));
    columns never equal more often than chance. Other steps, positions and seeds give unrelated
    bits, and 10000 steps give 10000 different streams."""
    n = 1 << 16
    z = 5.0 / math.sqrt(n)
    chi2_bound = 255 + 6 * math.sqrt(2 * 255)
    streams = {}
    for seed, position, step in [(0, 0, 1), (12345, 3, 2), (2 ** 31 - 2, 7, 1000)]:
        key = rounding.tensor_key(seed, position)
        s = rounding.stream(key, torch.tensor(float(step)))
        streams[seed, position, step] = s
        cols = [rounding.random_bits(s, c, 0, (n,)) for c in range(4)]
        for c, r in enumerate(cols):
            what = (seed, position, step, c)
            assert r.dtype == torch.int64 and int(r.min()) >= 0 and int(r.max()) < 1 << 16, what
            ones = torch.stack([(r >> b) & 1 for b in range(16)]).double().mean(dim=1)
            assert ((ones - 0.5).abs() <= 0.5 * z).all(), (what, ones.tolist())
            sd_mean = 65536 / math.sqrt(12 * n)
            assert abs(float(r.double().mean()) - 32767.5) <= 5 * sd_mean, what
            for byte in (r >> 8, r & 0xFF):
                counts = torch.bincount(byte, minlength=256).double()
                chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
                assert chi2 <= chi2_bound, (what, chi2)
            assert abs(_corr(r[:-1], r[1:])) <= z, what
        for a in range(4):
            for b in range(a + 1, 4):
                # equal by chance n / 2**16 = 1 time on average (Poisson: 12 is 1e-9 likely)
                assert int((cols[a] == cols[b]).sum()) <= 12, (seed, a, b)
                assert abs(_corr(cols[a], cols[b])) <= z, (seed, a, b)
    # other steps, positions and seeds: other bits
    key = rounding.tensor_key(7, 1)
    base = rounding.random_bits(rounding.stream(key, torch.tensor(5.0)), 0, 0, (n,))
    others = [rounding.stream(key, torch.tensor(6.0)), rounding.stream(key, torch.tensor(4.0)),
              rounding.stream(rounding.tensor_key(7, 2), torch.tensor(5.0)),
              rounding.stream(rounding.tensor_key(8, 1), torch.tensor(5.0))]
    for s in others:
        r = rounding.random_bits(s, 0, 0, (n,))
        assert int((r == base).sum()) <= 12 and abs(_corr(r, base)) <= z
    keys = {rounding.tensor_key(seed, pos) for seed in range(50) for pos in range(50)}
    assert len(keys) == 2500
    steps = rounding.stream(key, torch.arange(1, 10001, dtype=FP32))
    assert steps.unique().numel() == 10000
    # a piece starting at element k gets the bits of elements k, k + 1, ... (the torch path's
    # 2**18-element pieces and the kernels' blocks see one sequence)
    s = streams[0, 0, 1]
    whole = rounding.random_bits(s, 2, 0, (3, 1000))
    assert torch.equal(rounding.random_bits(s, 2, 1000, (2, 1000)), whole[1:])


# -- 3. stochastic rounding is unbiased ------------------------------------------------------------

def _sr_torch(x, dtype, step):
    """Each element of fp32 ``x`` rounded with its own bits (bf16 from column 0, fp16 from
    column 3, as the probe), on the torch twin."""
    s = rounding.stream(rounding.tensor_key(99, 0), torch.tensor(float(step)))
    column = 0 if dtype == BF16 else 3
    return rounding.stochastic_round(x, dtype, rounding.random_bits(s, column, 0, x.shape))


def _sr_kernel(x, dtype, step):
    """The same through the probe kernel (bf16 takes column 0, fp16 column 3, as there)."""
    flat = x.reshape(-1)
    n = flat.numel()
    out = run_probe(flat, torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=BF16),
                    torch.zeros(n, dtype=torch.int16), rounding.tensor_key(99, 0), step, 0)
    return out["sr_bf16" if dtype == BF16 else "sr_fp16"].reshape(x.shape)


# (dtype, lower neighbour's magnitude): bf16 and fp16 normals, subnormals, and the gap above 0
NEIGHBOURS = [
    (BF16, 1.0), (BF16, 3.5), (BF16, 2.0 ** 100 * 1.5), (BF16, 2.0 ** -100),
    (BF16, 2.0 ** -130), (BF16, 0.0), (BF16, 2.0 ** -126 - 2.0 ** -133),
    (FP16, 1.0), (FP16, 1000.0), (FP16, 2.0 ** -14), (FP16, 37 * 2.0 ** -24), (FP16, 0.0),
    (FP16, 1023 * 2.0 ** -24), (FP16, 2.0 ** -15),
]
FRACTIONS = [0.5, 0.25, 1 / 3, 0.1, 0.9, 0.01, 0.99, 1 / 8192]


def binomial_interval(n: int, p: torch.Tensor, tail: float = 3e-7):
    """(lo, hi) with P(K < lo) <= tail and P(K > hi) <= tail for K ~ Binomial(n, p), per p (the
    exact tails in float64: 3e-7 is a normal's 5 sigma, without its error for n p near 0)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    p = p.double().clamp(1e-300, 1 - 1e-16)[:, None]
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * torch.log(p) + (n - k) * torch.log1p(-p))
    cdf = torch.exp(log_pmf).cumsum(dim=1)
    lo = (cdf < tail).sum(dim=1)  # the first k with P(K <= k) >= tail
    hi = (cdf < 1 - tail).sum(dim=1)  # the first k with P(K > k) < tail
    return lo, hi


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 2**100 to fp16
@pytest.mark.parametrize("twin", ["torch", "kernel"])
def test_stochastic_rounding_is_unbiased(twin):
    """x = sign * (a + f * gap) with a a bf16/fp16 value, gap the format's gap above a (its own
    float64 formula) and f a multiple of 2**-13: n roundings, each with its own element's bits,
    give only sign * a and sign * (a + gap) (both for 1/8192 < f < 1); the count K of those away
    from a is Binomial(n, f): inside its 5-sigma interval (tails of 3e-7), so the mean
    a + gap K / n is x within 5 sigma = 5 gap sqrt(f (1 - f) / n) where n f (1 - f) is large.
    fp16 subnormals may round up with f + 2**-16 (16 bits of the fraction): their interval is
    that of [f - 2**-16, f + 2**-16]. Both signs, at two steps (the kernel twin, bit for bit the
    same by test 1, at one step and 1024 roundings: the interpreter's numpy is slow)."""
    sr = _sr_torch if twin == "torch" else _sr_kernel
    n, steps = (4096, (1, 2)) if twin == "torch" else (1024, (3,))
    f = torch.tensor([round(f * 8192) / 8192 for f in FRACTIONS], dtype=torch.float64)
    both = (f * n > 8) & ((1 - f) * n > 8)  # all but f = 1/8192
    assert both.sum() == len(FRACTIONS) - 1
    for dtype in (BF16, FP16):
        rows = []  # (a, sign, gap, bias) per row of len(FRACTIONS) values
        for a in [a for d, a in NEIGHBOURS if d == dtype]:
            base = torch.tensor(a, dtype=torch.float64)
            assert float(base.to(dtype)) == a  # a neighbour is a value of the format
            bias = 2.0 ** -16 if dtype == FP16 and a < 2.0 ** -14 else 0.0
            rows += [(a, sign, float(ulp(base, dtype)), bias) for sign in (1.0, -1.0)]
        a, sign, gap, bias = (torch.tensor(c, dtype=torch.float64)[:, None] for c in zip(*rows))
        x64 = sign * (a + f * gap)  # [rows, fractions]
        x = x64.to(FP32)
        assert torch.equal(x.double(), x64)  # exact in fp32
        k_lo = binomial_interval(n, (f - bias).flatten())[0].reshape(x.shape)
        k_hi = binomial_interval(n, (f + bias).flatten())[1].reshape(x.shape)
        for step in steps:
            out = sr(x[..., None].expand(-1, -1, n).contiguous(), dtype, step).double()
            lo, hi = (sign * a)[..., None], (sign * (a + gap))[..., None]
            assert ((out == lo) | (out == hi)).all(), (dtype, step)
            k = (out == hi).sum(dim=2)
            bad = (k < k_lo) | (k > k_hi)
            assert not bad.any(), (dtype, step, bad.nonzero().tolist(), k[bad].tolist(),
                                   k_lo[bad].tolist(), k_hi[bad].tolist())
            mean, sd = out.mean(dim=2), gap * torch.sqrt(f * (1 - f) / n)
            normal = n * f * (1 - f) >= 25
            assert ((mean - x64).abs() <= 5 * sd + bias * gap)[:, normal].all(), (dtype, step)
            assert (out == hi).any(dim=2)[:, both].all() and (out == lo).any(dim=2)[:, both].all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("twin", ["torch", "kernel"])
def test_stochastic_rounding_keeps_representable_values(twin):
    """Every bf16 value (all 65536 patterns, NaNs apart) and every fp16 value, as fp32, rounded
    stochastically with random bits, comes back unchanged, +-0, +-inf and subnormals included."""
    sr = _sr_torch if twin == "torch" else _sr_kernel
    for dtype in (BF16, FP16):
        values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        values = values[~values.isnan()]
        assert values.isinf().sum() == 2 and (values.float() == 0).sum() == 2
        assert_same(sr(values.float(), dtype, 3), values, f"{dtype} kept")


# -- 4. split and join -----------------------------------------------------------------------------

def test_split_join_round_trip_and_nearest_ties_away():
    """split_bf16 then join_bf16 gives back every non-NaN fp32 pattern of 2**20 random words and
    the edge cases, bit for bit; the bf16 param is x rounded to nearest with ties away from zero
    (float64 oracle), so within half a bf16 gap of a finite x (ties exactly half, rounded up in
    magnitude); the remainder is negative exactly where the param is larger in magnitude than x;
    a NaN gives a NaN param and comes back a NaN."""
    x = random_words(1 << 20, seed=5)
    p, rem = rounding.split_bf16(x)
    assert p.dtype == BF16 and rem.dtype == torch.int16
    nan = x.isnan()
    assert nan.any() and p[nan].isnan().all() and rounding.join_bf16(p, rem)[nan].isnan().all()
    back = rounding.join_bf16(p, rem)
    assert_same(back[~nan], x[~nan], "join(split(x))")
    assert_same(p, bf16_nearest_ties_away(x), "param: to nearest, ties away")
    finite = x.isfinite() & p.isfinite()
    x64, p64 = x.double()[finite], p.double()[finite]
    half = ulp(x64, BF16) / 2
    assert ((p64 - x64).abs() <= half).all()
    tie = (p64 - x64).abs() == half
    assert tie.sum() >= 100_000 and (p64[tie].abs() > x64[tie].abs()).all()
    assert torch.equal(rem[finite] < 0, p64.abs() > x64.abs())
    # the cases by hand: 1 + 2**-8 is a tie (up), 1 + 2**-8 - 2**-23 not, -1 - 2**-8 up in |.|;
    # fp32 max and bf16 max + half a gap go to inf and still come back
    cases = torch.tensor([1 + 2 ** -8, 1 + 2 ** -8 - 2 ** -23, -1 - 2 ** -8], dtype=FP32)
    assert rounding.split_bf16(cases)[0].tolist() == [1 + 2 ** -7, 1.0, -1 - 2 ** -7]
    big = words_to_fp32([0x7F7FFFFF, 0x7F7F8000, 0xFF7F8000, 0x7F7F7FFF])
    p, rem = rounding.split_bf16(big)
    assert p.tolist()[:3] == [math.inf, math.inf, -math.inf] and math.isfinite(p[3])
    assert_same(rounding.join_bf16(p, rem), big, "around bf16's max")


# -- 5. whole steps: the torch path against the kernels --------------------------------------------

# every state column in use: SGD's buffer (Nesterov), Adam's AMSGrad max, RMSprop's three,
# Adagrad's lr decay, NAdam's mu_product, RAdam's rectified branch (beta2 0.8: from step 7);
# max_grad_value on two (a norm clip sums in another order on each path:
# test_norm_clip_matches_within_tolerance)
HYPER = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, max_grad_value=1.0),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1, max_grad_value=1.5),
    "AdamW": dict(lr=0.01, weight_decay=0.1, maximize=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
    "NAdam": dict(lr=0.01, momentum_decay=0.01, weight_decay=0.1),
    "RAdam": dict(lr=0.01, betas=(0.9, 0.8), weight_decay=0.1, decoupled_weight_decay=True),
    "Adamax": dict(lr=0.01, weight_decay=0.1),
    "Lion": dict(lr=0.01, weight_decay=0.5),
}
STEPS = {"RAdam": 7}  # 3 for the others
COMBOS = {
    "bf16-sr": (BF16, dict(stochastic_rounding=True)),
    "fp16-sr": (FP16, dict(stochastic_rounding=True)),
    "bf16-master": (BF16, dict(master_weights=True)),
    "fp16-master": (FP16, dict(master_weights=True)),
    "fp32-bf16states": (FP32, dict(state_dtype=BF16)),
    "fp32-bf16states-sr": (FP32, dict(state_dtype=BF16, stochastic_rounding=True)),
    "fp16-master-bf16states-sr": (FP16, dict(master_weights=True, state_dtype=BF16,
                                             stochastic_rounding=True)),
    "bf16-master-fp16states-sr": (BF16, dict(master_weights=True, state_dtype=FP16,
                                             stochastic_rounding=True)),
}
SHAPES = [(17,), (1000,), (1,), (3, 1000)]  # two groups: the first two, the last two
MASTER_KEYS = ("master_remainder", "master_param")


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE, dtype))
            for s in shapes]


def set_grads(params, step, dtype=None):
    """Step ``step``'s grads (N(0, 1)), made in ``dtype`` (default each param's) and cast to the
    param's dtype: bf16 grads upcast to fp32 for an fp32 twin run."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype or p.dtype)
        p.grad = grad.to(DEVICE, p.dtype)


def make_opt(name, params, backend, options, hyper=None, groups=True):
    """``name`` with HYPER's settings (or ``hyper``) and the memory ``options``; two param groups
    (the second with a third of the lr and its own rounding seed) unless ``groups`` is False."""
    hyper = dict(HYPER[name] if hyper is None else hyper)
    if groups:
        half = len(params) // 2
        params = [dict(params=params[:half]),
                  dict(params=params[half:], lr=hyper["lr"] / 3, rounding_seed=4321)]
    options = dict(dict(rounding_seed=1234), **options)  # not drawn: both runs take the same
    return getattr(fusedopt, name)(params, **hyper, **options, backend=backend)


def run(name, dtype, options, backend, steps, shapes=SHAPES, hyper=None, seed=0, groups=True,
        grad_dtype=None, init_dtype=None):
    """``steps`` steps of ``name`` on SHAPES' params in ``dtype`` (initialised to values of
    ``init_dtype``, fed grads made in ``grad_dtype``): (params, optimizer)."""
    params = [torch.nn.Parameter(p.detach().to(dtype))
              for p in make_params(shapes, init_dtype or dtype, seed)]
    opt = make_opt(name, params, backend, options, hyper, groups)
    for step in range(steps):
        set_grads(params, step, grad_dtype)
        opt.step()
    return params, opt


def check_layout(opt, params, dtype, options):
    """The state the options say: the master column of the param's kind, a step counter under
    stochastic rounding, every state column (p's shape) in the state dtype."""
    state_dtype = options.get("state_dtype") or dtype
    master = bool(options.get("master_weights")) and dtype in (BF16, FP16)
    for p in params:
        st = opt.state[p]
        assert ("master_remainder" in st) == (master and dtype == BF16), list(st)
        assert ("master_param" in st) == (master and dtype == FP16), list(st)
        if master:
            m = st["master_remainder" if dtype == BF16 else "master_param"]
            assert m.dtype == (torch.int16 if dtype == BF16 else FP32) and m.shape == p.shape
        if options.get("stochastic_rounding"):
            assert st["step"].dtype == FP32 and st["step"].dim() == 0
        columns = [v for k, v in st.items() if k not in MASTER_KEYS and v.shape == p.shape]
        assert columns or (type(opt).__name__ == "SGD" and opt.defaults["momentum"] == 0)
        assert all(v.dtype == state_dtype for v in columns), [(k, v.dtype) for k, v in st.items()]


def assert_runs_equal(a_params, a_opt, b_params, b_opt, what=""):
    """Params and every state value, bit for bit (NaN as NaN)."""
    for i, (p, q) in enumerate(zip(a_params, b_params)):
        assert_same(p, q, f"{what} param {i}")
        sa, sb = a_opt.state[p], b_opt.state[q]
        assert sorted(sa) == sorted(sb), (what, i, sorted(sa), sorted(sb))
        for key in sa:
            assert_same(sa[key], sb[key], f"{what} param {i} {key}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("name", NAMES)
def test_triton_matches_torch_path_bit_for_bit(name, combo):
    """A few steps of two param groups of odd sizes (1, 17, 1000 and 3000: full blocks and masked
    tails) with the option combination: the kernels' params and every state tensor (moments,
    remainders, fp32 copies, step counters, mu_product) equal the torch path's bit for bit, and
    are laid out as the options say."""
    dtype, options = COMBOS[combo]
    steps = STEPS.get(name, 3)
    ref_p, ref = run(name, dtype, options, "torch", steps)
    tri_p, tri = run(name, dtype, options, "triton", steps)
    check_layout(ref, ref_p, dtype, options)
    check_layout(tri, tri_p, dtype, options)
    assert_runs_equal(ref_p, ref, tri_p, tri, f"{name} {combo}")
    assert any(not torch.equal(p, q) for p, q in zip(tri_p, make_params(SHAPES, dtype))), "moved"


@pytest.mark.parametrize("lean_group", [0, 1])
@pytest.mark.parametrize("name", ["SGD", "Lion"])
def test_groups_with_and_without_options(name, lean_group):
    """One group with stochastic rounding and remainders, the other plain bf16, in one launch per
    group and one shared norm pass (max_grad_norm 1e9: the coefficient is exactly 1): the lean
    group's params and state equal the torch path's bit for bit; SGD and Lion keep a step
    counter and a remainder only there. (The plain group runs torch's own bf16 ops on the torch
    path, which round in between: tests/test_numerics.py bounds it.)"""
    hyper = {k: v for k, v in HYPER[name].items() if k != "max_grad_value"}
    lean, plain = dict(stochastic_rounding=True, master_weights=True), {}
    options = [lean, plain] if lean_group == 0 else [plain, lean]
    runs = []
    for backend in ("torch", "triton"):
        params = make_params(SHAPES, BF16)
        opt = getattr(fusedopt, name)(
            [dict(params=params[:2], **options[0]), dict(params=params[2:], **options[1])],
            **hyper, max_grad_norm=1e9, rounding_seed=3, backend=backend)
        for step in range(3):
            set_grads(params, step)
            opt.step()
        mine = slice(2 * lean_group, 2 * lean_group + 2)
        other = slice(2 - 2 * lean_group, 4 - 2 * lean_group)
        check_layout(opt, params[mine], BF16, lean)
        assert all("step" not in opt.state[p] for p in params[other])
        check_layout(opt, params[other], BF16, plain)
        runs.append((params[mine], opt))
    assert_runs_equal(*runs[0], *runs[1], f"{name}: the lean group")


def test_torch_path_pieces_take_their_elements_bits(monkeypatch):
    """The torch path cuts a tensor into pieces of CHUNK elements (2**18) and forms each piece's
    bits from its first element's index; the kernels take blocks of 1024. With CHUNK patched to
    700 (pieces that straddle the blocks) RMSprop's four columns (param and three bf16/fp16
    states) come out as the unpatched torch path's and the kernels', bit for bit."""
    import fusedopt._elementwise as elementwise
    name, (dtype, options) = "RMSprop", COMBOS["bf16-master-fp16states-sr"]
    whole = run(name, dtype, dict(options, stochastic_rounding=True), "torch", 2)
    tri = run(name, dtype, options, "triton", 2)
    monkeypatch.setattr(elementwise, "CHUNK", 700)
    pieces = run(name, dtype, options, "torch", 2)
    assert_runs_equal(*whole, *pieces, "pieces of 700")
    assert_runs_equal(*tri, *pieces, "kernels")


@pytest.mark.parametrize("name,combo", [
    (name, ["fp16-master-bf16states-sr", "fp32-bf16states-sr"][i % 2])
    for i, name in enumerate(NAMES)])
def test_norm_clip_matches_within_tolerance(name, combo):
    """With max_grad_norm 0.5 (active: the norm is ~63) the two paths sum the norm in another
    order, so the clip coefficient may differ in its last bits: grad_norm within 1e-6 relative
    (and of the float64 norm); fp32 values (masters, fp32 params, fp32 scalars) within rtol 1e-5,
    atol 1e-5 (RMSprop's centered denominator turns the coefficient's ulp into a few hundred);
    fp16/bf16 values within one ulp of their dtype (a stochastic or nearest rounding may flip)
    and mostly (99%) bit for bit. fp16 and fp32 params only: a bf16 grad's norm is rounded to
    bf16 on the torch path as clip_grad_norm_ rounds it (fusedopt/clip.group_norms), up to 2**-9
    apart from the kernels' fp32 norm."""
    dtype, options = COMBOS[combo]
    hyper = {k: v for k, v in HYPER[name].items() if k != "max_grad_value"}
    hyper["max_grad_norm"] = 0.5
    steps = STEPS.get(name, 3)
    ref_p, ref = run(name, dtype, options, "torch", steps, hyper=hyper)
    tri_p, tri = run(name, dtype, options, "triton", steps, hyper=hyper)
    check_layout(tri, tri_p, dtype, options)
    truth = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in tri_p))
    assert truth > 50  # the clip is active
    assert_close(tri.grad_norm, ref.grad_norm, rtol=1e-6, atol=0)
    assert abs(float(tri.grad_norm) - truth) <= 1e-6 * truth
    flipped = total = 0
    for i, (p, q) in enumerate(zip(ref_p, tri_p)):
        pairs = [("param", p, q)] + [(k, ref.state[p][k], tri.state[q][k]) for k in ref.state[p]]
        assert sorted(ref.state[p]) == sorted(tri.state[q])
        for key, a, b in pairs:
            a, b = a.detach(), b.detach()
            assert a.dtype == b.dtype, (i, key)
            rtol = 1e-5 if a.dtype == FP32 else torch.finfo(a.dtype).eps
            torch.testing.assert_close(b, a, rtol=rtol, atol=1e-5, equal_nan=True,
                                       msg=lambda m: f"{name} {i} {key}: {m}")
            if a.dtype != FP32:
                flipped += int((as_bits(a) != as_bits(b)).sum())
                total += a.numel()
    assert flipped <= 0.01 * total, (flipped, total)


# -- 6. remainders train exactly as fp32 -----------------------------------------------------------

EXACT = {
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "SGD": dict(lr=0.05, momentum=0.9),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(EXACT))
def test_master_weights_train_exactly_as_fp32(name, backend):
    """5 steps of bf16 params with master_weights (int16 remainders) and fp32 states against fp32
    params initialised to the same bf16 values, fed the same bf16 grads upcast, fp32 states:
    ``master_param`` is the fp32 param bit for bit, every state tensor the same, and the bf16
    param is the fp32 param rounded to nearest, ties away from zero (float64 oracle). Likewise
    fp16 params with fp32 copies, their fp16 param the copy rounded as torch casts (to nearest
    even).

    On the kernels against the default fp32 run. On the torch path the default fp32 step is
    torch's own op (fused Adam/SGD, torch.optim's RMSprop: another op order), within fp32
    tolerance; fp32 params with stochastic_rounding=True (a no-op on fp32 values and states that
    takes the rule path) are the exact twin."""
    hyper, steps = EXACT[name], 5
    lean = dict(master_weights=True, state_dtype=FP32)
    for low in (BF16, FP16):
        low_p, low_opt = run(name, low, lean, backend, steps, hyper=hyper)
        check_layout(low_opt, low_p, low, lean)
        twin = {} if backend == "triton" else dict(stochastic_rounding=True)
        f_p, f_opt = run(name, FP32, twin, backend, steps, hyper=hyper, init_dtype=low,
                         grad_dtype=low)
        for i, (p, q) in enumerate(zip(low_p, f_p)):
            master = low_opt.master_param(p)
            assert_same(master, q.detach(), f"{low} {i}: master_param against fp32")
            expected = bf16_nearest_ties_away(q) if low == BF16 else q.detach().to(FP16)
            assert_same(p, expected, f"{low} {i}: param = the fp32 value rounded")
            for key, value in f_opt.state[q].items():
                if key != "step" or name != "SGD":  # SGD's counter exists for the twin's SR only
                    assert_same(low_opt.state[p][key], value, f"{low} {i} {key}")
        assert any(not torch.equal(p.float(), q) for p, q in zip(low_p, f_p))  # a remainder matters
        if backend == "torch":
            plain_p, _ = run(name, FP32, {}, backend, steps, hyper=hyper, init_dtype=low,
                             grad_dtype=low)
            for p, q in zip(low_p, plain_p):
                assert_close(low_opt.master_param(p), q.detach(), rtol=1e-6, atol=1e-6)


# -- 7. what the options are for ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_updates_below_half_an_ulp(backend):
    """bf16 params in [1.25, 1.75] (gap 2**-7), SGD lr 2**-6 on grads 2**-7: each step takes
    2**-13 off, 1/64 of a gap, 300 steps 300 * 2**-13 ~ 4.7 gaps. Plain bf16 (to nearest) never
    moves. Under stochastic rounding a param on the bf16 grid goes one gap down with probability
    exactly 1/64 per step, so each element's moves are Binomial(300, 1/64): every element moved
    a whole number of gaps, their total is inside the 5-sigma interval of Binomial(300 * 1024,
    1/64) (the mean within 5 sigma of 300 * 2**-13) and their variance near 300/64 * 63/64. With
    master weights the fp32 value is p0 - 300 * 2**-13 exactly (float64 oracle: every step is
    exact in fp32) and the bf16 param that rounded to nearest, ties away."""
    n, steps, lr, grad = 1024, 300, 2.0 ** -6, 2.0 ** -7
    g = torch.Generator().manual_seed(3)
    p0 = (1.25 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)).to(BF16)
    gap = 2.0 ** -7
    results = {}
    for label, options in [("plain", {}), ("sr", dict(stochastic_rounding=True)),
                           ("master", dict(master_weights=True))]:
        p = torch.nn.Parameter(p0.clone().to(DEVICE))
        opt = fusedopt.SGD([p], lr=lr, backend=backend, rounding_seed=7, **options)
        p.grad = torch.full_like(p, grad)
        for _ in range(steps):
            opt.step()
        results[label] = (p, opt)  # the Parameter: master_param(p) looks up p's state
    p0 = p0.to(DEVICE)
    assert_same(results["plain"][0], p0, "plain bf16 stays put")
    moves = (p0.double() - results["sr"][0].detach().double()) / gap
    assert torch.equal(moves, moves.round()) and (moves >= 0).all()
    k_lo, k_hi = binomial_interval(steps * n, torch.tensor([1 / 64]))
    assert int(k_lo) <= int(moves.sum()) <= int(k_hi), (int(moves.sum()), steps * n / 64)
    mean_shift = float((p0.double() - results["sr"][0].detach().double()).mean())
    sd = math.sqrt(steps / 64 * 63 / 64 / n) * gap
    assert abs(mean_shift - steps * lr * grad) <= 5 * sd
    assert 0.7 <= float(moves.var()) / (steps / 64 * 63 / 64) <= 1.3
    exact = (p0.double() - steps * lr * grad).float()
    assert torch.equal(exact.double(), p0.double() - steps * lr * grad)  # exact in fp32
    p, opt = results["master"]
    assert_same(opt.master_param(p), exact, "master = fp32 result")
    assert_same(p, bf16_nearest_ties_away(exact), "param = master to nearest")


# -- 8. reproducibility ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rounding_seed_reproducibility(backend):
    """AdamW, bf16 params, stochastic rounding, two groups (the second seeded 4321): the same
    rounding_seed gives the same params and states bit for bit, another seed others; the seed is
    read from param_groups[i]["rounding_seed"] (set there after construction, it is the one used);
    a drawn seed (rounding_seed=None) is an int fixed by torch.manual_seed; state_dict carries it,
    so a resumed run continues bit for bit."""
    shapes, options = [(17,), (1000,), (1,), (300,)], dict(stochastic_rounding=True)

    def go(steps=2, **kw):
        return run("AdamW", BF16, dict(options, **kw), backend, steps, shapes=shapes)

    a, b, c = go(rounding_seed=11), go(rounding_seed=11), go(rounding_seed=12)
    assert [g["rounding_seed"] for g in a[1].param_groups] == [11, 4321]
    assert_runs_equal(*a, *b, "same seed")
    assert sum(int((p != q).sum()) for p, q in zip(a[0][:2], c[0][:2])) > 50  # group 0: seed 12
    assert_runs_equal(a[0][2:], a[1], c[0][2:], c[1], "group 1 keeps its own seed")
    # the group's seed is the one used
    params = [torch.nn.Parameter(p.detach().to(BF16)) for p in make_params(shapes, BF16)]
    opt = make_opt("AdamW", params, backend, dict(options, rounding_seed=11))
    opt.param_groups[0]["rounding_seed"] = 12
    for step in range(2):
        set_grads(params, step)
        opt.step()
    assert_runs_equal(params, opt, *c, "seed set in the group")
    # drawn seeds (the global generator restored afterwards)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        d = go(rounding_seed=None)
        torch.manual_seed(5)
        e = go(rounding_seed=None)
        torch.manual_seed(6)
        f = go(rounding_seed=None)
        full = go(steps=3, rounding_seed=11)
        half_p, half = go(steps=2, rounding_seed=11)
        resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in half_p]
        torch.manual_seed(7)
        resumed = make_opt("AdamW", resumed_p, backend, dict(options, rounding_seed=None))
    seed = d[1].param_groups[0]["rounding_seed"]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 63
    assert d[1].param_groups[1]["rounding_seed"] == 4321  # given, not drawn
    assert e[1].param_groups[0]["rounding_seed"] == seed != f[1].param_groups[0]["rounding_seed"]
    assert_runs_equal(*d, *e, "same manual_seed")
    assert any(not torch.equal(p, q) for p, q in zip(d[0], f[0]))
    # resume from a state_dict into an optimizer that drew another seed
    assert resumed.param_groups[0]["rounding_seed"] != 11
    resumed.load_state_dict(half.state_dict())
    assert [g["rounding_seed"] for g in resumed.param_groups] == [11, 4321]
    set_grads(resumed_p, 2)
    resumed.step()
    assert_runs_equal(*full, resumed_p, resumed, "resumed")
