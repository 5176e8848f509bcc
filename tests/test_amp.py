"""AMP and non-finite gradients, on both backends (Triton under the interpreter on CPU).

The oracle is the torch recipe: GradScaler.scale(loss).backward(), scaler.unscale_(opt),
clip_grad_value_ / clip_grad_norm_, scaler.step(torch.optim), scaler.update(); for the policies,
torch.optim stepping only on the steps fusedopt does not skip. Losses are sum(p * c): the
gradient is c times the scale, so an inf or NaN in one element of one coefficient puts exactly
that in one gradient.
"""
import math

import pytest
import torch

import fusedopt
from conftest import DEVICE, assert_close
from recipe import (OUR_CLASSES, SHAPES, TORCH_CLASSES, clone_params, make_grads, make_params,
                    on_device)

KWARGS = {"SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
          "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
          "AdamW": dict(lr=0.01, weight_decay=0.1)}
CLIPS = {"l2": dict(max_grad_norm=1.0), "inf+value": dict(max_grad_norm=0.3, norm_type=math.inf,
                                                          max_grad_value=0.2)}
SCALERS = {"torch": torch.amp.GradScaler, "fusedopt": fusedopt.GradScaler}
BAD_STEPS = {1: math.inf, 3: math.nan}  # step -> what one element of one gradient becomes


def coefficients(params, step):
    coefs = make_grads(params, step)
    if step in BAD_STEPS:
        coefs[4].view(-1)[17] = BAD_STEPS[step]  # one element of the (4097,) tensor
    return [c.to(DEVICE) for c in coefs]


def loss_of(params, coefs):
    return sum((p * c).sum() for p, c in zip(params, coefs))


def state_snapshot(opt):
    return {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}


def assert_unchanged(params, before_params, opt, before_state):
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    after = state_snapshot(opt)
    assert after.keys() == before_state.keys()
    for k, v in before_state.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("scaler", list(SCALERS))
@pytest.mark.parametrize("name", list(KWARGS))
def test_grad_scaler_matches_unscale_clip_step(name, scaler, clip, backend):
    """Both scalers, overflow (inf) and NaN steps included: same params, state and scale as the
    torch recipe, and a skipped step changes nothing, step counters included."""
    ref_p = on_device(make_params(SHAPES, torch.float32))
    our_p = clone_params(ref_p)
    ref = TORCH_CLASSES[name](ref_p, **KWARGS[name])
    ours = OUR_CLASSES[name](our_p, **KWARGS[name], **CLIPS[clip], backend=backend)
    ref_scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12, growth_interval=2)
    our_scaler = SCALERS[scaler](DEVICE, init_scale=2.0 ** 12, growth_interval=2)
    for step in range(6):
        coefs = coefficients(ref_p, step)
        ref.zero_grad()
        ref_scaler.scale(loss_of(ref_p, coefs)).backward()
        ref_scaler.unscale_(ref)
        if "max_grad_value" in CLIPS[clip]:
            torch.nn.utils.clip_grad_value_(ref_p, CLIPS[clip]["max_grad_value"])
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_p, CLIPS[clip]["max_grad_norm"],
                                                  CLIPS[clip].get("norm_type", 2.0))
        ref_scaler.step(ref)
        ref_scaler.update()

        ours.zero_grad()
        our_scaler.scale(loss_of(our_p, coefs)).backward()
        before, before_state = [p.detach().clone() for p in our_p], state_snapshot(ours)
        our_scaler.step(ours)
        our_scaler.update()

        assert our_scaler.get_scale() == ref_scaler.get_scale(), step
        assert float(ours.step_skipped) == float(step in BAD_STEPS)
        if step in BAD_STEPS:
            assert_unchanged(our_p, before, ours, before_state)
        else:
            assert_close(ours.grad_norm, ref_norm)
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)
    for (i, rs), os_ in zip(ref.state.items(), ours.state.values()):
        for k in rs:
            assert_close(os_[k].to(rs[k].device), rs[k])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_scaler_after_manual_unscale(backend):
    """scaler.unscale_(opt) first (to read or clip the grads by hand), then scaler.step: fusedopt
    takes the already-unscaled grads and only the scaler's found-inf flag."""
    ref_p = on_device(make_params(SHAPES, torch.float32))
    our_p = clone_params(ref_p)
    ref = torch.optim.AdamW(ref_p, lr=0.01)
    ours = fusedopt.AdamW(our_p, lr=0.01, max_grad_norm=1.0, backend=backend)
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=256.0),
               fusedopt.GradScaler(DEVICE, init_scale=256.0)]
    for step in range(3):
        coefs = coefficients(ref_p, step)
        for opt, params, scaler in ((ref, ref_p, scalers[0]), (ours, our_p, scalers[1])):
            opt.zero_grad()
            scaler.scale(loss_of(params, coefs)).backward()
            scaler.unscale_(opt)
            if opt is ref:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)


