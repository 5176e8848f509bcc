"""fusedopt's Adafactor against torch.optim.Adafactor (for-loop) + clip_grad_value_ +
clip_grad_norm_: every option, every clip, params of 0 to 4 dims (torch factors over the last two),
two param groups, a param missing its grad on some steps and one never having one; fp32, fp64, and
bf16 bounded by torch's own bf16 error; the same constructor errors; GradScaler and nonfinite skips
that leave everything as it was; Tensor lr; state_dict both ways; no Triton backend; no host read
during a step. Adafactor has no kernel: every step here is the torch path.
"""
import io
import math
import subprocess
import sys

import pytest
import torch

import fusedopt
from conftest import assert_close, low_precision_bound
from fusedopt.optim import adafactor
from fusedopt.optim.adafactor import Adafactor
from recipe import CLIPS, STEPS, clone_params, copy_options, make_grads, make_params, ref_step, \
    split_groups, tensors_of_state
from test_capture import steps_read_nothing

T = torch.tensor
# Two (13, 7) make a stack of two; (2, 3, 4, 5) is factored over (4, 5) with (2, 3) as batch;
# the last never has a grad.
SHAPES = [(), (1,), (127,), (13, 7), (13, 7), (3, 5, 2), (2, 3, 4, 5), (7, 13), (4,)]

# Clipped grads (norm 0.5 over ~550 elements) are ~0.02 per element, so R, C ~ 5e-4. eps1 = 2e-3
# binds the mean(R) clamp (the estimate R C / 2e-3 ~ 1e-4 stays mostly above eps1^2 = 4e-6); d =
# 100 keeps the update from being rescaled, which would undo a uniform change of the estimate.
# eps1 = 0.05 binds the estimate's clamp everywhere (eps1^2 = 2.5e-3). eps2 = 2 exceeds RMS(param)
# ~ 1. RMS(U) ~ 1, so the default d = 1 rescales the update of some tensors, d = 100 of none.
CONFIGS = {
    "default": {},
    "lr": dict(lr=0.05),
    "beta2_decay": dict(beta2_decay=-0.5),
    "eps1-mean": dict(eps=(2e-3, 1e-3), d=100.0),
    "eps1-estimate": dict(eps=(0.05, 1e-3)),
    "eps2": dict(eps=(None, 2.0)),
    "d": dict(d=100.0),
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(maximize=True),
    "tensor-lr": dict(lr=T(0.02), weight_decay=0.1),
    "all": dict(lr=0.03, beta2_decay=-0.6, eps=(1e-4, 1e-2), d=1.2, weight_decay=0.05,
                maximize=True),
}
# group 1 sets every option a group may set, each different from group 0's
GROUP1 = dict(lr=0.04, beta2_decay=-0.7, eps=(1e-20, 0.5), d=2.0, weight_decay=0.02)
PARITY_CLIPS = {"default": list(CLIPS), "all": list(CLIPS), "tensor-lr": list(CLIPS)}


def config(key, dtype):
    """(kwargs of group 0, group 1's); Tensor lr in ``dtype``: torch's for-loop forms the
    lr-dependent scalars in the Tensor's dtype, so an fp32 one would make fp64 fp32-accurate."""
    kwargs, group1 = dict(CONFIGS[key]), dict(GROUP1)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs["lr"] = kwargs["lr"].to(dtype)
        group1["lr"] = T(group1["lr"], dtype=dtype)
    return kwargs, group1


def build(params, kwargs, group1, ours, **extra):
    groups = params if group1 is None else split_groups(params, {}, copy_options(group1))
    return (Adafactor if ours else torch.optim.Adafactor)(groups, **copy_options(kwargs), **extra)


def set_grads(param_lists, step, skip=(), scale=1.0):
    """The same grads for every list (made in the first list's dtypes, each param its own copy in
    its dtype); None for the params in ``skip``."""
    grads = make_grads(param_lists[0], step)
    for params in param_lists:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i in skip else (g * scale).to(p.dtype)


def missing(step, n):
    """Param 2 has no grad on steps 2 and 4, the last param never has one."""
    return {n - 1} | ({2} if step in (2, 4) else set())


def check_state(ours, ref):
    """Every state tensor: torch's keys, shapes, dtypes and devices, and its values."""
    ref_state, our_state = tensors_of_state(ref), tensors_of_state(ours)
    assert our_state.keys() == ref_state.keys()
    for k, r in ref_state.items():
        o = our_state[k]
        assert (o.shape, o.dtype, o.device) == (r.shape, r.dtype, r.device), k
        assert_close(o, r)


