"""fusedopt.Muon against torch.optim.Muon + clip_grad_value_ / clip_grad_norm_ on CPU.

Three copies of the same matrices step in each parity run: torch.optim.Muon in the test dtype
(the oracle), fusedopt.Muon in that dtype, and torch.optim.Muon in float64 with its
Newton-Schulz run in float64 (the exact math). torch's Newton-Schulz runs in bf16: its output is
1.1-1.9% off the float64 one in Frobenius norm, 3e-3 to 2.1e-2 in the largest element (measured
on the shapes of test_newtonschulz_within_torch_bf16_error), so parameters are held to the
flash-attn bound: off the float64 run by at most twice what torch is, plus half an ulp. The
momentum buffers never see Newton-Schulz: in fp32 they match torch's to fp32 rounding.

The oracle's Newton-Schulz takes a copy of its input: torch 2.13 normalises the momentum
buffer itself in place when the params are bf16 and nesterov=False
(test_torch_bf16_without_nesterov_normalises_its_buffer); elsewhere the copy changes nothing.
"""
import contextlib
import json
import math
from unittest import mock

import pytest
import torch
import torch.optim._muon as torch_muon
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from conftest import DEVICE, assert_close, low_precision_bound, run_bench
from fusedopt.optim.muon import Muon, zeropower_via_newtonschulz
from recipe import clone_params, make_params, ref_step, torch_groups
from test_capture import steps_read_nothing

T = torch.tensor
COEFS = (3.4445, -4.775, 2.0315)
STEPS = 7
# same-shape pairs, tall/wide pairs that share one wide batch, and different shapes; split in
# two param groups at the middle
SHAPES = [(13, 7), (7, 13), (13, 7), (16, 16), (33, 65), (65, 33), (16, 16), (5, 40)]
NEVER_GRAD = 7                # the last param never has a grad
NO_GRAD_ON = {2: 2, 4: 0}     # step -> a param without a grad on that step
GROUP1 = dict(lr=0.01, momentum=0.8, weight_decay=0.0)

CONFIGS = {
    "default": {},
    "lr-wd": dict(lr=0.02, weight_decay=0.05),
    "no-nesterov": dict(lr=0.02, nesterov=False, weight_decay=0.05),
    "original": dict(lr=0.02, adjust_lr_fn="original"),
    "match-rms-adamw": dict(lr=0.02, adjust_lr_fn="match_rms_adamw", weight_decay=0.01),
    "ns-steps-3": dict(lr=0.02, ns_steps=3),
    "ns-coefficients": dict(lr=0.02, ns_coefficients=(1.875, -1.25, 0.375)),  # the quintic
    "momentum-0.5": dict(lr=0.02, momentum=0.5, nesterov=False),
    "no-momentum": dict(lr=0.02, momentum=0.0),
    "tensor-lr": dict(lr=T(0.02), weight_decay=0.05),
}
# grads ~N(0, 1) over ~6K elements: total L2 norm ~75, inf norm ~4
CLIPS = {
    "noclip": {},
    "l2-active": dict(max_grad_norm=0.5),
    "l2-inactive": dict(max_grad_norm=1e4),
    "value+inf": dict(max_grad_value=0.5, max_grad_norm=0.3, norm_type=math.inf),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread. With a neighbour keeping the 2 CPUs busy (load 9), every op's
    OpenMP region waited for a core: one parity run took 0.5-6 s instead of 20 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ns64(grad, ns_coefficients, ns_steps, eps):
    """torch's _zeropower_via_newtonschulz in float64: the exact math for the reference run."""
    a, b, c = ns_coefficients
    X = grad.double()
    tall = grad.size(0) > grad.size(1)
    X = X.T if tall else X
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = X @ X.T
        X = a * X + (b * gram + c * gram @ gram) @ X
    return X.T if tall else X


_TORCH_NS = torch_muon._zeropower_via_newtonschulz


def torch_ns_on_a_copy(grad, *args):
    return _TORCH_NS(grad.clone(), *args)


def float_options(options):
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def copy_options(options):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def groups(params, kwargs):
    half = len(params) // 2
    return [dict(params=params[:half], **copy_options(kwargs)),
            dict(params=params[half:], **copy_options({**kwargs, **GROUP1}))]


class Exact:
    """torch.optim.Muon on float64 copies of the params, Newton-Schulz in float64: the exact math
    the others are measured against."""

    def __init__(self, params, make_groups=lambda ps: ps, **kwargs):
        self.params = [torch.nn.Parameter(p.detach().double()) for p in params]
        self.opt = torch.optim.Muon(make_groups(self.params), **float_options(kwargs))

    def step(self, grads, **clip):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.double()
        with mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", ns64):
            ref_step(self.opt, self.params, **clip)


def torch_recipe_step(opt, params, **clip):
    """clip_grad_value_ + clip_grad_norm_ + torch.optim.Muon.step, its Newton-Schulz on a copy
    of its input (module docstring); returns the norm."""
    with mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", torch_ns_on_a_copy):
        return ref_step(opt, params, **clip)


class Trio:
    """torch.optim.Muon (dtype), fusedopt.Muon (dtype) and the exact run on the same matrices, fed
    the same gradients."""

    def __init__(self, dtype, kwargs, clip, shapes=SHAPES):
        self.clip = clip
        self.ref_p = make_params(shapes, dtype)
        self.our_p = clone_params(self.ref_p)
        self.ref = torch.optim.Muon(groups(self.ref_p, kwargs))
        self.ours = Muon(groups(self.our_p, kwargs), **clip)
        self.exact = Exact(self.ref_p, lambda ps: groups(ps, float_options(kwargs)))

    def set_grads(self, step):
        g = torch.Generator().manual_seed(1000 + step)
        grads = []
        for i, (r, o) in enumerate(zip(self.ref_p, self.our_p)):
            grad = torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype)
            missing = i == NEVER_GRAD or NO_GRAD_ON.get(step) == i
            r.grad, o.grad = (None, None) if missing else (grad.clone(), grad.clone())
            grads.append(None if missing else grad)
        self.grads = grads

    def step(self):
        ref_norm = torch_recipe_step(self.ref, self.ref_p, **self.clip)
        self.exact.step(self.grads, **self.clip)
        self.ours.step()
        return ref_norm