def test_sgd_skipped_first_step_leaves_a_zero_buffer():
    """The documented difference: a momentum buffer made on a skipped first step is zero, so with
    dampening tau the next step takes b = (1 - tau) g where torch.optim (whose step GradScaler
    never called) takes b = g. Without dampening both give b = g."""
    for dampening in (0.0, 0.5):
        p = torch.nn.Parameter(torch.ones(5, device=DEVICE))
        for backend in ("torch", "triton"):
            q = torch.nn.Parameter(p.detach().clone())
            opt = fusedopt.SGD([q], lr=0.1, momentum=0.9, dampening=dampening, nonfinite="skip",
                               backend=backend)
            q.grad = torch.full_like(q, math.inf)
            opt.step()
            assert torch.equal(q, p) and torch.equal(opt.state[q]["momentum_buffer"],
                                                      torch.zeros_like(q))
            g = torch.arange(5.0, device=DEVICE)
            q.grad = g.clone()
            opt.step()
            assert_close(opt.state[q]["momentum_buffer"], (1 - dampening) * g)
            assert_close(q.detach(), p - 0.1 * (1 - dampening) * g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_nonfinite_skip(name, bad, backend):
    """nonfinite='skip': the bad step changes nothing (parameters, state, step counters); the run
    then equals torch.optim + clip_grad_norm_ that never saw that step."""
    ref_p = on_device(make_params(SHAPES, torch.float32))
    our_p = clone_params(ref_p)
    ref = TORCH_CLASSES[name](ref_p, **KWARGS[name])
    ours = OUR_CLASSES[name](our_p, **KWARGS[name], max_grad_norm=1.0, nonfinite="skip",
                             backend=backend)
    for step in range(4):
        grads = [g.to(DEVICE) for g in make_grads(ref_p, step)]
        if step in (0, 2):  # the very first step too: state is created but stays as new
            grads[4].view(-1)[17] = float(bad)
        for p, g in zip(our_p, grads):
            p.grad = g.clone()
        before, before_state = [p.detach().clone() for p in our_p], state_snapshot(ours)
        ours.step()
        assert float(ours.step_skipped) == float(step in (0, 2))
        if step in (0, 2):
            if step == 2:
                assert_unchanged(our_p, before, ours, before_state)
            else:
                for p, b in zip(our_p, before):
                    assert torch.equal(p, b)
            continue
        for p, g in zip(ref_p, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ref_p, 1.0)
        ref.step()
        for r, o in zip(ref_p, our_p):
            assert_close(o, r)
    if name != "SGD":
        assert all(float(s["step"]) == 2.0 for s in ours.state.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_nonfinite_raise(name, backend):
    """nonfinite='raise': FloatingPointError naming the tensor, nothing changed, and training
    goes on with the next good step."""
    params = on_device(make_params(SHAPES, torch.float32))
    opt = OUR_CLASSES[name](params, **KWARGS[name], max_grad_value=0.5, max_grad_norm=1.0,
                            nonfinite="raise", backend=backend)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g.to(DEVICE)
    opt.step()
    for p, g in zip(params, make_grads(params, 1)):
        p.grad = g.to(DEVICE)
    params[3].grad[2, 1] = math.inf  # clamped to 0.5 by max_grad_value if it were not caught first
    before, before_state = [p.detach().clone() for p in params], state_snapshot(opt)
    with pytest.raises(FloatingPointError, match=r"inf in group 0, parameter 3, shape \(13, 7\)"):
        opt.step()
    assert float(opt.step_skipped) == 1.0
    assert_unchanged(params, before, opt, before_state)
    params[3].grad[2, 1] = 0.0
    opt.step()
    assert float(opt.step_skipped) == 0.0
    assert not any(torch.equal(p, b) for p, b in zip(params, before) if p.numel() > 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_propagate_is_torch_behaviour(backend):
    """The default: a NaN gradient reaches the parameters exactly as with torch.optim."""
    ref_p = on_device(make_params(SHAPES, torch.float32))
    our_p = clone_params(ref_p)
    ref = torch.optim.Adam(ref_p, lr=0.01)
    ours = fusedopt.Adam(our_p, lr=0.01, backend=backend)
    for p, q, g in zip(ref_p, our_p, make_grads(ref_p, 0)):
        p.grad, q.grad = g.to(DEVICE), g.to(DEVICE).clone()
    ref_p[2].grad[5] = q_bad = math.nan
    our_p[2].grad[5] = q_bad
    ref.step()
    ours.step()
    assert ours.step_skipped is None
    for r, o in zip(ref_p, our_p):
        assert_close(o, r)
    assert our_p[2][5].isnan()


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite='ignore' is not a policy"):
        fusedopt.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, nonfinite="ignore")


class AtenCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scaler,inf_checks", [("fusedopt", 0), ("torch", 1)])
def test_grad_reads_per_step_under_amp(launches, scaler, inf_checks):
    """fp32 AdamW + AMP + clipping on the Triton path. fusedopt.GradScaler: the norm pass (which
    also finds infs) and the update are the only reads of the grads, 32 bytes per parameter in
    all (g; g, p, m, v read and p, m, v written). torch.amp.GradScaler adds its own inf check, one
    more read of every grad (36). The torch recipe (unscale_, clip_grad_norm_, fused AdamW) is 48."""
    params = on_device(make_params(SHAPES, torch.float32))
    opt = fusedopt.AdamW(params, lr=0.01, max_grad_norm=1.0, backend="triton")
    amp = SCALERS[scaler](DEVICE, init_scale=256.0)
    for step in range(2):
        opt.zero_grad()
        amp.scale(loss_of(params, coefficients(params, 0))).backward()
        launches.clear()
        counter = AtenCalls()
        with counter:
            amp.step(opt)
        amp.update()
        assert launches == {"_norm_kernel": 1, "_update_kernel": 1}
        assert counter.calls.get("_amp_foreach_non_finite_check_and_unscale_", 0) == inf_checks
        assert not {"_foreach_norm", "linalg_vector_norm", "_foreach_mul_", "_foreach_div_"} & set(
            counter.calls), counter.calls


@pytest.mark.parametrize("where", ["kernel tensor", "torch-path tensor"])
def test_tensors_the_kernels_cannot_take_share_the_skip(where):
    """On the Triton backend an fp64 param takes the torch path; an inf in its grad skips the
    kernels' tensors too, and an inf in a kernel tensor skips it: one step, one decision. The
    good steps around it equal the torch backend under fusedopt.GradScaler."""
    def build(backend):
        params = on_device(make_params(SHAPES, torch.float32)) + on_device(
            make_params([(33,)], torch.float64, seed=4))
        return params, fusedopt.AdamW(params, lr=0.01, max_grad_norm=1.0, backend=backend)
    (tri_p, tri), (ref_p, ref) = build("triton"), build("torch")
    scalers = [fusedopt.GradScaler(DEVICE, init_scale=64.0) for _ in range(2)]
    for step in range(3):
        for params, opt, scaler in ((tri_p, tri, scalers[0]), (ref_p, ref, scalers[1])):
            coefs = [c.to(DEVICE) for c in make_grads(params, step)]
            if step == 1:
                coefs[-1 if where == "torch-path tensor" else 0].view(-1)[0] = math.inf
            opt.zero_grad()
            scaler.scale(loss_of(params, coefs)).backward()
            before = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            assert float(opt.step_skipped) == float(step == 1)
            if step == 1:
                assert all(torch.equal(p, b) for p, b in zip(params, before))
        for r, t in zip(ref_p, tri_p):
            assert_close(t, r, torch.float32)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 32.0


def test_bf16_sgd_on_cpu_under_a_scaler():
    """bf16 SGD on the torch path (on CPU: torch's foreach SGD, which reads the skip flag on the
    host) with fusedopt.GradScaler, overflow on the first step included, against the torch recipe
    in bf16: the skipped steps change nothing, the others agree to bf16 rounding (the clip
    multiplies the bf16 grads in the recipe, divides in fp32 here). bf16 Adam is left out: at
    lr 0.01 an update is below one bf16 ulp of most params, and torch's foreach and fused Adam
    already round those differently."""
    name = "SGD"
    ref_p = on_device([p.to(torch.bfloat16) for p in make_params(SHAPES, torch.float32)])
    our_p = clone_params(ref_p)
    ref = TORCH_CLASSES[name](ref_p, **KWARGS[name], foreach=True)
    ours = OUR_CLASSES[name](our_p, **KWARGS[name], max_grad_norm=1.0, backend="torch")
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 8),
               fusedopt.GradScaler(DEVICE, init_scale=2.0 ** 8)]
    for step in range(5):
        coefs = [c.to(DEVICE, torch.bfloat16) for c in make_grads(ref_p, step)]
        if step in (0, 2):
            coefs[2][0] = math.inf
        before = [p.detach().clone() for p in our_p]
        for opt, params, scaler in ((ref, ref_p, scalers[0]), (ours, our_p, scalers[1])):
            opt.zero_grad()
            scaler.scale(loss_of(params, coefs)).backward()
            if opt is ref:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        assert float(ours.step_skipped) == float(step in (0, 2))
        if step in (0, 2):
            assert all(torch.equal(p, b) for p, b in zip(our_p, before))
        for r, o in zip(ref_p, our_p):
            torch.testing.assert_close(o, r, rtol=2.0 ** -7, atol=2.0 ** -7)


@pytest.mark.parametrize("enabled", [True, False])
def test_fusedopt_scaler_is_torch_scaler_for_other_optimizers(enabled):
    """fusedopt.GradScaler with a torch.optim optimizer (or disabled) is torch's GradScaler:
    same params and scale through an overflow step."""
    params = [on_device(make_params(SHAPES, torch.float32)) for _ in range(2)]
    opts = [torch.optim.AdamW(ps, lr=0.01) for ps in params]
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=64.0, enabled=enabled),
               fusedopt.GradScaler(DEVICE, init_scale=64.0, enabled=enabled)]
    for step in range(3):
        coefs = [c.to(DEVICE) for c in make_grads(params[0], step)]
        if step == 1 and enabled:
            coefs[0].view(-1)[0] = math.inf
        for ps, opt, scaler in zip(params, opts, scalers):
            opt.zero_grad()
            scaler.scale(loss_of(ps, coefs)).backward()
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for a, b in zip(*params):
            assert torch.equal(a, b)
