"""Adagrad, RMSprop, NAdam, RAdam, Adamax and Lion: the chain of tests/test_parity.py and
tests/test_kernels.py for the optimizers that share the one rule-driven update.

1. torch path against torch.optim.<Name> (for-loop) + clip_grad_value_ + clip_grad_norm_, fp32
   and fp64, every config, two param groups, a param missing its grad on some steps and one never
   having a grad, grad_norm against clip_grad_norm_'s return.
2. Triton (interpreter on CPU) against the torch path and against torch.optim, fp32; bf16/fp16
   bounded by the torch path's own low-precision error (conftest.low_precision_bound).
3. Lion against lion-pytorch's step written out below, both backends.
4. Constructor errors: the same exception type and message as torch.optim for the same bad value.
"""
import math

import pytest
import torch

import fusedopt
from conftest import DEVICE, assert_close, low_precision_bound
from recipe import CLIPS, SHAPES, STEPS, clone_params, copy_options, make_grads, make_params, \
    ref_step, split_groups, tensors_of_state
from test_kernels import clone, params_on, set_grads

T = torch.tensor

ADAGRAD_CONFIGS = {
    "default": dict(lr=0.1),
    "lr_decay": dict(lr=0.1, lr_decay=0.05),
    "wd": dict(lr=0.1, weight_decay=0.1),
    "init-acc-eps": dict(lr=0.1, initial_accumulator_value=0.5, eps=1e-3),
    "maximize": dict(lr=0.1, maximize=True),
    "all": dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-6,
                maximize=True),
    "tensor-lr": dict(lr=T(0.1), lr_decay=0.01),
}
RMSPROP_CONFIGS = {
    "default": dict(lr=0.01),
    "alpha-eps": dict(lr=0.01, alpha=0.9, eps=1e-4),
    "wd": dict(lr=0.01, weight_decay=0.1),
    "momentum": dict(lr=0.01, momentum=0.9),
    "centered": dict(lr=0.01, centered=True),
    "centered-momentum": dict(lr=0.01, centered=True, momentum=0.9),
    "maximize": dict(lr=0.01, maximize=True),
    "momentum-wd-max": dict(lr=0.01, momentum=0.5, weight_decay=0.1, maximize=True),
    "tensor-lr": dict(lr=T(0.01), momentum=0.9, centered=True),
}
NADAM_CONFIGS = {
    "default": dict(lr=0.01),
    "momentum_decay": dict(lr=0.01, momentum_decay=0.1),
    "wd": dict(lr=0.01, weight_decay=0.1),
    "decoupled": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "maximize": dict(lr=0.01, maximize=True),
    "betas-eps": dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    "tensor-lr": dict(lr=T(0.01), weight_decay=0.1, momentum_decay=0.01),
}
# RAdam rectifies once rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t) > 5 (test_radam_configs_
# cross_as_claimed checks these claims): beta2 0.999 from step 6, 0.8 from step 7, both within
# STEPS = 7; with 0.7, rho_t stays under 5 for all 7 steps (it reaches 5 at step 12).
RADAM_CONFIGS = {
    "default": dict(lr=0.01),
    "wd": dict(lr=0.01, weight_decay=0.1),
    "decoupled": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "maximize": dict(lr=0.01, maximize=True),
    "beta2-0.8": dict(lr=0.01, betas=(0.9, 0.8), eps=1e-6),
    "beta2-0.7": dict(lr=0.01, betas=(0.8, 0.7)),
    "tensor-lr": dict(lr=T(0.01), weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
}
ADAMAX_CONFIGS = {
    "default": dict(lr=0.01),
    "betas": dict(lr=0.01, betas=(0.8, 0.99)),
    "eps": dict(lr=0.01, eps=1e-3),
    "wd": dict(lr=0.01, weight_decay=0.1),
    "maximize": dict(lr=0.01, maximize=True),
    "tensor-lr": dict(lr=T(0.01), betas=(0.5, 0.9), weight_decay=0.1, maximize=True),
}
# Lion: lr 0.01 where set (each step moves p by lr: visible at rtol 1e-5), decay 3-10x AdamW's
# as the paper advises
LION_CONFIGS = {
    "defaults": {},
    "wd": dict(lr=0.01, weight_decay=0.5),
    "maximize": dict(lr=0.01, maximize=True),
    "wd-max-betas": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.5, maximize=True),
    "tensor-lr": dict(lr=T(0.01), weight_decay=0.1),
}
RADAM_CROSSES = {"default": 6, "beta2-0.8": 7, "beta2-0.7": None}  # first rectified step

