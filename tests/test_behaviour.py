"""Everything around step() behaves as in torch.optim: closures, hooks, schedulers, param groups,
zero_grad, params without grads, grad_norm, pickling, GradScaler, the drop-in signature."""
import copy
import inspect
import math
import pickle

import pytest
import torch

import fusedopt
from conftest import assert_close
from recipe import SHAPES, OUR_CLASSES, TORCH_CLASSES, Pair, clone_params, make_grads, make_params, ref_step

NAMES = ["SGD", "Adam", "AdamW"]
KWARGS = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.01), "AdamW": dict(lr=0.01)}


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_torch_signature_plus_clip_options(name):
    ours = inspect.signature(OUR_CLASSES[name].__init__).parameters
    theirs = inspect.signature(TORCH_CLASSES[name].__init__).parameters
    for arg, p in theirs.items():
        assert arg in ours, arg
        assert (ours[arg].default, ours[arg].kind) == (p.default, p.kind), arg
    extras = {k: ours[k].default for k in ours if k not in theirs}
    assert extras == dict(max_grad_norm=None, norm_type=2.0, max_grad_value=None,
                          nonfinite="propagate", backend=None, norm_group=None,
                          stochastic_rounding=False, master_weights=False, state_dtype=None,
                          rounding_seed=None)
    assert all(ours[k].kind == inspect.Parameter.KEYWORD_ONLY for k in extras)
    assert issubclass(OUR_CLASSES[name], TORCH_CLASSES[name])


@pytest.mark.parametrize("name", NAMES)
def test_closure_loss_returned_and_grads_enabled(name):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = OUR_CLASSES[name]([w], **KWARGS[name], max_grad_norm=1.0)

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert_close(opt.grad_norm, torch.tensor(math.sqrt(20.0)))


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_once_per_step(name):
    params = make_params(SHAPES, torch.float32)
    opt = OUR_CLASSES[name](params, **KWARGS[name])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    opt.step()
    opt.step()
    assert calls == ["pre", "post", "pre", "post"]


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers_match_torch(name, sched):
    """OneCycleLR also cycles SGD's momentum and Adam's beta1; ReduceLROnPlateau reads a metric."""
    pair = Pair(name, SHAPES, torch.float32, KWARGS[name], dict(max_grad_norm=1.0), group1={})
    scheds = [SCHEDULERS[sched](pair.ref), SCHEDULERS[sched](pair.ours)]
    for step in range(7):
        pair.set_grads(step)
        pair.step()
        for s in scheds:
            s.step(10.0 - (step % 2)) if sched == "ReduceLROnPlateau" else s.step()
        assert pair.ours.param_groups[0]["lr"] == pair.ref.param_groups[0]["lr"]
        for r, o in zip(pair.ref_params, pair.our_params):
            assert_close(o, r)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_mid_training(name):
    pair = Pair(name, SHAPES, torch.float32, KWARGS[name], dict(max_grad_norm=1.0))
    extra_ref = make_params([(9,), ()], torch.float32, seed=5)
    extra_ours = clone_params(extra_ref)
    for step in range(6):
        if step == 3:
            pair.ref.add_param_group(dict(params=extra_ref, lr=0.02))
            pair.ours.add_param_group(dict(params=extra_ours, lr=0.02))
            pair.ref_params += extra_ref
            pair.our_params += extra_ours
        pair.set_grads(step)
        pair.step()
    for r, o in zip(pair.ref_params, pair.our_params):
        assert_close(o, r)


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_both_ways(name):
    """set_to_none=False keeps zero grads that still step (weight decay, momentum); True drops them."""
    kwargs = dict(KWARGS[name], weight_decay=0.1)
    pair = Pair(name, SHAPES, torch.float32, kwargs, dict(max_grad_norm=1.0))
    pair.set_grads(0)
    pair.step()
    for opt in (pair.ref, pair.ours):
        opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in pair.our_params)
    pair.step()
    assert_close(pair.ours.grad_norm, torch.tensor(0.0))
    for r, o in zip(pair.ref_params, pair.our_params):
        assert_close(o, r)
    pair.ours.zero_grad()
    assert all(p.grad is None for p in pair.our_params)


