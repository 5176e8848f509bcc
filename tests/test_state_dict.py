"""state_dict: same layout as torch.optim, and checkpoints move both ways mid-training."""
import io

import pytest
import torch

from conftest import assert_close
from recipe import SHAPES, OUR_CLASSES, TORCH_CLASSES, clone_params, make_grads, make_params

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


def saved(opt):
    """A state_dict through torch.save / torch.load, as a checkpoint file would carry it."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


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
