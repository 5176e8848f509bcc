"""The clip settings (max_grad_norm, norm_type, max_grad_value) live in the param groups, as torch
keeps its hyperparameters: state_dict() carries them, a resumed run takes the saved ones (as it
takes the saved lr), and a scheduler changes them between steps by writing the groups. The
oracle is the torch recipe with the same clip applied by hand each step."""
import math
import pickle

import pytest
import torch

import fusedopt
from conftest import assert_close
from recipe import SHAPES, clone_params, make_grads, make_params, on_device, ref_step, saved

BACKENDS = ["torch", "triton"]


def feed(params, step):
    for p, g in zip(params, make_grads(params, step)):
        p.grad = g.to(p.device)


def two_groups(params, **options):
    return [dict(params=params[:3]), dict(params=params[3:], lr=0.05, **options)]


def test_only_settings_that_are_set_enter_the_groups():
    """A non-clipping optimizer's state_dict is torch.optim's key for key; a clipping one adds
    exactly the settings it uses, in every group."""
    params = make_params(SHAPES, torch.float32)
    plain = fusedopt.AdamW(two_groups(params), lr=0.01)
    torch_keys = [set(g) for g in torch.optim.AdamW(two_groups(clone_params(params)), lr=0.01)
                  .state_dict()["param_groups"]]
    assert [set(g) for g in plain.state_dict()["param_groups"]] == torch_keys
    clipping = fusedopt.AdamW(two_groups(params), lr=0.01, max_grad_norm=1.0, norm_type="inf")
    for group, keys in zip(clipping.state_dict()["param_groups"], torch_keys):
        assert set(group) - keys == {"max_grad_norm", "norm_type"}
        assert (group["max_grad_norm"], group["norm_type"]) == (1.0, math.inf)
    assert (clipping.max_grad_norm, clipping.norm_type, clipping.max_grad_value) == (
        1.0, math.inf, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scheduler_changes_the_clip_between_steps(backend):
    """A clip schedule (max_grad_norm 4 -> 0.5, max_grad_value switched on at step 2, as a
    scheduler would write group["lr"]) equals the torch recipe given the same values each step;
    both through the groups and through opt.max_grad_norm = value."""
    ref_params = make_params(SHAPES, torch.float32)
    params = on_device(ref_params)
    ref = torch.optim.AdamW(ref_params, lr=0.01)
    ours = fusedopt.AdamW(params, lr=0.01, max_grad_norm=4.0, backend=backend)
    schedule = [dict(max_grad_norm=4.0), dict(max_grad_norm=2.0),
                dict(max_grad_norm=1.0, max_grad_value=0.5), dict(max_grad_norm=0.5)]
    for step, clip in enumerate(schedule):
        if step % 2:
            for group in ours.param_groups:
                group.update(max_grad_value=None, **clip)  # None: off, as a missing key
        else:
            ours.max_grad_norm = clip["max_grad_norm"]
            ours.max_grad_value = clip.get("max_grad_value")
        feed(ref_params, step)
        feed(params, step)
        norm = ref_step(ref, ref_params, **clip)
        ours.step()
        assert norm > clip["max_grad_norm"]  # the clip is active on every step
        assert_close(ours.grad_norm.cpu(), norm)
        for r, o in zip(ref_params, params):
            assert_close(o.detach().cpu(), r.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_run_takes_the_saved_clip(backend):
    """Saved clip settings win over the resuming constructor's (as a saved lr does), and the run
    continues as if uninterrupted; a torch.optim checkpoint (no clip keys) takes the
    constructor's; torch.optim loads a fusedopt checkpoint and ignores the keys."""
    params = on_device(make_params(SHAPES, torch.float32))
    first = fusedopt.AdamW(params, lr=0.01, max_grad_norm=0.5, backend=backend)
    for step in range(2):
        feed(params, step)
        first.step()
    blob = saved(first)
    twin = on_device(params)
    resumed = fusedopt.AdamW(twin, lr=0.01, max_grad_norm=7.0, backend=backend)
    resumed.load_state_dict(blob)
    assert resumed.max_grad_norm == 0.5
    for step in range(2, 4):
        feed(params, step)
        feed(twin, step)
        first.step()
        resumed.step()
    for a, b in zip(params, twin):
        assert torch.equal(a, b)

    from_torch = torch.optim.AdamW(on_device(params), lr=0.01)
    fresh = fusedopt.AdamW(on_device(params), lr=0.01, max_grad_norm=3.0)
    fresh.load_state_dict(saved(from_torch))
    assert fresh.max_grad_norm == 3.0 and fresh.param_groups[0]["max_grad_norm"] == 3.0
    torch.optim.AdamW(on_device(params), lr=0.01).load_state_dict(blob)


def test_none_from_a_partial_checkpoint_load_takes_the_constructors():
    """torch.distributed.checkpoint's partial load fills a key the checkpoint lacks with None:
    that means "not saved", so the optimizer's own settings stand."""
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.AdamW(params, lr=0.01, max_grad_norm=2.0, norm_type="inf")
    state = opt.state_dict()
    for group in state["param_groups"]:
        group.update(max_grad_norm=None, norm_type=None, max_grad_value=None)
    opt.load_state_dict(state)
    assert (opt.max_grad_norm, opt.norm_type, opt.max_grad_value) == (2.0, math.inf, None)
    assert "max_grad_value" not in opt.param_groups[0]


def test_groups_that_disagree_are_refused_with_the_fix():
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.AdamW(params[:3], lr=0.01, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"param group 1 has max_grad_norm=2\.0 where group 0 has "
                                         r"1\.0.*opt\.max_grad_norm = value"):
        opt.add_param_group(dict(params=params[3:], max_grad_norm=2.0))
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=params[3:]))  # takes the optimizer's
    assert opt.param_groups[1]["max_grad_norm"] == 1.0
    opt.param_groups[1]["max_grad_norm"] = 0.5  # a scheduler that wrote one group only
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="param group 1 has max_grad_norm=0.5"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert "clip settings refused (fusedopt.AdamW: param group 1 has max_grad_norm=0.5" in repr(opt)