@pytest.mark.parametrize("name", NAMES)
def test_no_grads_at_all_is_a_no_op(name):
    params = make_params(SHAPES, torch.float32)
    before = [p.detach().clone() for p in params]
    opt = OUR_CLASSES[name](params, **KWARGS[name], max_grad_norm=1.0)
    opt.step()
    assert len(opt.state) == 0
    assert_close(opt.grad_norm, torch.tensor(0.0))
    for b, p in zip(before, params):
        assert torch.equal(b, p)


def test_grad_norm_without_clipping_via_inf():
    """max_grad_norm=inf measures the norm (as clip_grad_norm_ returns it) and never clips."""
    pair = Pair("AdamW", SHAPES, torch.float32, KWARGS["AdamW"], dict(max_grad_norm=math.inf))
    assert pair.ours.grad_norm is None
    pair.set_grads(0)
    expected = torch.nn.utils.get_total_norm([p.grad for p in pair.ref_params])
    pair.ref.step()
    pair.ours.step()
    assert isinstance(pair.ours.grad_norm, torch.Tensor) and pair.ours.grad_norm.dim() == 0
    assert pair.ours.grad_norm.device == pair.our_params[0].device
    assert_close(pair.ours.grad_norm, expected)
    for r, o in zip(pair.ref_params, pair.our_params):
        assert_close(o, r)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_keep_clip_settings(how):
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.AdamW(params, lr=0.01, max_grad_norm=0.5, norm_type="inf", max_grad_value=0.1,
                         nonfinite="skip", backend="torch")
    clone = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    assert (clone.max_grad_norm, clone.norm_type, clone.max_grad_value, clone.nonfinite,
            clone.backend) == (0.5, math.inf, 0.1, "skip", "torch")
    assert "max_grad_norm=0.5" in repr(clone)
    assert clone._step_supports_amp_scaling  # GradScaler still hands it grad_scale / found_inf


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_cpu(name):
    """GradScaler.step(fusedopt) unscales, skips overflowing steps and steps otherwise: the same
    result as the torch recipe scaler.unscale_ + clip_grad_norm_ + scaler.step(torch.optim)."""
    pair = Pair(name, SHAPES, torch.float32, KWARGS[name], dict(max_grad_norm=1.0))
    sides = [(pair.ref, pair.ref_params, torch.amp.GradScaler("cpu", init_scale=1024.0), True),
             (pair.ours, pair.our_params, torch.amp.GradScaler("cpu", init_scale=1024.0), False)]
    for step in range(4):
        coefs = make_grads(pair.ref_params, step)
        before = [p.detach().clone() for p in pair.our_params]
        for opt, params, scaler, is_ref in sides:
            opt.zero_grad()
            loss = sum((p * c).sum() for p, c in zip(params, coefs))
            scaler.scale(loss * (math.inf if step == 1 else 1.0)).backward()
            if is_ref:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        assert sides[0][2].get_scale() == sides[1][2].get_scale()
        for r, o, b in zip(pair.ref_params, pair.our_params, before):
            assert_close(o, r)
            if step == 1:
                assert torch.equal(o, b)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_optimizer(name):
    """fp32 and fp64 params share one global norm; each dtype group steps in its own precision."""
    params = make_params(SHAPES, torch.float32) + make_params([(33,), ()], torch.float64, seed=3)
    ours_p = clone_params(params)
    ref = TORCH_CLASSES[name](params, **KWARGS[name])
    ours = OUR_CLASSES[name](ours_p, **KWARGS[name], max_grad_norm=1.0)
    for step in range(4):
        for p, q, g in zip(params, ours_p, make_grads(params, step)):
            p.grad, q.grad = g.clone(), g.clone()
        norm = ref_step(ref, params, max_grad_norm=1.0)
        ours.step()
        assert_close(ours.grad_norm.to(norm.dtype), norm, torch.float32)
        for r, o in zip(params, ours_p):
            assert_close(o, r, torch.float32)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm_of_large_tensors_is_accurate(norm_type):
    """Against the float64 norm, not torch's CPU fp32 norm (2.7e-3 low on a 38.6M-element tensor,
    see fusedopt/clip.py): 1e-6 relative holds for a 300K-element tensor beside small ones."""
    params = make_params([(300, 1001), (17,), (70_000,), ()], torch.float32)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g * 3.0
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().view(-1) for p in params]), norm_type)
    opt = fusedopt.SGD(params, lr=0.1, max_grad_norm=1.0, norm_type=norm_type)
    opt.step()
    assert opt.grad_norm.dtype == torch.float32
    torch.testing.assert_close(opt.grad_norm.double(), exact, rtol=1e-6, atol=0)
