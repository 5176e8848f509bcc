"""state_dict: same layout as torch.optim, and checkpoints move both ways mid-training: between
torch.optim and fusedopt, fusedopt's two backends, low-precision params, CPU and CUDA."""
import io

import pytest
import torch

from conftest import DEVICE, assert_close, low_precision_bound
from recipe import (SHAPES, OUR_CLASSES, TORCH_CLASSES, clone_params, make_grads, make_params,
                    ref_step, saved, tensors_of_state, torch_groups)

CONFIGS = {
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "SGD-nomomentum": dict(lr=0.1),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
}
CASES = list(CONFIGS)


def make(kind, ours, params):
    name = kind.split("-")[0]
    groups = [dict(params=params[:3]), dict(params=params[3:], lr=0.05)]
    cls = OUR_CLASSES[name] if ours else TORCH_CLASSES[name]
    return cls(groups, **CONFIGS[kind])


def train(opt, params, steps, seed=0):
    for s in range(seed, seed + steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("kind", CASES)
def test_layout_matches_torch(kind):
    ref_params, our_params = make_params(SHAPES, torch.float32), None
    our_params = clone_params(ref_params)
    ref, ours = make(kind, False, ref_params), make(kind, True, our_params)
    train(ref, ref_params, 3)
    train(ours, our_params, 3)
    r, o = ref.state_dict(), ours.state_dict()
    assert r["param_groups"] == o["param_groups"]
    assert r["state"].keys() == o["state"].keys()
    for i in r["state"]:
        assert r["state"][i].keys() == o["state"][i].keys()
        for k, rv in r["state"][i].items():
            ov = o["state"][i][k]
            assert (ov.shape, ov.dtype, ov.device) == (rv.shape, rv.dtype, rv.device), (i, k)
            assert_close(ov, rv)


@pytest.mark.parametrize("direction", ["torch->fusedopt", "fusedopt->torch"])
@pytest.mark.parametrize("kind", CASES)
def test_checkpoint_round_trip_continues_identically(kind, direction):
    """Train 3 steps on one side, load its state into the other, train 4 more on both."""
    first_ours = direction == "fusedopt->torch"
    params = make_params(SHAPES, torch.float32)
    first = make(kind, first_ours, params)
    train(first, params, 3)
    ckpt = saved(first)

    params_b = clone_params(params)
    second = make(kind, not first_ours, params_b)
    second.load_state_dict(ckpt)
    train(first, params, 4, seed=3)
    train(second, params_b, 4, seed=3)
    for a, b in zip(params, params_b):
        assert_close(b, a)
    for k, v in first.state_dict()["state"].items():
        for key, t in v.items():
            assert_close(second.state_dict()["state"][k][key], t)


@pytest.mark.parametrize("kind", CASES)
def test_fusedopt_checkpoint_loads_into_fusedopt(kind):
    params = make_params(SHAPES, torch.float64)
    a = make(kind, True, params)
    train(a, params, 2)
    params_b = clone_params(params)
    b = make(kind, True, params_b)
    b.load_state_dict(saved(a))
    train(a, params, 3, seed=2)
    train(b, params_b, 3, seed=2)
    for x, y in zip(params, params_b):
        assert_close(y, x)


# -- across backends, dtypes and devices, with clipping ------------------------------------------
# Each tensor fits one kernel block (cheap under Triton's interpreter).
SMALL = [(), (1,), (127,), (13, 7), (300,), (3, 5, 2)]
KINDS = ["SGD", "Adam", "AdamW"]  # momentum + nesterov, amsgrad, decoupled decay (CONFIGS)
MAX_NORM = 1.0  # grads ~N(0, 1) over 550 elements: norm ~24, clipped every step
LOW = [torch.bfloat16, torch.float16]


def build(kind, side, params, **options):
    """torch.optim (``side`` "torch.optim", clipped by train_clipped) or fusedopt on backend
    ``side`` ("torch", "triton", None for the device's default) with max_grad_norm."""
    name = kind.split("-")[0]
    groups = [dict(params=params[:3]), dict(params=params[3:], lr=0.05)]
    kwargs = dict(CONFIGS[kind], **options)
    if side == "torch.optim":
        return TORCH_CLASSES[name](groups, **kwargs)
    return OUR_CLASSES[name](groups, **kwargs, max_grad_norm=MAX_NORM, backend=side)


def on_side(side, params):
    """Copies of ``params`` where ``side`` runs: the Triton backend on conftest.DEVICE (CUDA when
    there is one, else the CPU through Triton's interpreter), the rest on the CPU."""
    device = DEVICE if side == "triton" else "cpu"
    return [torch.nn.Parameter(p.detach().clone().to(device)) for p in params]


def train_clipped(opt, params, steps, seed=0):
    """The same grads on any device and dtype; torch.optim clips them with clip_grad_norm_."""
    for s in range(seed, seed + steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = g.to(p.device)
        if isinstance(opt, tuple(OUR_CLASSES.values())):
            opt.step()
        else:
            ref_step(opt, params, max_grad_norm=MAX_NORM)


def checkpoint(opt) -> bytes:
    """A state_dict as torch.save writes it. Load it once per optimizer (``load``): torch's
    load_state_dict keeps the loaded tensors where no cast is needed, so two optimizers loading
    one state_dict object would share, and both step, its tensors."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def load(blob: bytes, map_location=None):
    return torch.load(io.BytesIO(blob), map_location=map_location)


def assert_state_layout(opt, params):
    """'step' a 0-dim fp32 tensor on the param's device; every other state tensor of the param's
    shape, dtype and device."""
    for i, p in enumerate(params):
        for key, t in opt.state[p].items():
            expected = ((), torch.float32) if key == "step" else (p.shape, p.dtype)
            assert (t.shape, t.dtype, t.device) == (*expected, p.device), (i, key, t)


def same_bits(a, b) -> bool:
    """Bit for bit (NaN included), same dtype."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and torch.equal(a.cpu().view(ints[a.element_size()]),
                                              b.cpu().view(ints[b.element_size()]))


def assert_state_is_checkpoint(opt, state_dict):
    """opt's state holds, bit for bit and in the same dtypes, the tensors of ``state_dict``."""
    want = {(i, k): v for i, st in state_dict["state"].items() for k, v in st.items()}
    got = tensors_of_state(opt)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert same_bits(got[k], v), k


def assert_same_state(actual, expected):
    """Same state keys, shapes and dtypes; values close (devices: assert_state_layout)."""
    got, want = tensors_of_state(actual), tensors_of_state(expected)
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert (got[k].shape, got[k].dtype) == (w.shape, w.dtype), k
        assert_close(got[k].cpu(), w.cpu(), torch.float32)


@pytest.mark.parametrize("first,second", [("torch", "triton"), ("triton", "torch"),
                                          ("torch.optim", "triton"), ("triton", "torch.optim")],
                         ids=lambda side: side)
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_across_backends_continues_identically(kind, first, second):
    """2 clipped steps on one side, its checkpoint loaded by the other, 3 more on both: the resumed
    run follows the uninterrupted one, in params and in every state tensor's values, dtype and
    device."""
    params = on_side(first, make_params(SMALL, torch.float32))
    a = build(kind, first, params)
    train_clipped(a, params, 2)
    params_b = on_side(second, params)
    b = build(kind, second, params_b)
    b.load_state_dict(load(checkpoint(a), map_location=params_b[0].device))
    assert_state_layout(b, params_b)
    train_clipped(a, params, 3, seed=2)
    train_clipped(b, params_b, 3, seed=2)
    for x, y in zip(params, params_b):
        assert_close(y.cpu(), x.cpu())
    assert_same_state(b, a)
    assert_state_layout(b, params_b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_checkpoint_keeps_fp32_step_and_continues_bit_for_bit(kind, dtype, backend):
    """bf16/fp16 params through torch.save / torch.load / load_state_dict: 'step' stays an fp32
    tensor on the param's device (never cast to the param dtype, which would miscount from step
    257 in bf16), the moments and momentum buffers keep the param dtype, every value is bit for
    bit what was saved, and the resumed run equals the uninterrupted one bit for bit."""
    params = on_side(backend, make_params(SMALL, dtype))
    a = build(kind, backend, params)
    train_clipped(a, params, 2)
    blob = checkpoint(a)
    params_b = clone_params(params)
    b = build(kind, backend, params_b)
    b.load_state_dict(load(blob))
    assert_state_layout(b, params_b)
    assert_state_is_checkpoint(b, load(blob))
    train_clipped(a, params, 2, seed=2)
    train_clipped(b, params_b, 2, seed=2)
    for x, y in zip(params, params_b):
        assert torch.equal(y, x)
    for k, v in tensors_of_state(a).items():
        assert torch.equal(tensors_of_state(b)[k], v), k
    assert_state_layout(b, params_b)


@pytest.mark.parametrize("writer", ["torch.optim", "fusedopt"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_checkpoint_between_torch_optim_and_fusedopt(kind, dtype, writer):
    """A bf16/fp16 checkpoint from either side (torch.optim's 'step' is an fp32 CPU tensor, ours
    the same on CPU) loads into fusedopt with an fp32 step and bit-identical state, and into
    torch.optim. One more step from it in ``dtype`` on both sides, and in fp32 by torch.optim
    (the reference): fusedopt stays within the house low-precision bound of torch.optim's own
    error (conftest.low_precision_bound), in the params and every state tensor.

    Adam's eps is 1e-4 in fp16: torch.optim's for-loop Adam adds eps in the param dtype, where
    1e-8 flushes to 0, and an exp_avg_sq that underflowed to 0 then divides by 0 (NaN state after
    3 steps here)."""
    options = dict(eps=1e-4) if kind != "SGD" and dtype == torch.float16 else {}
    params = make_params(SMALL, dtype)
    first = build(kind, "torch.optim" if writer == "torch.optim" else "torch", params, **options)
    train_clipped(first, params, 3)
    blob = checkpoint(first)
    if writer == "fusedopt":  # what torch.optim would have written: same layout
        twin_params = clone_params(make_params(SMALL, dtype))
        twin = build(kind, "torch.optim", twin_params, **options)
        train_clipped(twin, twin_params, 3)
        ours_sd, theirs_sd = load(blob), twin.state_dict()
        assert torch_groups(ours_sd["param_groups"], max_grad_norm=MAX_NORM) == \
            theirs_sd["param_groups"]
        assert {(i, k): (v.shape, v.dtype, v.device) for i, st in ours_sd["state"].items()
                for k, v in st.items()} == {(i, k): (v.shape, v.dtype, v.device)
                                            for i, st in theirs_sd["state"].items()
                                            for k, v in st.items()}
    runs = {}
    for side, dt in (("fusedopt", dtype), ("torch.optim", dtype), ("fp32", torch.float32)):
        ps = [torch.nn.Parameter(p.detach().clone().to(dt)) for p in params]
        opt = build(kind, "torch" if side == "fusedopt" else "torch.optim", ps, **options)
        opt.load_state_dict(load(blob))
        if side == "fusedopt":
            assert_state_layout(opt, ps)
            assert_state_is_checkpoint(opt, load(blob))
        train_clipped(opt, ps, 1, seed=3)
        runs[side] = (opt, ps)
    assert_state_layout(*runs["fusedopt"])
    (ours, ours_p), (theirs, theirs_p), (ref, ref_p) = runs.values()
    pairs = list(zip(ours_p, theirs_p, ref_p)) + [
        (ours.state[o][k], theirs.state[t][k], ref.state[r][k])
        for o, t, r in zip(ours_p, theirs_p, ref_p) for k in ref.state[r] if k != "step"]
    for o, t, r in pairs:
        r = r.detach()
        err_ours = float((o.detach().float() - r).abs().max()) if r.numel() else 0.0
        err_torch = float((t.detach().float() - r).abs().max()) if r.numel() else 0.0
        assert err_ours <= low_precision_bound(err_torch, r, dtype), (err_ours, err_torch)
    for o, r in zip(ours_p, ref_p):
        if "step" in ref.state[r]:
            assert torch.equal(ours.state[o]["step"], ref.state[r]["step"])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the checkpoint moves between CPU and CUDA params")
@pytest.mark.parametrize("map_location", ["target", None])
@pytest.mark.parametrize("src,dst", [("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_between_cpu_and_cuda(kind, src, dst, map_location):
    """Each device's default backend (torch on CPU, Triton on CUDA): 3 steps on ``src``, the
    checkpoint loaded onto ``dst`` params, with torch.load(map_location=dst) or as saved (then
    load_state_dict moves the moments and fusedopt's first step moves 'step'), 3 more on both:
    the resumed run follows the uninterrupted one, its state all on ``dst`` with an fp32 step."""
    base = make_params(SMALL, torch.float32)
    params = [torch.nn.Parameter(p.detach().to(src)) for p in base]
    a = build(kind, None, params)
    train_clipped(a, params, 3)
    params_b = [torch.nn.Parameter(p.detach().to(dst)) for p in params]
    b = build(kind, None, params_b)
    b.load_state_dict(load(checkpoint(a), dst if map_location == "target" else None))
    assert all(t.device.type == dst for (_, key), t in tensors_of_state(b).items() if key != "step")
    if map_location == "target":
        assert_state_layout(b, params_b)
    train_clipped(a, params, 3, seed=3)
    train_clipped(b, params_b, 3, seed=3)
    for x, y in zip(params, params_b):
        assert y.device.type == dst
        assert_close(y.cpu(), x.cpu())
    assert_state_layout(b, params_b)
    for (i, key), v in tensors_of_state(a).items():
        assert_close(tensors_of_state(b)[i, key].cpu(), v.cpu())