# name -> (configs of group 0, overrides of group 1: different hyperparameters in every option
# the group may set)
FAMILY = {
    "Adagrad": (ADAGRAD_CONFIGS, dict(lr=0.05, lr_decay=0.01, weight_decay=0.02, eps=1e-8)),
    "RMSprop": (RMSPROP_CONFIGS, dict(lr=0.003, alpha=0.95, weight_decay=0.02, momentum=0.5)),
    "NAdam": (NADAM_CONFIGS, dict(lr=0.003, betas=(0.85, 0.98), weight_decay=0.02,
                                  momentum_decay=0.01)),
    "RAdam": (RADAM_CONFIGS, dict(lr=0.003, betas=(0.85, 0.98), weight_decay=0.02)),
    "Adamax": (ADAMAX_CONFIGS, dict(lr=0.003, betas=(0.85, 0.98), weight_decay=0.02, eps=1e-6)),
}
CASES = [(name, key) for name, (cfgs, _) in FAMILY.items() for key in cfgs]
ALL = {**FAMILY, "Lion": (LION_CONFIGS, dict(lr=0.003, betas=(0.95, 0.98), weight_decay=0.1))}


def config(name, key, dtype):
    """(kwargs of group 0, group 1's overrides); Tensor hyperparameters in ``dtype``: torch's
    for-loop optimizers form lr-dependent scalars in the Tensor lr's dtype, so an fp32 Tensor
    would make the fp64 oracle fp32-accurate (as tests/test_parity.config says for Adam)."""
    cfgs, group1 = ALL[name]
    kwargs, group1 = cfgs[key], dict(group1)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        group1["lr"] = T(group1["lr"])
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: cast(v) for k, v in kwargs.items()}, {k: cast(v) for k, v in group1.items()}


def build(cls, params, kwargs, group1, **extra):
    """``cls`` over two param groups: the first half of ``params`` with ``kwargs``, the rest with
    ``group1``'s overrides."""
    return cls(split_groups(params, {}, copy_options(group1)), **copy_options(kwargs), **extra)


# -- the oracle ----------------------------------------------------------------------------------

# RMSprop's step g / sqrt(v) does not shrink with the gradient: up to lr / sqrt(1 - alpha) = 10 lr
# per step, and with momentum 0.9 up to 100 lr. Params travel several units in 7 steps, so one
# fp32 ulp of their path (ulp(8) = 9.5e-7) is already conftest's atol, and a param that ends near
# 0 fails TOL on rounding alone (RMSprop-momentum-noclip: 1.9e-6 = 2**-19 off, one ulp of a value
# in [8, 16), at a final value of 0.018). Centered, sqrt(v - grad_avg**2) amplifies an ulp of g:
# the Triton and torch paths, whose clip coefficients differ in the norm's last bit, ended 4.7e-5
# apart (2.8e-3 relative) in a momentum buffer of RMSprop-centered-value+l2. In fp32 these are
# held, flash-attn style, to twice torch's own fp32 error against torch.optim run in fp64 on the
# same inputs, plus half an ulp of the largest value (low_precision_bound), over all params at
# once (one element's error is a coin toss: a 0-dim param came out 1 ulp off where torch's was
# 0.2 ulp off). Measured over every RMSprop config and clip: at most 0.83 of that bound (torch
# path) and 0.51 (Triton); ours/torch's error 1.0 at the median.
ORACLE_BOUND = {"RMSprop"}