def max_err(actual, exact) -> float:
    return float((actual.detach().double() - exact.detach()).abs().max())


def assert_within_torch_error(ours, theirs, exact, dtype, what):
    """flash-attn's bound: off the float64 run by at most twice what torch is, + half an ulp."""
    bound = low_precision_bound(max_err(theirs, exact), exact, dtype)
    assert max_err(ours, exact) <= bound, (what, max_err(ours, exact), max_err(theirs, exact))


def buffers(opt, params):
    return [opt.state[p].get("momentum_buffer") for p in params]


def assert_matches(ours, our_p, ref, ref_p, exact):
    """fp32: buffers as torch's to fp32 rounding, params within torch's bf16 Newton-Schulz error
    of the exact run."""
    for r, o in zip(buffers(ref, ref_p), buffers(ours, our_p)):
        if r is None:  # none yet, or (after a skipped first step) the zeros torch makes next
            assert o is None or not o.any()
        else:
            assert_close(o, r)
    for i, (r, o, e) in enumerate(zip(ref_p, our_p, exact.params)):
        assert_within_torch_error(o, r, e, torch.float32, f"param {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torch_recipe(config, clip, dtype):
    trio = Trio(dtype, CONFIGS[config], CLIPS[clip])
    for step in range(STEPS):
        trio.set_grads(step)
        ref_norm = trio.step()
        if ref_norm is None:
            assert trio.ours.grad_norm is None
        elif dtype == torch.float32:
            assert_close(trio.ours.grad_norm, ref_norm)
        else:  # torch rounds the bf16 norm to bf16; fusedopt keeps it in fp32 (fusedopt/clip.py)
            assert_close(trio.ours.grad_norm, ref_norm.float(), rtol=2 ** -8, atol=0)
        for r, o in zip(trio.ref_p, trio.our_p):
            if r.grad is None:
                continue
            if dtype == torch.float32:  # the torch path leaves the clipped grad, as the recipe
                assert_close(o.grad, r.grad)
            else:  # the clip divides by an fp32 scale where torch multiplies by a bf16 coefficient
                torch.testing.assert_close(o.grad, r.grad, rtol=2 ** -6, atol=1e-6)  # 2 ulps
    ref_state, our_state = trio.ref.state_dict()["state"], trio.ours.state_dict()["state"]
    assert ref_state.keys() == our_state.keys() and NEVER_GRAD not in our_state
    for i, r in ref_state.items():
        assert our_state[i].keys() == r.keys() == {"momentum_buffer"}
        o = our_state[i]["momentum_buffer"]
        assert (o.shape, o.dtype, o.stride()) == (r["momentum_buffer"].shape, dtype,
                                                   r["momentum_buffer"].stride())
    for i, (r, o, e) in enumerate(zip(buffers(trio.ref, trio.ref_p), buffers(trio.ours, trio.our_p),
                                      buffers(trio.exact.opt, trio.exact.params))):
        if r is None:
            continue
        if dtype == torch.float32:  # no Newton-Schulz on the way: fp32 rounding only
            assert_close(o, r)
        else:
            assert_within_torch_error(o, r, e, dtype, f"buffer {i}")
    for i, (r, o, e) in enumerate(zip(trio.ref_p, trio.our_p, trio.exact.params)):
        assert_within_torch_error(o, r, e, dtype, f"param {i}")


@pytest.mark.parametrize("shape", [(13, 7), (7, 13), (64, 64), (33, 65), (256, 768)])
def test_newtonschulz_within_torch_bf16_error(shape):
    """The batched Newton-Schulz against torch's, matrix by matrix, on three matrices of one shape
    and a zero one (eps keeps it finite: a zero update): the gap to torch is at most torch's own
    distance to float64 Newton-Schulz (measured: 3e-3 to 2.1e-2 in the largest element; on
    torch 2.13's CPU the gap was 0, bit for bit)."""
    g = torch.Generator().manual_seed(sum(shape))
    grads = [torch.randn(shape, generator=g) for _ in range(3)] + [torch.zeros(shape)]
    tall = shape[0] > shape[1]
    X = torch.stack([G.T if tall else G for G in grads]).bfloat16()
    out = zeropower_via_newtonschulz(X, COEFS, 5, 1e-7)
    for G, O in zip(grads, out):
        theirs = _TORCH_NS(G, COEFS, 5, 1e-7)
        ours = O.T if tall else O
        own = max_err(theirs, ns64(G, COEFS, 5, 1e-7))
        assert own < 0.05
        assert max_err(ours, theirs.double()) <= own
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops a step dispatches, views left out (they launch nothing)."""

    VIEWS = {"select", "transpose", "permute", "t", "view", "_record_function_enter_new",
             "_record_function_exit", "promote_types"}

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def ops_of_second_step(opt, params):
    counter = OpCounter()
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        with counter if step else contextlib.nullcontext():
            ref_step(opt, params, max_grad_norm=1.0) if not isinstance(opt, Muon) else opt.step()
    return counter.counts


def test_ops_per_step_do_not_grow_with_the_matrices():
    """One group of 4 wide shapes ((13, 7) and (7, 13) are one), 1x and 3x the matrices: fusedopt
    dispatches the same ops (foreach ops over all, 3 x ns_steps batched GEMMs per shape); torch's
    recipe dispatches 3 x ns_steps GEMMs, and its other ops, per matrix."""
    ours, theirs = [], []
    for k in (1, 3):
        params = make_params(SHAPES * k, torch.float32)
        ours.append(ops_of_second_step(Muon(params, lr=0.02, max_grad_norm=1.0), params))
        params = make_params(SHAPES * k, torch.float32)
        theirs.append(ops_of_second_step(torch.optim.Muon(params, lr=0.02), params))
    assert ours[0] == ours[1], ours
    assert ours[0]["bmm"] + ours[0]["baddbmm"] == 3 * 5 * 4 and "mm" not in ours[0]
    assert theirs[1]["mm"] + theirs[1]["addmm"] == 3 * (theirs[0]["mm"] + theirs[0]["addmm"]) \
        == 3 * 3 * 5 * len(SHAPES)
    assert sum(ours[0].values()) < sum(theirs[0].values()), (ours[0], theirs[0])


def test_torch_bf16_without_nesterov_normalises_its_buffer():
    """torch 2.13: grad.bfloat16() is the buffer itself for bf16 params, and Newton-Schulz divides
    it by its norm in place (pytorch/pytorch PR 194664 fixes it). fusedopt keeps the momentum."""
    g = torch.Generator().manual_seed(0)
    grad = (10 * torch.randn(8, 4, generator=g)).bfloat16()
    expected = torch.zeros_like(grad).lerp_(grad, 1 - 0.95)
    results = {}
    for name, cls in (("torch", torch.optim.Muon), ("fusedopt", Muon)):
        p = torch.nn.Parameter(torch.randn(8, 4, generator=g).bfloat16())
        opt = cls([p], lr=0.1, nesterov=False)
        p.grad = grad.clone()
        opt.step()
        results[name] = opt.state[p]["momentum_buffer"]
    assert torch.equal(results["fusedopt"], expected)
    assert float(results["torch"].float().norm()) == pytest.approx(1.0, rel=1e-2)


# -- errors ----------------------------------------------------------------------------------------

def _p(*shape):
    return torch.nn.Parameter(torch.randn(shape))


BAD = {
    "negative-lr": ([_p(3, 4)], dict(lr=-1.0)),
    "tensor-lr-2-elements": ([_p(3, 4)], dict(lr=T([0.1, 0.2]))),
    "negative-momentum": ([_p(3, 4)], dict(momentum=-0.5)),
    "negative-wd": ([_p(3, 4)], dict(weight_decay=-0.1)),
    "adjust-lr-fn": ([_p(3, 4)], dict(adjust_lr_fn="sqrt")),
    "1-d": ([_p(3, 4), _p(4)], {}),
    "3-d": ([_p(2, 3, 4)], {}),
    "empty": ([], {}),
    "set-in-a-group": ([dict(params={_p(3, 4)})], {}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_constructor_errors_equal_torchs(case):
    params, kwargs = BAD[case]
    with pytest.raises(Exception) as theirs:
        torch.optim.Muon(params, **kwargs)
    with pytest.raises(Exception) as ours:
        Muon(params, **kwargs)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


@pytest.mark.parametrize("kwargs", [dict(ns_steps=100), dict(ns_coefficients=(1.0, 2.0))],
                         ids=["ns-steps", "ns-coefficients"])
def test_step_errors_equal_torchs_and_write_nothing(kwargs):
    """torch accepts these at construction and raises in the step (after writing the buffers of
    the params before); fusedopt raises the same error before writing anything."""
    errors = []
    for cls in (torch.optim.Muon, Muon):
        params = [_p(3, 4), _p(5, 2)]
        before = [p.detach().clone() for p in params]
        opt = cls(params, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError) as err:
            opt.step()
        errors.append(str(err.value))
        if cls is Muon:
            assert not opt.state and all(torch.equal(p, b) for p, b in zip(params, before))
    assert errors[0] == errors[1]


def test_add_param_group_checks_2d():
    """torch checks 2-D only in its constructor (a 1-D group added later fails in the step);
    fusedopt checks every group, with torch's error."""
    opt = Muon([_p(3, 4)])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group(dict(params=[_p(4)]))
    assert len(opt.param_groups) == 1


def test_backend_triton_is_refused_with_the_reason():
    params = [torch.nn.Parameter(torch.randn(3, 4, device=DEVICE))]
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: Muon's step is "
                                           "Newton-Schulz matmuls"):
        Muon(params, backend="triton")
    Muon(params, backend="torch")


