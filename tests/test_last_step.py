"""``opt.last_step``: what a step actually ran (``backend=`` is only what was asked), shown in
``repr``: the backend, how many tensors the kernels and the torch path updated, and why."""
import pickle

import pytest
import torch

import fusedopt
from conftest import DEVICE


def params_with_grads(*tensors):
    out = [torch.nn.Parameter(t) for t in tensors]
    for p in out:
        p.grad = torch.ones_like(p)
    return out


def test_none_before_the_first_step_and_in_repr():
    opt = fusedopt.AdamW(params_with_grads(torch.randn(4, device=DEVICE)))
    assert opt.last_step is None
    assert repr(opt).splitlines()[-2] == "last step: none yet"
    opt.step()
    assert opt.last_step is not None
    assert repr(opt).splitlines()[-2] == f"last step: {opt.last_step}"


def test_torch_asked():
    opt = fusedopt.SGD(params_with_grads(torch.randn(3), torch.randn(2, 2)), lr=0.1,
                       backend="torch")
    opt.step()
    report = opt.last_step
    assert (report.backend, report.kernel_tensors, report.torch_tensors) == ("torch", 0, 2)
    assert report.why_torch == (("backend='torch' was asked", 2),)
    assert str(report) == "torch path, 2 tensors (backend='torch' was asked)"


def test_cpu_params_say_why_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    opt = fusedopt.AdamW(params_with_grads(torch.randn(3)))
    opt.step()
    assert opt.last_step.backend == "torch"
    (reason, n), = opt.last_step.why_torch
    assert n == 1 and "the parameters are on cpu" in reason and "CUDA" in reason


def test_an_optimizer_without_kernels_gives_its_reason():
    opt = fusedopt.LAMB(params_with_grads(torch.randn(3, device=DEVICE)))
    opt.step()
    (reason, n), = opt.last_step.why_torch
    assert (opt.last_step.backend, n) == ("torch", 1)
    assert reason == fusedopt.LAMB._NO_KERNELS


def test_kernels_and_fallbacks_counted_with_their_reasons():
    """On the Triton backend (the interpreter on CPU): plain fp32 tensors in the kernels, an fp64
    one and a transposed one on the torch path, each with its reason; the next step (the kept
    plan) reports the same."""
    ps = params_with_grads(torch.randn(10, device=DEVICE), torch.randn(7, device=DEVICE),
                           torch.randn(5, dtype=torch.float64, device=DEVICE),
                           torch.randn(4, 6, device=DEVICE).t())
    ps[3].grad = torch.ones_like(ps[3])  # laid out as its param: transposed
    opt = fusedopt.SGD(ps, lr=0.1, momentum=0.9, backend="triton")
    for _ in range(2):
        opt.step()
        report = opt.last_step
        assert (report.backend, report.kernel_tensors, report.torch_tensors) == ("triton", 2, 2)
        why = dict(report.why_torch)
        assert why.pop("not contiguous") == 1
        (reason, n), = why.items()
        assert n == 1 and reason.startswith("torch.float64")
    assert str(report).startswith("triton, 2 tensors in the kernels, 2 on the torch path (")


def test_no_tensor_fits_a_kernel():
    opt = fusedopt.Adam(params_with_grads(torch.randn(5, dtype=torch.float64, device=DEVICE)),
                        backend="triton")
    opt.step()
    assert opt.last_step.backend == "torch" and opt.last_step.torch_tensors == 1
    assert opt.last_step.why_torch[0][0].startswith("torch.float64")


def test_pickled_optimizer_has_no_last_step_of_its_own():
    opt = fusedopt.SGD(params_with_grads(torch.randn(3)), lr=0.1, backend="torch")
    opt.step()
    assert pickle.loads(pickle.dumps(opt)).last_step is None  # what ran here, not there


@pytest.mark.parametrize("n", [1, 3])
def test_plural(n):
    from fusedopt._report import StepReport
    assert str(StepReport("torch", 0, n)) == f"torch path, {n} tensor{'s' * (n != 1)}"