class Recipe:
    """The reference on its own copy of the params: ``cls`` (torch.optim.<Name>'s for-loop, or
    LionReference) after clip_grad_value_ + clip_grad_norm_, in ``ref_dtype`` (default: the
    params'); with ``exact_args`` the same again in fp64 from the same values, to bound fp32
    results whose rounding alone exceeds TOL (ORACLE_BOUND)."""

    def __init__(self, cls, params, kwargs, group1, clip, ref_dtype=None, exact_args=None):
        self.clip = clip
        self.params = [torch.nn.Parameter(p.detach().to(ref_dtype or p.dtype, copy=True))
                       for p in params]
        self.opt = build(cls, self.params, kwargs, group1, foreach=False)
        self.exact = None
        if exact_args is not None:
            self.exact = [torch.nn.Parameter(p.detach().double()) for p in params]
            self.exact_opt = build(cls, self.exact, *exact_args, foreach=False)

    def step(self, grads):
        """grads[i] None: no grad this step. Returns clip_grad_norm_'s total norm (or None)."""
        runs = [(self.params, self.opt)] + ([(self.exact, self.exact_opt)] if self.exact else [])
        norms = []
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.dtype, copy=True)
            norms.append(ref_step(opt, params, **self.clip))
        return norms[0]

    def check_params(self, params, dtype):
        if self.exact is None:
            for r, o in zip(self.params, params):
                assert_close(o, r.to(o.dtype), dtype)
        else:
            within_torch_error(*(torch.cat([p.detach().reshape(-1) for p in ps])
                                 for ps in (params, self.params, self.exact)))

    def check_state(self, opt, dtype):
        """Every state tensor: the reference's keys, shapes, dtypes and devices, and its values
        (each key over all params at once against the fp64 oracle, as the params)."""
        ref_state, our_state = tensors_of_state(self.opt), tensors_of_state(opt)
        assert ref_state.keys() == our_state.keys()
        for k, r in ref_state.items():
            o = our_state[k]
            if k[1] in ("step", "mu_product"):  # fp32 scalars in torch too
                assert (o.shape, o.dtype, o.device) == (r.shape, r.dtype, r.device), k
                assert_close(o, r)
                continue
            assert (o.shape, o.dtype, o.device) == (r.shape, dtype, r.device), k
            if self.exact is None:
                assert_close(o, r.to(dtype), dtype)
        if self.exact is not None:
            exact_state = tensors_of_state(self.exact_opt)
            for key in {k for _, k in ref_state} - {"step"}:
                keys = [k for k in ref_state if k[1] == key]
                within_torch_error(*(torch.cat([st[k].reshape(-1) for k in keys])
                                     for st in (our_state, ref_state, exact_state)))


def within_torch_error(ours, theirs, exact):
    """ours no further from the fp64 oracle than twice torch's fp32 result is (+ half an ulp)."""
    err_torch = float((theirs.double() - exact).abs().max())
    err_ours = float((ours.double() - exact).abs().max())
    assert err_ours <= low_precision_bound(err_torch, exact, torch.float32), (err_ours, err_torch)


def grads_of_step(params, step):
    """make_grads on the params' device, with param 2 missing its grad on steps 2 and 4 and the
    last param never having one."""
    skip = {len(params) - 1} | ({2} if step in (2, 4) else set())
    return [None if i in skip else g.to(p.device)
            for i, (p, g) in enumerate(zip(params, make_grads(params, step)))]