# -- skipped steps, Tensor lr, state_dict, host reads ------------------------------------------

SCALERS = {"torch": torch.amp.GradScaler, "fusedopt": fusedopt.GradScaler}
BAD_STEPS = {0: math.inf, 3: math.nan}  # step -> one gradient element; step 0 is a first step


def coefficients(params, step):
    g = torch.Generator().manual_seed(2000 + step)
    coefs = [torch.randn(p.shape, generator=g) for p in params]
    if step in BAD_STEPS:
        coefs[4].view(-1)[17] = BAD_STEPS[step]
    return coefs


def loss_of(params, coefs):
    return sum((p * c).sum() for p, c in zip(params, coefs))


def snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        i: opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)
        if "momentum_buffer" in opt.state[p]}


def assert_skipped(opt, params, before, step):
    """A skipped step changed no parameter and no buffer; a skipped first step made zero buffers
    (those torch makes at its next step)."""
    old_params, old_bufs = before
    new_params, new_bufs = snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(new_params, old_params))
    if step == 0:
        assert not old_bufs and all(not b.any() for b in new_bufs.values())
    else:
        assert new_bufs.keys() == old_bufs.keys()
        assert all(torch.equal(new_bufs[i], old_bufs[i]) for i in old_bufs)


@pytest.mark.parametrize("scaler", list(SCALERS))
def test_grad_scaler_matches_unscale_clip_step(scaler):
    """The torch recipe (scale, backward, unscale_, clip_grad_norm_, step, update) against
    fusedopt.Muon(max_grad_norm) under either scaler; the inf and NaN steps are skipped on the
    device and change nothing."""
    ref_p = make_params(SHAPES, torch.float32)
    our_p = clone_params(ref_p)
    ref = torch.optim.Muon(ref_p, lr=0.02)
    ours = Muon(our_p, lr=0.02, max_grad_norm=1.0)
    exact = Exact(ref_p, lr=0.02)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    our_scaler = SCALERS[scaler]("cpu", init_scale=2.0 ** 12, growth_interval=2)
    for step in range(6):
        coefs = coefficients(ref_p, step)
        ref.zero_grad()
        ref_scaler.scale(loss_of(ref_p, coefs)).backward()
        ref_scaler.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(ref_p, 1.0)
        with mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", torch_ns_on_a_copy):
            ref_scaler.step(ref)
        ref_scaler.update()
        if step not in BAD_STEPS:
            exact.step(coefs, max_grad_norm=1.0)

        ours.zero_grad()
        our_scaler.scale(loss_of(our_p, coefs)).backward()
        before = snapshot(ours, our_p)
        our_scaler.step(ours)
        our_scaler.update()
        assert our_scaler.get_scale() == ref_scaler.get_scale()
        assert float(ours.step_skipped) == float(step in BAD_STEPS)
        if step in BAD_STEPS:
            assert_skipped(ours, our_p, before, step)
        assert_matches(ours, our_p, ref, ref_p, exact)


