"""Numerics of the kernels against torch, bit for bit where the two can agree (issue 9):

- every bf16 store rounds to nearest even as torch does (kernels/_common.round_to), where the
  interpreter's cast truncates;
- AMSGrad's running max keeps a NaN, as torch.maximum;
- every launch pins FMA contraction (_common.FP_FUSION);
- fp16 gradient norms past 65504 stay finite on both paths (fusedopt/clip.py's docstring).

On a GPU the kernels run on CUDA; without one, under TRITON_INTERPRET=1 (conftest.py).
"""
import math
import warnings

import pytest
import torch
import triton
import triton.language as tl

import fusedopt
from conftest import DEVICE, assert_close
from fusedopt.kernels import _common
from fusedopt.kernels._common import round_to

BF16_NAN = 0x7FC0  # c10::BFloat16's NaN, what round_to stores for every NaN


@triton.jit
def _round_probe(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, round_to(x, DTYPE), mask=offs < n)


def _fp32_patterns() -> torch.Tensor:
    """fp32 values by their bits: random words, and the cases rounding to bf16 can get wrong."""
    g = torch.Generator().manual_seed(0)
    words = [torch.randint(0, 2 ** 32, (8192,), generator=g)]
    high = torch.randint(0, 2 ** 16, (1024,), generator=g) << 16  # kept halves, both parities
    words += [high | 0x8000, high | 0x7FFF, high | 0x8001]  # ties, just below, just above
    sign = torch.randint(0, 2, (512,), generator=g) << 31
    words.append(sign | torch.randint(1, 2 ** 23, (512,), generator=g))  # subnormals
    special = [
        0x00000000, 0x7F800000,                          # 0, inf
        0x7F800001, 0x7F808000, 0x7F80FFFF, 0x7FBF8000,  # NaNs whose low bits would carry
        0x7FC00000, 0x7FFFFFFF, 0x7FFF8000,
        0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7FFFFF,  # around bf16's max 0x7F7F: below, tie
        0x7F7E8000, 0x7F7EFFFF,                          #   (odd: to inf), above; even tie
        0x00000001, 0x00008000, 0x00018000, 0x00007FFF,  # smallest subnormals, ties to even
        0x007FFFFF, 0x00800000, 0x007F8000,              # around the smallest normal
        0x3F808000, 0x3F818000, 0x3F80C000, 0x3F804000,  # ties at 1.0 both ways
    ]
    special = torch.tensor(special)
    words += [special, special | (1 << 31)]  # and their negatives
    words = torch.cat(words)
    return ((words + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32).view(torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_round_to_matches_torch_bit_for_bit(dtype):
    """round_to against torch's own cast, over random words, exact ties both ways, subnormals,
    +-0, +-inf, NaNs with low payload bits, and values around bf16's max. NaN stays NaN: bf16's is
    0x7FC0 (torch's scalar cast; its vectorized CPU cast gives 0xFFFF and CUDA 0x7FFF, other NaNs),
    fp16's payload is the cast's own."""
    x = _fp32_patterns().to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    block = 4096
    _round_probe[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), DTYPE=_common.triton_dtype(dtype), BLOCK=block,
        enable_fp_fusion=_common.FP_FUSION)
    expected = x.to(dtype)
    nan = x.isnan()
    assert out[nan].isnan().all() and expected[nan].isnan().all()
    if dtype == torch.bfloat16:
        assert (out[nan].view(torch.int16) == BF16_NAN).all()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    mismatch = (out.view(bits) != expected.view(bits)) & ~nan
    assert not mismatch.any(), [(hex(int(w) & 0xFFFFFFFF), float(a), float(b)) for w, a, b in zip(
        x.view(torch.int32)[mismatch][:8], out[mismatch][:8], expected[mismatch][:8])]


def test_adamw_bf16_zero_grads_moves_nothing_as_torch():
    """The issue's repro: bf16 params, weight_decay 1e-2, default lr, 50 steps of zero grads.
    Each step multiplies p by 1 - 1e-5, under half a bf16 ulp, so torch rounds back to p; the
    interpreter's truncating cast took an ulp off every step (params shrank by 23%)."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).to(DEVICE, torch.bfloat16) for s in ((1000,), (37,), ())]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    opt = fusedopt.AdamW(ours, weight_decay=1e-2, backend="triton")
    ref = torch.optim.AdamW(theirs, weight_decay=1e-2)
    for _ in range(50):
        for p in ours + theirs:
            p.grad = torch.zeros_like(p)
        opt.step()
        ref.step()
    for a, b, p0 in zip(ours, theirs, start):
        assert torch.equal(b, p0)
        assert torch.equal(a, b)


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(torch.bfloat16).tiny
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(x.clamp_min(tiny))))


LOW = {
    "sgd-momentum": ("SGD", dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov-wd-value": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                          max_grad_value=2.0)),
    "adam-wd": ("Adam", dict(lr=0.01, weight_decay=0.1)),
    "adamw-amsgrad": ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
}


@pytest.mark.parametrize("config", list(LOW))
def test_bf16_steps_match_the_torch_path_but_for_fma(config):
    """7 bf16 steps with real grads; each step, from the Triton run's state, the Triton result
    against fusedopt's torch path run on that same state, for the params and every state tensor.

    The reference computes in fp32 and rounds once to bf16 (RNE): for Adam that is the torch path
    in bf16 (torch's fused Adam computes in fp32). For SGD it is the torch path in fp32, rounded:
    in bf16 on CPU that path is torch's foreach SGD, which rounds lr to bf16 (0.1 -> 0.10009765625)
    and rounds after every op: 21-27% of elements differ. (On CUDA both dtypes take torch's fused
    SGD, fp32 inside, one rounding.)

    Not bit for bit: torch's CPU kernels fuse multiply-adds and the interpreter has no FMA. Where
    the two fp32 results straddle a bf16 rounding boundary they round one bf16 ulp apart; where a
    result cancels to ~0 (p = lr * g in fp32), the FMA keeps a residue ~2^-24 of the operands that
    the separate ops round away. Measured: 0 to 4 of 60K-120K elements over the 7 steps, each
    within one bf16 ulp of the largest of the old and new magnitudes; the truncating cast differed
    in 44-50% of them."""
    name, kwargs = LOW[config]
    cls = getattr(fusedopt, name)
    ref_dtype = torch.float32 if name == "SGD" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    shapes = [(), (1,), (127,), (4097,), (3, 5, 2), (9,)]
    tri_p = [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, torch.bfloat16))
             for s in shapes]
    tri = cls(tri_p, **kwargs, backend="triton")
    compared = differ = 0
    for step in range(7):
        grads = [torch.randn(s, generator=g).to(DEVICE, torch.bfloat16) for s in shapes]
        ref_p = [torch.nn.Parameter(p.detach().to(ref_dtype, copy=True)) for p in tri_p]
        ref = cls(ref_p, **kwargs, backend="torch")
        for t, r, grad in zip(tri_p, ref_p, grads):
            ref.state[r] = {k: v.to(ref_dtype if k != "step" else v.dtype, copy=True)
                            for k, v in tri.state[t].items()}
            t.grad, r.grad = grad.clone(), grad.to(ref_dtype, copy=True)
        before = {(i, k): v.detach().clone() for i, t in enumerate(tri_p)
                  for k, v in [("param", t)] + list(tri.state[t].items())}
        tri.step()
        ref.step()
        for i, (t, r) in enumerate(zip(tri_p, ref_p)):
            pairs = [("param", t, r)] + [(k, v, ref.state[r][k]) for k, v in tri.state[t].items()
                                         if k != "step"]
            for k, t, r in pairs:
                b = before.get((i, k), torch.zeros_like(t)).float()  # state made by this step
                t, r = t.detach().float(), r.detach().to(torch.bfloat16).float()
                off = t != r
                compared, differ = compared + t.numel(), differ + int(off.sum())
                bound = _ulp_bf16(torch.maximum(torch.maximum(t.abs(), r.abs()), b.abs()))
                assert ((t - r).abs() <= bound).all(), (step, k, t[off], r[off], b[off])
    assert differ <= 1e-4 * compared, (differ, compared)


@pytest.mark.parametrize("nan_in", ["grad", "exp_avg_sq"])
def test_amsgrad_keeps_nan_as_torch(nan_in):
    """A NaN reaching v must reach max_exp_avg_sq (torch.maximum keeps it; PTX max.f32 and the
    interpreter's np.fmax drop it). Through a NaN gradient, v, m and p all go NaN and only the max
    shows it; through a NaN in exp_avg_sq (m finite), the param itself is NaN in torch and stayed
    finite in the kernel. (That NaN goes in on the last step: the kernel's g + 0.0 * p would take
    a NaN p into exp_avg, which torch, skipping a zero weight decay, does not; rules.py's issue.)"""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).to(DEVICE) for s in ((127,), (4097,))]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    opt = fusedopt.Adam(ours, lr=0.01, amsgrad=True, backend="triton")
    ref = torch.optim.Adam(theirs, lr=0.01, amsgrad=True, foreach=False)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g).to(DEVICE) for p in start]
        if step == (1 if nan_in == "grad" else 2):
            if nan_in == "grad":
                grads[0][5] = float("nan")
            else:
                for o, params in ((opt, ours), (ref, theirs)):
                    o.state[params[1]]["exp_avg_sq"][7] = float("nan")
        for a, b, grad in zip(ours, theirs, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert_close(a, b)
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert_close(opt.state[a][k], ref.state[b][k])
    nan_max = ref.state[theirs[0 if nan_in == "grad" else 1]]["max_exp_avg_sq"].isnan()
    assert nan_max.sum() == 1


class _LaunchRecorder:
    """Wraps a kernel like conftest.LaunchCounter, recording each launch's enable_fp_fusion."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.seen.append((self.name, kwargs.get("enable_fp_fusion", "unset")))
            return self.kernel[grid](*args, **kwargs)
        return run


def test_every_launch_pins_fp_fusion(monkeypatch):
    """Every launch passes enable_fp_fusion=FP_FUSION (True), so triton's default (on in 3.9, off
    from 3.10) never decides, and triton 3.9 has nothing to warn about. The warning comes from
    triton's compile step, once per process: under the interpreter it never fires either way, so
    there the launch keywords are the test; on a GPU the step below also must not warn."""
    import fusedopt.kernels.norm as norm
    import fusedopt.kernels.update as update
    assert _common.FP_FUSION is True
    seen = []
    for module, attr in ((norm, "_norm_kernel"), (update, "_update_kernel")):
        monkeypatch.setattr(module, attr, _LaunchRecorder(getattr(module, attr), attr, seen))
    warn_once = getattr(getattr(triton, "_utils", None), "warn_once", None)
    if hasattr(warn_once, "cache_clear"):  # triton 3.9 warns once per process: let it warn again
        warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cls, kwargs in ((fusedopt.SGD, dict(lr=0.1, momentum=0.9)), (fusedopt.AdamW, {})):
            params = [torch.nn.Parameter(torch.randn(33, device=DEVICE)) for _ in range(2)]
            opt = cls(params, **kwargs, max_grad_norm=1.0, backend="triton")
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    assert {name for name, _ in seen} == {"_norm_kernel", "_update_kernel"}
    assert all(value is True for _, value in seen), seen
    assert not [w for w in caught if "FP_FUSION" in str(w.message)]


def _fp16_grads():
    """~1e5 total L2 norm: 89.6K in one tensor (past fp16's 65504 on its own), 45K in another."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4096, generator=g) * 1400, torch.randn(127, generator=g) * 4000,
             torch.randn(3, 5, 2, generator=g)]
    return [x.to(DEVICE, torch.float16) for x in grads]


def _fp16_clip_step(backend):
    """One plain SGD step (lr 1) from zero fp16 params with max_grad_norm 1: the params come out as
    the clipped update, -g * max_norm / (norm + 1e-6), rounded once to fp16."""
    grads = _fp16_grads()
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    opt = fusedopt.SGD(params, lr=1.0, max_grad_norm=1.0, backend=backend)
    for p, x in zip(params, grads):
        p.grad = x.clone()
    opt.step()
    return opt.grad_norm, [p.detach() for p in params]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_norm_past_65504_clips_as_float64(backend):
    """Both paths accumulate fp16 norms in fp32 and return fp32: the norm within 1e-5 of float64
    (fp32 sums of ~4K squares; a tensor's fp16 norm would be inf), the clipped update within
    1e-3 of the float64 clip: the result's own fp16 rounding is up to 2^-11 = 4.9e-4 relative
    (the norm adds ~1e-7), and below fp16's normal range up to half its 2^-24 spacing."""
    grads = _fp16_grads()
    exact = torch.linalg.vector_norm(torch.cat([x.double().flatten() for x in grads]))
    assert float(max(torch.linalg.vector_norm(x.double()) for x in grads)) > 65504
    norm, params = _fp16_clip_step(backend)
    assert norm.dtype == torch.float32
    assert_close(norm.double(), exact, rtol=1e-5, atol=0.0)
    coef = 1.0 / (exact + 1e-6)
    for p, x in zip(params, grads):
        assert_close(p.double(), -x.double() * coef, rtol=1e-3, atol=2.0 ** -25)


def test_fp16_norm_torch_and_triton_paths_agree():
    """The two paths' norms agree to fp32 summation order, their updates to one fp16 ulp (the
    torch path divides the fp16 grads by (norm + 1e-6) / max_norm, the kernel multiplies by
    max_norm / (norm + 1e-6): the fp32 results can round to neighbouring fp16 values)."""
    norm_t, params_t = _fp16_clip_step("torch")
    norm_k, params_k = _fp16_clip_step("triton")
    assert_close(norm_k, norm_t, rtol=1e-6, atol=0.0)
    for a, b in zip(params_k, params_t):
        assert_close(a, b, torch.float32, rtol=2.0 ** -10, atol=2.0 ** -24)


def test_clip_grad_norm_overflows_on_those_grads():
    """What fusedopt deliberately does not copy: torch's clip_grad_norm_ takes each fp16 tensor's
    norm in fp16, gets inf, and zeroes every gradient. If torch changes this, fusedopt's docstring
    in fusedopt/clip.py and the README should say the two now agree."""
    grads = _fp16_grads()
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    assert math.isinf(float(total))
    assert all(not p.grad.any() for p in params)
