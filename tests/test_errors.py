"""Bad input: torch.optim's validation unchanged, and fusedopt's own checks name the problem and
fire before any parameter, gradient or state is touched."""
import math

import pytest
import torch

import fusedopt
from recipe import SHAPES, OUR_CLASSES, TORCH_CLASSES, make_grads, make_params

T = torch.tensor

# (optimizer, kwargs) that torch.optim refuses; fusedopt must raise the same exception type.
TORCH_REFUSES = [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(lr=T([0.1, 0.2]))),
    ("SGD", dict(momentum=-0.5)),
    ("SGD", dict(weight_decay=-1.0)),
    ("SGD", dict(nesterov=True)),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
    ("SGD", dict(fused=True, foreach=True)),
    *[(name, kw) for name in ("Adam", "AdamW") for kw in (
        dict(lr=-1e-3),
        dict(eps=-1.0),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(betas=(-0.1, 0.999)),
        dict(weight_decay=-0.1),
        dict(betas=(T(0.9), 0.999)),
        dict(lr=T(0.01), foreach=True),
        dict(lr=T([0.01, 0.02])),
        dict(betas=(T(0.9), T(0.999)), foreach=True),
        dict(fused=True, foreach=True),
    )],
]


@pytest.mark.parametrize("name,kwargs", TORCH_REFUSES,
                         ids=[f"{n}-{'-'.join(kw)}-{i}" for i, (n, kw) in enumerate(TORCH_REFUSES)])
def test_same_exception_type_as_torch(name, kwargs):
    with pytest.raises(Exception) as theirs:
        TORCH_CLASSES[name](make_params(SHAPES, torch.float32), **kwargs)
    with pytest.raises(theirs.type) as ours:
        OUR_CLASSES[name](make_params(SHAPES, torch.float32), **kwargs)
    assert str(ours.value) == str(theirs.value)


OUR_CHECKS = [
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm must be > 0"),
    (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm must be > 0"),
    (dict(max_grad_norm="1.0"), TypeError, "max_grad_norm must be a float"),
    (dict(max_grad_value=0.0), ValueError, "max_grad_value must be > 0"),
    (dict(max_grad_value=T(1.0)), TypeError, "max_grad_value must be a float"),
    (dict(max_grad_norm=1.0, norm_type=1.0), ValueError, "norm_type=1.0 is not supported"),
    (dict(max_grad_norm=1.0, norm_type="fro"), ValueError, "norm_type='fro' is not supported"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is not one of"),
    (dict(differentiable=True), NotImplementedError, "does not support differentiable=True"),
]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("kwargs,exc,message", OUR_CHECKS, ids=[str(c[0]) for c in OUR_CHECKS])
def test_fusedopt_options_checked_at_construction(name, kwargs, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(".", r"\.")):
        OUR_CLASSES[name](make_params(SHAPES, torch.float32), **kwargs)


def test_norm_type_accepts_torch_spellings():
    params = make_params(SHAPES, torch.float32)
    for spelling in (2, 2.0, "2", math.inf, "inf"):
        assert fusedopt.SGD(params, max_grad_norm=1.0, norm_type=spelling).norm_type in (2.0, math.inf)


@pytest.mark.parametrize("dtype,word", [(torch.complex64, "complex"), (torch.int64, "non-floating-point")])
def test_non_float_params_refused(dtype, word):
    p = torch.ones(3, dtype=dtype)
    with pytest.raises(TypeError, match=f"parameter 1 of the new group .* has {word} dtype"):
        fusedopt.AdamW([torch.nn.Parameter(torch.ones(2)), p])
    opt = fusedopt.AdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=word):
        opt.add_param_group(dict(params=[p]))
    assert len(opt.param_groups) == 1


def test_non_leaf_param_refused():
    leaf = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        fusedopt.SGD([leaf * 2])


def test_differentiable_group_refused_mid_training():
    opt = fusedopt.Adam(make_params(SHAPES, torch.float32))
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        opt.add_param_group(dict(params=make_params([(3,)], torch.float32), differentiable=True))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_sparse_grad_refused_before_anything_is_touched(name):
    """The sparse grad sits on the last param: value clamping of the earlier grads, the norm and
    every update must not have happened when the error is raised."""
    params = make_params(SHAPES, torch.float32)
    opt = OUR_CLASSES[name](params, lr=0.1, max_grad_value=0.01, max_grad_norm=0.1)
    grads = make_grads(params, 0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[-1].grad = grads[-1].to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(group 0, parameter 5"):
        opt.step()
    for p, b, g in zip(params[:-1], before, grads):
        assert torch.equal(p, b) and torch.equal(p.grad, g)
    assert len(opt.state) == 0 and opt.grad_norm is None


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_triton_backend_on_cpu_without_interpreter_says_why(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: the parameters are on cpu; "
                                           r"the kernels run on CUDA GPUs \(or on CPU tensors under "
                                           "TRITON_INTERPRET=1\\)"):
        OUR_CLASSES[name](make_params(SHAPES, torch.float32), backend="triton")


def test_triton_backend_refuses_several_devices(monkeypatch):
    """Meta params are decided at step() (deferred initialisation), so a CPU + meta mix is
    refused there, before anything is written; without a GPU meta is the only second device."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = make_params(SHAPES, torch.float32) + [torch.nn.Parameter(torch.ones(2, device="meta"))]
    opt = fusedopt.SGD(params, backend="triton")
    before = [p.detach().clone() for p in params[:-1]]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="span several devices"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_backend_torch_runs_on_cpu():
    params = make_params(SHAPES, torch.float32)
    opt = fusedopt.SGD(params, lr=0.1, backend="torch", max_grad_norm=1.0)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    opt.step()
    assert opt.grad_norm is not None