def test_nonfinite_skip():
    """nonfinite='skip': the inf and NaN steps change nothing (step_skipped 1.0); the others
    equal torch's recipe stepping on those steps only."""
    ref_p = make_params(SHAPES, torch.float32)
    our_p = clone_params(ref_p)
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.05)
    ours = Muon(our_p, lr=0.02, weight_decay=0.05, max_grad_norm=1.0, nonfinite="skip")
    exact = Exact(ref_p, lr=0.02, weight_decay=0.05)
    for step in range(6):
        coefs = coefficients(ref_p, step)
        for p, q, c in zip(ref_p, our_p, coefs):
            p.grad, q.grad = c.clone(), c.clone()
        before = snapshot(ours, our_p)
        ours.step()
        assert float(ours.step_skipped) == float(step in BAD_STEPS)
        if step in BAD_STEPS:
            assert_skipped(ours, our_p, before, step)
        else:
            torch_recipe_step(ref, ref_p, max_grad_norm=1.0)
            exact.step(coefs, max_grad_norm=1.0)
        assert_matches(ours, our_p, ref, ref_p, exact)


def test_tensor_lr_with_a_scheduler():
    """A Tensor lr moved by a scheduler every step, as torch.optim.Muon with the same scheduler."""
    ref_p = make_params(SHAPES, torch.float32)
    our_p = clone_params(ref_p)
    exact = Exact(ref_p, lr=0.05, weight_decay=0.1)
    opts = [torch.optim.Muon(ref_p, lr=T(0.05), weight_decay=0.1),
            Muon(our_p, lr=T(0.05), weight_decay=0.1, max_grad_norm=1.0), exact.opt]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in opts]
    for step in range(5):
        coefs = coefficients(ref_p, step + 10)
        for p, q, c in zip(ref_p, our_p, coefs):
            p.grad, q.grad = c.clone(), c.clone()
        torch_recipe_step(opts[0], ref_p, max_grad_norm=1.0)
        opts[1].step()
        exact.step(coefs, max_grad_norm=1.0)
        for s in scheds:
            s.step()
        assert_matches(opts[1], our_p, opts[0], ref_p, exact)
    assert isinstance(opts[1].param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("direction", ["torch-to-fusedopt", "fusedopt-to-torch"])
def test_state_dict_cross_loads(direction):
    """3 steps on one side, its state_dict loaded into the other (same keys, shapes, dtypes),
    3 more steps there: the same as the first side going on."""
    kwargs = dict(lr=0.02, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    clip = dict(max_grad_norm=1.0)
    first, second = ((torch.optim.Muon, Muon) if direction == "torch-to-fusedopt"
                     else (Muon, torch.optim.Muon))

    def make(cls, params):
        return cls(groups(params, kwargs), **(clip if cls is Muon else {}))

    def step(opt, params, i):
        coefs = coefficients(params, 20 + i)
        for p, c in zip(params, coefs):
            p.grad = c.clone()
        opt.step() if isinstance(opt, Muon) else torch_recipe_step(opt, params, **clip)
        return coefs

    a_p = make_params(SHAPES, torch.float32)
    a = make(first, a_p)
    for i in range(3):
        step(a, a_p, i)
    b_p = clone_params(a_p)
    b = make(second, b_p)
    sd = a.state_dict()
    b.load_state_dict(sd)
    exact = Exact(a_p, lambda ps: groups(ps, kwargs))
    exact.opt.load_state_dict(sd)  # buffers cast to float64, as torch loads into any dtype
    sd_b = b.state_dict()
    # fusedopt's groups add the clip setting (its own constructor's, from a torch.optim one)
    assert [sorted(g) for g in torch_groups(sd_b["param_groups"], **clip)] == \
        [sorted(g) for g in torch_groups(sd["param_groups"], **(clip if first is Muon else {}))]
    for i, st in sd["state"].items():
        assert sd_b["state"][i].keys() == st.keys() == {"momentum_buffer"}
        assert sd_b["state"][i]["momentum_buffer"].dtype == st["momentum_buffer"].dtype
    for i in range(3, 6):
        exact.step(step(a, a_p, i), **clip)
        step(b, b_p, i)
    ours, theirs = (b, a) if second is Muon else (a, b)
    our_p, their_p = (b_p, a_p) if second is Muon else (a_p, b_p)
    assert_matches(ours, our_p, theirs, their_p, exact)


CAPTURE_CASES = {
    "tensor-lr-clip-value": (dict(lr=T(0.02), max_grad_norm=1.0, max_grad_value=0.5), None),
    "inf-norm-skip": (dict(lr=0.02, max_grad_norm=0.5, norm_type=math.inf, nonfinite="skip"),
                      None),
    "torch-scaler": (dict(lr=T(0.02), max_grad_norm=1.0), torch.amp.GradScaler),
    "fusedopt-scaler": (dict(lr=0.02, max_grad_norm=1.0, nesterov=False), fusedopt.GradScaler),
}


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_step_reads_nothing_on_the_host(case):
    """After a first step, steps with a scheduler on the lr, an inf gradient that 'skip' or a
    GradScaler skips, and fresh grads read no tensor value on the host
    (test_capture.NoHostReads)."""
    kwargs, scaler_cls = CAPTURE_CASES[case]
    params = make_params(SHAPES, torch.float32)
    opt = Muon(params, **copy_options(kwargs))
    scaler = scaler_cls("cpu", init_scale=1024.0) if scaler_cls else None
    steps_read_nothing(opt, params, lambda step: coefficients(params, step + 30), scaler,
                       inf_at=(1, (0, 0)))


def test_bench_script_runs(tmp_path):
    """bench/muon.py end to end on the smoke set (timings are not looked at)."""
    out = run_bench("muon.py", "--quick", out_dir=tmp_path)
    assert "fusedopt against the torch recipe" in out
    (md,) = tmp_path.glob("muon-*-quick.md")
    rows = json.loads(md.with_suffix(".json").read_text())["results"]
    assert [r["impl"] for r in rows] == ["torch.optim.Muon + clip_grad_norm_",
                                         "fusedopt.Muon(max_grad_norm=1.0)"]
    assert rows[1]["first_step_max_param_gap"] < 1e-3