def run(name, key, clip, dtype, backends, shapes=SHAPES + [(4,)], steps=STEPS, device="cpu"):
    """fusedopt.<name> on each backend against its Recipe, every step: params, clipped grads (the
    torch path leaves them in .grad, the Triton path leaves .grad as it was), grad_norm; the
    backends against each other (TOL: both run rules.py in fp32, apart by the norm's last bits;
    for ORACLE_BOUND those bits grow as they do between torch and ours, and each backend is held
    to the fp64 oracle instead); then the state. Returns {backend: (optimizer, params)}."""
    kwargs, group1 = config(name, key, dtype)
    start = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(shapes, dtype)]
    bounded = dtype == torch.float32 and name in ORACLE_BOUND
    if name == "Lion":
        recipe = Recipe(LionReference, start, kwargs, group1, clip, ref_dtype=torch.float64)
    else:
        exact = config(name, key, torch.float64) if bounded else None
        recipe = Recipe(getattr(torch.optim, name), start, kwargs, group1, clip, None, exact)
    ours = {}
    for backend in backends:
        params = clone_params(start)
        ours[backend] = (build(getattr(fusedopt, name), params, kwargs, group1, backend=backend,
                               **clip), params)
    for step in range(steps):
        grads = grads_of_step(start, step)
        ref_norm = recipe.step(grads)
        for backend, (opt, params) in ours.items():
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            opt.step()
            recipe.check_params(params, dtype)
            for p, r, g in zip(params, recipe.params, grads):
                if g is None:
                    assert p.grad is None
                elif backend == "torch":
                    assert_close(p.grad, r.grad.to(dtype), dtype)
                else:
                    assert torch.equal(p.grad, g), "the Triton path must not write .grad"
            if ref_norm is None:
                assert opt.grad_norm is None
            else:
                assert (opt.grad_norm.shape, opt.grad_norm.dtype) == ((), dtype)
                assert_close(opt.grad_norm, ref_norm.to(dtype), dtype)
        if len(ours) == 2:
            (opt_a, params_a), (opt_b, params_b) = ours.values()
            for a, b in zip(params_a, params_b):
                if not bounded:
                    assert_close(b, a)
            if ref_norm is not None:
                assert_close(opt_b.grad_norm, opt_a.grad_norm)
    for opt, _ in ours.values():
        recipe.check_state(opt, dtype)
    if len(ours) == 2 and not bounded:
        (opt_a, _), (opt_b, _) = ours.values()
        state_a, state_b = tensors_of_state(opt_a), tensors_of_state(opt_b)
        assert state_a.keys() == state_b.keys()
        for k, v in state_a.items():
            assert_close(state_b[k], v)
    return ours


# -- 1. torch path against torch.optim -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("name,key", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_torch_path_matches_torch_recipe(name, key, clip, dtype):
    run(name, key, CLIPS[clip], dtype, ["torch"])


def test_radam_configs_cross_as_claimed():
    """The premise of RADAM_CONFIGS, from torch's own formula: where rho_t first exceeds 5."""
    for key, first in RADAM_CROSSES.items():
        beta2 = RADAM_CONFIGS[key].get("betas", (0.9, 0.999))[1]
        rho_inf = 2 / (1 - beta2) - 1
        rho = [rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t) for t in range(1, STEPS + 1)]
        assert next((t for t, r in enumerate(rho, 1) if r > 5), None) == first, (key, rho)


# -- 2. Triton against the torch path and the reference ------------------------------------------

# 0-dim, 1, 127 (a tail), 4097 (four full 1024-blocks and a 1-element tail), a 3-d and a 9 (the
# last never has a grad): every flag of each rule and each clip mode at least once, 5 steps (6 for
# RAdam: it rectifies from step 6). The interpreter takes ~0.1 s per step here.
TRITON_SHAPES = [(), (1,), (127,), (4097,), (3, 5, 2), (9,)]
TRITON_CASES = [
    ("Adagrad", "all", "value+l2"), ("Adagrad", "tensor-lr", "noclip"),
    ("RMSprop", "centered-momentum", "l2-active"), ("RMSprop", "momentum-wd-max", "inf-active"),
    ("RMSprop", "alpha-eps", "noclip"), ("RMSprop", "centered", "value+l2"),
    ("NAdam", "decoupled", "inf-active"), ("NAdam", "tensor-lr", "l2-active"),
    ("NAdam", "maximize", "noclip"),
    ("RAdam", "default", "value+l2"), ("RAdam", "tensor-lr", "inf-active"),
    ("RAdam", "beta2-0.7", "noclip"),
    ("Adamax", "tensor-lr", "l2-active"), ("Adamax", "eps", "noclip"),
    ("Lion", "defaults", "l2-active"), ("Lion", "wd-max-betas", "value+l2"),
    ("Lion", "tensor-lr", "noclip"),
]


@pytest.mark.parametrize("name,key,clip", TRITON_CASES, ids=["-".join(c) for c in TRITON_CASES])
def test_triton_matches_torch_path_and_reference(name, key, clip):
    run(name, key, CLIPS[clip], torch.float32, ["torch", "triton"], TRITON_SHAPES,
        6 if name == "RAdam" else 5, DEVICE)