def clip_(params, max_grad_norm=None, norm_type=2.0, max_grad_value=None):
    """The recipe's clip utilities, without its step (recipe.ref_step steps too)."""
    with_grad = [p for p in params if p.grad is not None]
    if max_grad_value is not None:
        torch.nn.utils.clip_grad_value_(with_grad, max_grad_value)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm, norm_type)


def bits(t):
    """A tensor's bits, so that -0.0 differs from 0.0 and NaN equals itself."""
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(params, opt):
    return [bits(p).clone() for p in params], {
        k: bits(v).clone() for k, v in tensors_of_state(opt).items()}


def assert_unchanged(params, opt, before):
    """Params and state (step counters included) bit for bit as ``snapshot`` saw them."""
    old_params, old_state = before
    for p, b in zip(params, old_params):
        assert torch.equal(bits(p), b)
    state = tensors_of_state(opt)
    assert state.keys() == old_state.keys()
    for k, v in old_state.items():
        assert torch.equal(bits(state[k]), v), k


# -- 1. parity with torch.optim.Adafactor + the clip utilities -------------------------------------

PARITY = [(key, clip) for key in CONFIGS for clip in PARITY_CLIPS.get(key, ["noclip", "l2-active"])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("key,clip", PARITY, ids=[f"{k}-{c}" for k, c in PARITY])
def test_matches_torch_recipe(key, clip, dtype):
    """Every step: params, the clipped grads left in .grad, grad_norm; at the end, the state."""
    kwargs, group1 = config(key, dtype)
    ref_p = make_params(SHAPES, dtype)
    our_p = clone_params(ref_p)
    ref = build(ref_p, kwargs, group1, ours=False)
    ours = build(our_p, kwargs, group1, ours=True, backend="torch", **CLIPS[clip])
    for step in range(STEPS):
        set_grads([ref_p, our_p], step, missing(step, len(SHAPES)))
        norm = ref_step(ref, ref_p, **CLIPS[clip])
        ours.step()
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)
            if r.grad is not None:
                assert_close(o.grad, r.grad)
        if norm is not None:
            assert_close(ours.grad_norm, norm)
    check_state(ours, ref)
    assert ours.state[our_p[-1]] == {}  # never had a grad: no state, as torch


@pytest.mark.parametrize("chunk", [1, 2 * 91, 1 << 17], ids=["alone", "pairs", "default"])
def test_stacks_of_any_size_and_any_layout(monkeypatch, chunk):
    """Same-shape tensors stacked or not, grads laid out unlike their params, a non-contiguous
    param: the same steps as torch."""
    monkeypatch.setattr(adafactor, "_CHUNK", chunk)
    shapes = [(13, 7)] * 5 + [(6,)] * 3 + [(2, 3, 4)] * 2
    ref_p = make_params(shapes, torch.float32)
    ref_p[4] = torch.nn.Parameter(ref_p[4].detach().t().contiguous().t())  # column-major
    our_p = clone_params(ref_p)  # clone keeps the layout
    assert not our_p[4].is_contiguous()
    ref = torch.optim.Adafactor(ref_p, weight_decay=0.1)
    ours = Adafactor(our_p, weight_decay=0.1, max_grad_norm=1.0)
    for step in range(4):
        set_grads([ref_p, our_p], step)
        for params in (ref_p, our_p):
            for i in (0, 8):
                params[i].grad = params[i].grad.transpose(-1, -2).contiguous().transpose(-1, -2)
        ref_step(ref, ref_p, max_grad_norm=1.0)
        ours.step()
    for r, o in zip(ref_p, our_p):
        assert_close(o, r)
    check_state(ours, ref)


def test_eps1_none_takes_the_first_params_dtype_for_the_group_as_torch():
    """torch 2.13 sets epsilon1 from the first param with a grad and keeps it for the group: an
    fp64 param after an fp32 one gets fp32's epsilon (1.2e-7), which binds the mean(R) clamp for
    tiny grads."""
    shapes, dtypes = [(5, 3), (6, 4), (9,)], [torch.float32, torch.float64, torch.float64]
    ref_p = [torch.nn.Parameter(p.to(dt)) for p, dt in zip(make_params(shapes, torch.float64),
                                                           dtypes)]
    our_p, own_eps_p = clone_params(ref_p), clone_params(ref_p)
    ref, ours = torch.optim.Adafactor(ref_p), Adafactor(our_p)
    own_eps = Adafactor(own_eps_p, eps=(torch.finfo(torch.float64).eps, 1e-3))
    for step in range(3):
        set_grads([ref_p, our_p, own_eps_p], step, scale=1e-5)
        for opt in (ref, ours, own_eps):
            opt.step()
    for r, o in zip(ref_p, our_p):
        assert_close(o, r, torch.float32)
    assert not torch.allclose(own_eps_p[1], our_p[1], rtol=1e-3)  # the quirk shows here


