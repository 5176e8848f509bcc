"""The oracle: torch.optim + clip_grad_value_ + clip_grad_norm_, and helpers to drive both sides.

``Pair`` holds two identical copies of a set of parameters: one stepped by the torch recipe, one by
fusedopt. Every test feeds both the same gradients and compares everything observable.
"""
import copy
import io
import math

import torch

import fusedopt
from conftest import DEVICE

SHAPES = [(), (1,), (127,), (13, 7), (4097,), (3, 5, 2)]
STEPS = 7

# Gradients ~N(0, 1) over ~4.5K elements: total L2 norm ~67, inf norm ~4. "active" thresholds
# clip on every step, "inactive" ones never do.
CLIPS = {
    "noclip": {},
    "l2-active": dict(max_grad_norm=0.5),
    "l2-inactive": dict(max_grad_norm=1e4),
    "inf-active": dict(max_grad_norm=0.3, norm_type=math.inf),
    "value": dict(max_grad_value=0.2),
    "value+l2": dict(max_grad_value=0.2, max_grad_norm=0.5),
}

TORCH_CLASSES = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
OUR_CLASSES = {"SGD": fusedopt.SGD, "Adam": fusedopt.Adam, "AdamW": fusedopt.AdamW}
# Accepted by fusedopt but not a valid torch.optim setting on CPU (torch asserts capturable
# params are on CUDA/XPU/HPU): the oracle runs without them; they change no result.
_OURS_ONLY = ("capturable",)


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
            for s in shapes]


def on_device(params):
    """Copies of ``params`` on the tests' device (CUDA when there is one, else the CPU)."""
    return [torch.nn.Parameter(p.detach().to(DEVICE)) for p in params]


def saved(opt):
    """opt's state_dict through torch.save / torch.load, as a checkpoint file would carry it."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grads(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def split_groups(params, group0, group1):
    """Two param groups: the first half with ``group0`` options, the rest with ``group1``."""
    half = len(params) // 2
    return [dict(params=params[:half], **group0), dict(params=params[half:], **group1)]


def copy_options(options):
    """Tensor hyperparameters (lr, betas) must not be shared between the two optimizers."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in options.items()}


class Pair:
    """The torch recipe and fusedopt on identical parameters."""

    def __init__(self, name, shapes, dtype, kwargs, clip, group1=None, seed=0):
        self.clip = clip
        self.ref_params = make_params(shapes, dtype, seed)
        self.our_params = clone_params(self.ref_params)
        ref_kwargs = {k: v for k, v in kwargs.items() if k not in _OURS_ONLY}
        if group1 is None:
            ref_groups, our_groups = self.ref_params, self.our_params
        else:
            ref_groups = split_groups(self.ref_params, {}, copy_options(group1))
            our_groups = split_groups(self.our_params, {}, copy_options(group1))
        self.ref = TORCH_CLASSES[name](ref_groups, **copy_options(ref_kwargs))
        self.ours = OUR_CLASSES[name](our_groups, **copy_options(kwargs), **clip)
        self.ref_norm = None

    def set_grads(self, seed, skip=()):
        for i, (r, o, g) in enumerate(zip(self.ref_params, self.our_params,
                                          make_grads(self.ref_params, seed))):
            r.grad = None if i in skip else g.clone()
            o.grad = None if i in skip else g.clone()

    def step(self):
        ref_norm = ref_step(self.ref, self.ref_params, **self.clip)
        self.ours.step()
        return ref_norm


def ref_step(opt, params, max_grad_norm=None, norm_type=2.0, max_grad_value=None):
    """The torch recipe fusedopt's step must equal; returns clip_grad_norm_'s total norm."""
    with_grad = [p for p in params if p.grad is not None]
    norm = None
    if max_grad_value is not None:
        torch.nn.utils.clip_grad_value_(with_grad, max_grad_value)
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm, norm_type)
    opt.step()
    return norm


def torch_groups(groups, **clip):
    """``groups`` (a state_dict's param_groups) less fusedopt's clip settings, which each group
    must hold as ``clip`` says (a setting not named must be absent): what torch.optim's hold."""
    keys = ("max_grad_norm", "norm_type", "max_grad_value")
    for group in groups:
        assert {k: group[k] for k in keys if k in group} == clip, (group, clip)
    return [{k: v for k, v in g.items() if k not in keys} for g in groups]


def tensors_of_state(opt):
    """Every state tensor of an optimizer, keyed (param index, state key), for comparisons."""
    return {(i, k): v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}