# One config per optimizer with most of its flags on.
LOW_PRECISION = {"Adagrad": "all", "RMSprop": "centered-momentum", "NAdam": "decoupled",
                 "RAdam": "default", "Adamax": "tensor-lr", "Lion": "wd-max-betas"}


def copy_state_as(src, src_params, dst, dst_params, dtype):
    """src's state into dst, element-wise state in ``dtype``; the fp32 scalars (step,
    mu_product) as they are, as torch keeps them."""
    for p, q in zip(src_params, dst_params):
        dst.state[q] = {k: v.detach().clone() if v.dim() == 0 and k in ("step", "mu_product")
                        else v.detach().to(dtype, copy=True) for k, v in src.state[p].items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_triton_low_precision_error_bound(name, dtype):
    """As tests/test_kernels.test_low_precision_error_bound: each step, from the Triton run's
    current state, the kernel in ``dtype`` against the fp32 torch path, within twice the torch
    path's own error in ``dtype`` + half an ulp (conftest.low_precision_bound), for the params
    and every state tensor. 4 steps (RAdam 6: it rectifies from step 6)."""
    kwargs, group1 = config(name, LOW_PRECISION[name], torch.float32)
    clip = dict(max_grad_norm=0.5, max_grad_value=2.0)
    cls = getattr(fusedopt, name)
    tri_p = params_on(TRITON_SHAPES, dtype)
    tri = build(cls, tri_p, kwargs, group1, backend="triton", **clip)
    for step in range(6 if name == "RAdam" else 4):
        ref_p, low_p = clone(tri_p, torch.float32), clone(tri_p)
        ref = build(cls, ref_p, kwargs, group1, backend="torch", **clip)
        low = build(cls, low_p, kwargs, group1, backend="torch", **clip)
        copy_state_as(tri, tri_p, ref, ref_p, torch.float32)
        copy_state_as(tri, tri_p, low, low_p, dtype)
        set_grads([tri_p, low_p], step, dtype)
        for p, q in zip(ref_p, tri_p):
            p.grad = None if q.grad is None else q.grad.float()
        for opt in (tri, ref, low):
            opt.step()
        pairs = list(zip(tri_p, ref_p, low_p)) + [
            (tri.state[t][k], ref.state[r][k], low.state[q][k])
            for t, r, q in zip(tri_p, ref_p, low_p) for k in tri.state[t] if k != "step"]
        assert len(pairs) > len(tri_p)
        for t, r, q in pairs:
            assert t.dtype == q.dtype
            err_triton = float((t.detach().float() - r.detach()).abs().max()) if t.numel() else 0.0
            err_torch = float((q.detach().float() - r.detach()).abs().max()) if t.numel() else 0.0
            assert err_triton <= low_precision_bound(err_torch, r, dtype), (step, err_triton,
                                                                            err_torch)


# -- 3. Lion against lion-pytorch ----------------------------------------------------------------

LION_DEFAULTS = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)  # lion-pytorch's signature