def test_params_without_elements_step_where_torch_raises():
    """torch raises ZeroDivisionError (RMS of no elements); these get their state and a step
    count, and the rest steps as torch."""
    shapes = [(0,), (13, 7), (0, 5), (4,)]
    ref_p = make_params([shapes[1], shapes[3]], torch.float32)
    our_p = make_params(shapes, torch.float32)
    our_p[1].data.copy_(ref_p[0])
    our_p[3].data.copy_(ref_p[1])
    ref = torch.optim.Adafactor(ref_p)
    ours = Adafactor(our_p, max_grad_norm=1.0)
    for step in range(3):
        set_grads([our_p], step)
        for r, o in zip(ref_p, (our_p[1], our_p[3])):
            r.grad = o.grad.clone()
        ref_step(ref, ref_p, max_grad_norm=1.0)
        ours.step()
    assert_close(our_p[1], ref_p[0])
    assert_close(our_p[3], ref_p[1])
    assert ours.state[our_p[0]]["variance"].shape == (0,)
    assert ours.state[our_p[2]]["row_var"].shape == (0, 1)
    assert ours.state[our_p[2]]["col_var"].shape == (1, 5)
    assert float(ours.state[our_p[2]]["step"]) == 3.0


# -- 2. bf16: no further from fp64 than twice torch's own bf16 run ---------------------------------

def bf16_eps(kwargs):
    """``kwargs`` with what eps=(None, .) means for bf16 params spelled out, for the fp64 run."""
    eps1, eps2 = kwargs.get("eps", (None, 1e-3))
    return {**kwargs, "eps": (torch.finfo(torch.bfloat16).eps if eps1 is None else eps1, eps2)}


@pytest.mark.parametrize("clip", ["noclip", "l2-active"])
@pytest.mark.parametrize("key", ["default", "all"])
def test_bf16_within_twice_torch_bf16_error(key, clip):
    """From the same bf16 start, 7 steps: ours (fp32 math, bf16 storage) against torch's bf16
    for-loop, both measured against torch in fp64 on the same values; params and state, each
    tensor on its own (conftest.low_precision_bound)."""
    kwargs, group1 = config(key, torch.float64)
    exact_kwargs, exact_group1 = bf16_eps(kwargs), bf16_eps(group1)
    start = make_params(SHAPES, torch.bfloat16)
    sides = {"ours": clone_params(start), "torch": clone_params(start),
             "exact": [torch.nn.Parameter(p.detach().double()) for p in start]}
    opts = {"ours": build(sides["ours"], kwargs, group1, ours=True, **CLIPS[clip]),
            "torch": build(sides["torch"], kwargs, group1, ours=False),
            "exact": build(sides["exact"], exact_kwargs, exact_group1, ours=False)}
    for step in range(STEPS):
        set_grads([start, *sides.values()], step, missing(step, len(SHAPES)))
        opts["ours"].step()
        ref_step(opts["torch"], sides["torch"], **CLIPS[clip])
        ref_step(opts["exact"], sides["exact"], **CLIPS[clip])
        for o, r in zip(sides["ours"], sides["torch"]):  # the clipped grad, in bf16, left there
            if r.grad is not None:
                torch.testing.assert_close(o.grad, r.grad)
    states = {name: tensors_of_state(opt) for name, opt in opts.items()}
    assert {k: (v.shape, v.dtype) for k, v in states["ours"].items()} == {
        k: (v.shape, v.dtype) for k, v in states["torch"].items()}
    pairs = [(sides["ours"][i], sides["torch"][i], sides["exact"][i]) for i in range(len(SHAPES))]
    pairs += [(states["ours"][k], states["torch"][k], states["exact"][k])
              for k in states["torch"] if k[1] != "step"]
    for ours, theirs, exact in pairs:
        exact = exact.detach()
        err_torch, err_ours = (float((t.detach().double() - exact).abs().max())
                               if exact.numel() else 0.0 for t in (theirs, ours))
        assert err_ours <= low_precision_bound(err_torch, exact, torch.bfloat16), (
            tuple(exact.shape), err_ours, err_torch)


# -- 3. constructor errors and refusals ------------------------------------------------------------