@pytest.mark.parametrize("key,value,error,message", [
    ("max_grad_norm", -1.0, ValueError, "max_grad_norm must be > 0"),
    ("max_grad_norm", torch.tensor(1.0), TypeError, "max_grad_norm must be a float or None"),
    ("norm_type", 1.0, ValueError, "norm_type=1.0 is not supported"),
    ("max_grad_value", float("nan"), ValueError, "max_grad_value must be > 0"),
])
def test_a_bad_value_written_into_the_groups_is_refused_at_the_step(key, value, error, message):
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.SGD(params, lr=0.1, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.ones_like(p)
    for group in opt.param_groups:
        group[key] = value
    with pytest.raises(error, match=message):
        opt.step()
    assert "clip settings refused" in repr(opt)
    with pytest.raises(error, match=message):
        setattr(opt, key, value)


def test_setting_a_default_removes_the_key_and_new_groups_follow():
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.SGD(params[:3], lr=0.1, max_grad_norm=1.0)
    opt.max_grad_norm = None
    assert "max_grad_norm" not in opt.param_groups[0] and "max_grad_norm" not in opt.defaults
    opt.max_grad_value = 0.25
    opt.add_param_group(dict(params=params[3:]))
    assert [g.get("max_grad_value") for g in opt.param_groups] == [0.25, 0.25]
    assert [g.get("max_grad_norm") for g in opt.param_groups] == [None, None]


def test_pickles_keep_the_settings_and_old_pickles_are_read():
    """A pickle carries the groups; one written by fusedopt 0.1.0 (settings as attributes, groups
    without them) is read into the groups."""
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.AdamW(params, lr=0.01, max_grad_norm=0.5, max_grad_value=0.1)
    clone = pickle.loads(pickle.dumps(opt))
    assert (clone.max_grad_norm, clone.max_grad_value) == (0.5, 0.1)
    old = opt._own_state()
    del old["_clip_defaults"]
    old["param_groups"] = [{k: v for k, v in g.items() if k not in ("max_grad_norm",
                                                                    "max_grad_value")}
                           for g in old["param_groups"]]
    old.update(max_grad_norm=0.5, norm_type=2.0, max_grad_value=0.1)
    revived = fusedopt.AdamW.__new__(fusedopt.AdamW)
    revived.__setstate__(old)
    assert (revived.max_grad_norm, revived.norm_type, revived.max_grad_value) == (0.5, 2.0, 0.1)
    assert "max_grad_norm" not in revived.__dict__


@pytest.mark.parametrize("name", ["SGD", "AdamW", "Lion", "LAMB", "Adafactor"])
def test_construction_leaves_torchs_random_stream_alone(name):
    """Swapping torch.optim for fusedopt changes no other random number (dropout, shuffling):
    only an optimizer that rounds stochastically draws its seed from torch's generator."""
    params = make_params(SHAPES, torch.float32)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    getattr(fusedopt, name)(params, lr=0.01, max_grad_norm=1.0)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(0)
    fusedopt.AdamW(params, lr=0.01, stochastic_rounding=True)
    assert not torch.equal(torch.rand(4), expected)