class LionReference:
    """lion-pytorch's Lion.step (lucidrains/lion-pytorch, lion_pytorch/lion_pytorch.py: update_fn)
    op for op, on whatever dtype its params have (float64 here). ``maximize`` (fusedopt's, as in
    torch.optim; lion-pytorch has none) negates the gradient first. Extra keywords are ignored."""

    def __init__(self, params, **defaults):
        defaults = {k: defaults[k] for k in ("lr", "betas", "weight_decay", "maximize")
                    if k in defaults}
        groups = params if isinstance(params[0], dict) else [dict(params=params)]
        self.param_groups = [{**LION_DEFAULTS, "maximize": False, **defaults, **g} for g in groups]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = float(group["lr"]), group["weight_decay"], group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                grad = -p.grad if group["maximize"] else p.grad
                if p not in self.state:
                    self.state[p] = dict(exp_avg=torch.zeros_like(p))
                exp_avg = self.state[p]["exp_avg"]
                p.data.mul_(1 - lr * wd)
                update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)

    def state_dict(self):
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return dict(state={index[p]: st for p, st in self.state.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("key", list(LION_CONFIGS))
def test_lion_torch_path_matches_lion_pytorch(key, clip, dtype):
    """Against the fp64 reference: fp32 results within TOL of it (Lion's update is lr * sign, so
    rounding only moves p by ulps; a sign flipped by rounding would be 2 lr off)."""
    run("Lion", key, CLIPS[clip], dtype, ["torch"])


def test_lion_defaults_are_lion_pytorchs():
    opt = fusedopt.Lion([torch.nn.Parameter(torch.zeros(3))])
    assert {k: opt.defaults[k] for k in LION_DEFAULTS} == LION_DEFAULTS
    assert opt.defaults["maximize"] is False


@pytest.mark.parametrize("kwargs", [dict(lr=-1e-4), dict(lr=T([1e-4, 2e-4])),
                                    dict(betas=(-0.1, 0.99)), dict(betas=(1.1, 0.99)),
                                    dict(betas=(0.9, -0.01)), dict(betas=(0.9, 1.5)),
                                    dict(weight_decay=-0.1)],
                         ids=["lr", "tensor-lr-2", "beta1-neg", "beta1-big", "beta2-neg",
                              "beta2-big", "wd"])
def test_lion_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        fusedopt.Lion([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_lion_accepts_the_edges():
    """lion-pytorch's range is 0 <= beta <= 1 (both ends in), lr and weight decay 0 upwards."""
    fusedopt.Lion([torch.nn.Parameter(torch.zeros(3))], lr=0.0, betas=(0.0, 1.0), weight_decay=0.0)
    fusedopt.Lion([torch.nn.Parameter(torch.zeros(3))], betas=(1.0, 0.0))


# -- 4. constructor errors as torch.optim's ------------------------------------------------------

_BETAS = [dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.0)), dict(betas=(-0.1, 0.999)),
          dict(betas=(0.9, -0.1)), dict(betas=(0.9,))]
TORCH_REFUSES = [
    *[(name, kw) for name in ("Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax") for kw in (
        dict(lr=-1e-3), dict(lr=math.nan), dict(lr=T([0.01, 0.02])), dict(eps=-1.0),
        dict(eps=math.nan), dict(weight_decay=-0.1))],
    ("Adagrad", dict(lr_decay=-0.1)),
    ("Adagrad", dict(initial_accumulator_value=-0.1)),
    ("Adagrad", dict(fused=True, foreach=True)),
    ("RMSprop", dict(momentum=-0.1)),
    ("RMSprop", dict(alpha=-0.1)),
    ("NAdam", dict(momentum_decay=-0.1)),
    *[(name, kw) for name in ("NAdam", "RAdam", "Adamax") for kw in _BETAS],
]


@pytest.mark.parametrize("name,kwargs", TORCH_REFUSES,
                         ids=[f"{n}-{'-'.join(kw)}-{i}" for i, (n, kw) in enumerate(TORCH_REFUSES)])
def test_same_exception_as_torch(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)(make_params(SHAPES, torch.float32), **kwargs)
    with pytest.raises(theirs.type) as ours:
        getattr(fusedopt, name)(make_params(SHAPES, torch.float32), **kwargs)
    assert str(ours.value) == str(theirs.value)


TORCH_ACCEPTS = [
    *[(name, {}) for name in FAMILY],
    ("Adagrad", dict(lr=0.0, lr_decay=0.0, eps=0.0, initial_accumulator_value=0.0)),
    ("RMSprop", dict(lr=0.0, alpha=0.0, eps=0.0, momentum=0.0)),
    ("RMSprop", dict(alpha=1.5)),
    *[(name, dict(lr=0.0, eps=0.0, betas=(0.0, 0.0))) for name in ("NAdam", "RAdam", "Adamax")],
    ("NAdam", dict(momentum_decay=0.0)),
]


@pytest.mark.parametrize("name,kwargs", TORCH_ACCEPTS,
                         ids=[f"{n}-{'-'.join(kw) or 'defaults'}" for n, kw in TORCH_ACCEPTS])
def test_accepts_what_torch_accepts(name, kwargs):
    """The defaults, and the edges of torch's ranges: both take them, with the same values."""
    theirs = getattr(torch.optim, name)(make_params(SHAPES, torch.float32), **kwargs)
    ours = getattr(fusedopt, name)(make_params(SHAPES, torch.float32), **kwargs)
    assert {k: ours.defaults[k] for k in theirs.defaults} == theirs.defaults