BAD = {"lr": dict(lr=-1.0), "lr-tensor": dict(lr=T([0.1, 0.2])),
       "beta2_decay": dict(beta2_decay=0.5), "eps1": dict(eps=(-1.0, 1e-3)),
       "eps2": dict(eps=(None, -1.0)), "d": dict(d=0.5), "weight_decay": dict(weight_decay=-0.1)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_decay_is_torchs_factor(dtype):
    """A zero gradient leaves only the decay p * (1 - lr * wd): bit for bit torch's. torch 2.13's
    CPU _foreach_mul_(bf16 list, float) rounds the float to bf16 first (0.99 -> 0.98828125); a
    float decay through it moved 1823 of 4096 bf16 elements off torch's Adafactor."""
    p0 = make_params([(64, 64), (33,)], dtype)
    ours, theirs = clone_params(p0), clone_params(p0)
    opt = Adafactor(ours, lr=0.1, weight_decay=0.1)
    ref = torch.optim.Adafactor(theirs, lr=0.1, weight_decay=0.1)
    for a, b in zip(ours, theirs):
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    opt.step()
    ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key", list(BAD))
def test_constructor_errors_are_torchs(key):
    params = make_params([(3, 4)], torch.float32)
    with pytest.raises(Exception) as theirs:
        torch.optim.Adafactor(params, **BAD[key])
    with pytest.raises(theirs.type) as ours:
        Adafactor(params, **BAD[key])
    assert str(ours.value) == str(theirs.value)


def test_backend_triton_is_refused_with_the_reason(monkeypatch):
    """The interpreter makes CPU tensors fit for Triton: what refuses is the optimizer itself.
    backend=None takes the torch path on every device, CUDA included."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = make_params([(3, 4)], torch.float32)
    with pytest.raises(RuntimeError, match="Adafactor has no Triton kernel yet: its factored"):
        Adafactor(params, backend="triton")
    opt = Adafactor(params)
    assert opt._kernel_obstacle(params) == Adafactor._NO_KERNELS


DTENSOR_SCRIPT = """
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor
from fusedopt.optim.adafactor import Adafactor
p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), init_device_mesh("cpu", (2,)),
                                         [Replicate()]))
try:
    Adafactor([torch.nn.Parameter(torch.zeros(3)), p])
except NotImplementedError as e:
    print(e)
dist.destroy_process_group()
"""


def test_dtensor_params_are_refused():
    """Steps run on local shards, but the factors and RMS(p) need whole tensors (a fake process
    group of 2, in a subprocess: it leaves no process group behind)."""
    done = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parameter 1 of the new group (shape (4, 4)) is a DTensor" in done.stdout
    assert "use torch.optim.Adafactor" in done.stdout


# -- 4. skipped steps: GradScaler and nonfinite ----------------------------------------------------

SCALERS = {"torch": torch.amp.GradScaler, "fusedopt": fusedopt.GradScaler}
BAD_STEPS = {1: math.inf, 3: math.nan}  # step -> one element of the (3, 5, 2) grad


@pytest.mark.parametrize("clip", ["noclip", "l2-active"])
@pytest.mark.parametrize("scaler", list(SCALERS))
def test_grad_scaler_skips_and_matches_unscale_clip_step(scaler, clip):
    """The recipe: scale(loss).backward(), unscale_, the clip utilities, scaler.step(torch's).
    On the inf and NaN steps everything stays as it was, bit for bit, step counters included."""
    ref_p = make_params(SHAPES[:-1], torch.float32)
    our_p = clone_params(ref_p)
    ref = torch.optim.Adafactor(ref_p, weight_decay=0.1)
    ours = Adafactor(our_p, weight_decay=0.1, **CLIPS[clip])
    scalers = torch.amp.GradScaler("cpu", init_scale=1024.0), SCALERS[scaler]("cpu",
                                                                              init_scale=1024.0)
    for step in range(5):
        coefs = make_grads(ref_p, step)
        if step in BAD_STEPS:
            coefs[5].view(-1)[7] = BAD_STEPS[step]
        for params, opt, sc in zip((ref_p, our_p), (ref, ours), scalers):
            opt.zero_grad()
            sc.scale(sum((p * c).sum() for p, c in zip(params, coefs))).backward()
        before = snapshot(our_p, ours)
        scalers[0].unscale_(ref)
        clip_(ref_p, **CLIPS[clip])
        scalers[0].step(ref)
        scalers[1].step(ours)
        for sc in scalers:
            sc.update()
        if step in BAD_STEPS:
            assert_unchanged(our_p, ours, before)
            assert float(ours.step_skipped) == 1.0
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)
    check_state(ours, ref)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_step_changes_nothing(policy):
    """An inf grad under nonfinite='skip'/'raise': params, state and step counters unchanged, bit
    for bit ('raise' then raises); the next steps equal torch's, which never saw the bad one."""
    ref_p = make_params(SHAPES[:-1], torch.float32)
    our_p = clone_params(ref_p)
    ref = torch.optim.Adafactor(ref_p, lr=T(0.02), weight_decay=0.1, maximize=True)
    ours = Adafactor(our_p, lr=T(0.02), weight_decay=0.1, maximize=True, max_grad_norm=0.5,
                     norm_type=math.inf, nonfinite=policy)
    for step in range(5):
        set_grads([ref_p, our_p], step)
        if step == 2:
            our_p[6].grad.view(-1)[3] = math.inf
            before = snapshot(our_p, ours)
            if policy == "raise":
                with pytest.raises(FloatingPointError, match="inf in group 0, parameter 6"):
                    ours.step()
            else:
                ours.step()
            assert_unchanged(our_p, ours, before)
            assert float(ours.step_skipped) == 1.0
            continue
        ref_step(ref, ref_p, max_grad_norm=0.5, norm_type=math.inf)
        ours.step()
        assert float(ours.step_skipped) == 0.0
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)
    check_state(ours, ref)


