"""Small fused CPU steps run on one thread (fusedopt/_elementwise.small_cpu_op): torch's fused CPU
optimizer ops split any work over every thread, and where other processes keep the cores busy a
2,177-parameter AdamW step took 48 ms with 2 threads against 0.1 ms with 1. The thread count is
torch's again after the step, large steps keep every thread, and the results are the same bits
(the ops are elementwise)."""
import pytest
import torch

import fusedopt
from fusedopt._elementwise import ONE_THREAD_BELOW


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def model_params(n):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n)), torch.nn.Parameter(torch.randn(7))]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


@pytest.mark.parametrize("n, threads_in_op", [(100, 1), (ONE_THREAD_BELOW, 2)])
@pytest.mark.parametrize("name, op", [("AdamW", "_fused_adamw_"), ("Adam", "_fused_adam_"),
                                      ("Adagrad", "_fused_adagrad_"), ("SGD", "_fused_sgd_")])
def test_small_fused_steps_take_one_thread(two_threads, monkeypatch, name, op, n, threads_in_op):
    seen = []
    real = getattr(torch, op)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, op, spy)
    ps = model_params(n)
    opt = getattr(fusedopt, name)(ps, lr=1e-2, backend="torch", max_grad_norm=1.0)
    opt.step()
    assert seen == [threads_in_op]  # one call: SGD without momentum, the others their fused op
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("name", ["AdamW", "Adagrad", "SGD"])
def test_one_thread_changes_no_bit(two_threads, name):
    """The same steps with every thread (the op forced to 2 by raising the bar to 0 elements) and
    with one: identical params and state."""
    runs = []
    for bar in (0, 10 ** 9):
        import fusedopt._elementwise as elementwise
        old = elementwise.ONE_THREAD_BELOW
        elementwise.ONE_THREAD_BELOW = bar
        try:
            ps = model_params(5000)
            opt = getattr(fusedopt, name)(ps, lr=1e-2, backend="torch", max_grad_norm=1.0)
            for _ in range(3):
                opt.step()
        finally:
            elementwise.ONE_THREAD_BELOW = old
        runs.append([p.detach().clone() for p in ps])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_threads_restored_when_the_op_raises(two_threads, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "_fused_adamw_", boom)
    opt = fusedopt.AdamW(model_params(10), backend="torch")
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert torch.get_num_threads() == 2