def test_tensor_lr_moved_by_a_scheduler():
    """A Tensor lr that a scheduler writes into, as with torch's."""
    ref_p = make_params(SHAPES, torch.float32)
    our_p = clone_params(ref_p)
    ref = torch.optim.Adafactor(ref_p, lr=T(0.05), weight_decay=0.1)
    ours = Adafactor(our_p, lr=T(0.05), weight_decay=0.1, max_grad_norm=1.0)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (ref, ours)]
    for step in range(5):
        set_grads([ref_p, our_p], step, missing(step, len(SHAPES)))
        ref_step(ref, ref_p, max_grad_norm=1.0)
        ours.step()
        for s in scheds:
            s.step()
        assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)


# -- 5. state_dict both ways -----------------------------------------------------------------------

@pytest.mark.parametrize("first", ["torch", "fusedopt"])
def test_state_dict_cross_loads(first):
    """Three steps on one, its state_dict saved and loaded (weights_only) into the other, four
    more steps there: as if torch's optimizer had taken all seven."""
    kwargs, group1 = config("all", torch.float32)
    start = make_params(SHAPES, torch.float32)
    cont_p, ref_p = clone_params(start), clone_params(start)
    ref = build(ref_p, kwargs, group1, ours=False)  # all 7 steps on torch
    early = build(cont_p, kwargs, group1, ours=first == "fusedopt")
    for step in range(3):
        set_grads([ref_p, cont_p], step, missing(step, len(SHAPES)))
        ref.step()
        early.step()
    saved = io.BytesIO()
    torch.save(early.state_dict(), saved)
    saved.seek(0)
    late = build(cont_p, kwargs, group1, ours=first == "torch")
    late.load_state_dict(torch.load(saved, weights_only=True))
    for step in range(3, STEPS):
        set_grads([ref_p, cont_p], step, missing(step, len(SHAPES)))
        ref.step()
        late.step()
    for r, o in zip(ref_p, cont_p):
        assert_close(o, r)
    check_state(late, ref)


# -- 6. no host reads ------------------------------------------------------------------------------

HOST_CASES = {
    "tensor-lr-value-l2": (dict(lr=T(0.02), weight_decay=0.1, max_grad_norm=1.0,
                                max_grad_value=0.5), None),
    "inf-norm-skip-maximize": (dict(maximize=True, max_grad_norm=0.5, norm_type=math.inf,
                                    nonfinite="skip"), None),
    "torch-scaler": (dict(max_grad_norm=1.0, eps=(1e-3, 1e-3)), torch.amp.GradScaler),
    "fusedopt-scaler": (dict(weight_decay=0.1, d=2.0), fusedopt.GradScaler),
}


@pytest.mark.parametrize("case", list(HOST_CASES))
def test_step_reads_nothing_on_the_host(case):
    """After the first step (which makes the state), steps with a scheduler on a Tensor lr, an
    inf grad that a skip or a GradScaler drops, and fresh grads every step read no value on the
    host (torch's for-loop reads the step and two norms per tensor)."""
    kwargs, scaler_cls = HOST_CASES[case]
    params = make_params(SHAPES, torch.float32)
    opt = Adafactor(params, **copy_options(kwargs))
    scaler = scaler_cls("cpu", init_scale=1024.0) if scaler_cls else None
    can_skip = scaler is not None or "nonfinite" in kwargs
    steps_read_nothing(opt, params, lambda step: make_grads(params, step), scaler,
                       inf_at=(3, (0, 0)) if can_skip else None)
