"""CUDA graphs: a step that never reads a device value on the host can be captured and replayed.

On CPU: every step configuration below runs under a TorchFunctionMode that fails on each way
Python can read a tensor's value (item, bool, float, int, tolist, numpy, nonzero). Kernel launches
are exempt: under the CPU interpreter Triton itself copies tensors through numpy; on a GPU a launch
reads no value. On a GPU: a whole training step (forward, backward, scaler, clip, step) is
captured, replayed with a Tensor lr changed by a scheduler, and compared with eager steps.
"""
import contextlib
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fusedopt
from conftest import DEVICE, assert_close, wrap_kernels
from recipe import OUR_CLASSES, SHAPES, make_grads, make_params

HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.tolist,
              torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero}


class NoHostReads(TorchFunctionMode):
    """Fails on any host read of a tensor's value, except while ``allowed`` (a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.allowed = 0

    @contextlib.contextmanager
    def allow(self):
        self.allowed += 1
        try:
            yield
        finally:
            self.allowed -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and not self.allowed:
            raise AssertionError(f"the step read a tensor on the host: {func.__name__}")
        return func(*args, **(kwargs or {}))


def steps_read_nothing(opt, params, coefs_for, scaler=None, mode=None, inf_at=None):
    """Four training steps, a LinearLR scheduler on ``opt``, loss sum(p * c) with
    ``coefs_for(step)``, the scaler's step when there is one; the steps after the first (which
    makes the state) run under ``mode`` (a NoHostReads), and ``inf_at`` (index, element) puts an
    inf in step 2's gradient. Fails on a host read; returns nothing."""
    mode = mode or NoHostReads()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    for step in range(4):
        coefs = coefs_for(step)
        if step == 2 and inf_at is not None:
            coefs[inf_at[0]][inf_at[1]] = math.inf
        opt.zero_grad()
        loss = sum((p * c).sum() for p, c in zip(params, coefs))
        (scaler.scale(loss) if scaler else loss).backward()
        with mode if step else contextlib.nullcontext():
            scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
        sched.step()
    assert all(torch.isfinite(p).all() for p in params)  # the inf step was skipped


def test_the_mode_catches_host_reads():
    with pytest.raises(AssertionError, match="item"), NoHostReads():
        torch.ones(()).item()
    with pytest.raises(AssertionError, match="__bool__"), NoHostReads():
        if torch.ones(()) > 0:
            pass


CASES = {
    "sgd-clip-tensor-lr": ("SGD", dict(lr=torch.tensor(0.1), momentum=0.9, max_grad_norm=1.0), None),
    "adamw-clip-value": ("AdamW", dict(lr=torch.tensor(0.01), max_grad_norm=1.0,
                                       max_grad_value=0.5), None),
    "adam-inf-norm-skip": ("Adam", dict(lr=0.01, max_grad_norm=0.5, norm_type=math.inf,
                                        nonfinite="skip"), None),
    "adamw-fusedopt-scaler": ("AdamW", dict(lr=0.01, max_grad_norm=1.0), fusedopt.GradScaler),
    "sgd-torch-scaler": ("SGD", dict(lr=0.1, momentum=0.9), torch.amp.GradScaler),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_reads_nothing_on_the_host(case, backend, monkeypatch):
    """After a first step (which creates the state), steps with a scheduler on a Tensor lr, an
    inf gradient where 'skip' or a GradScaler skips it, and a fresh grad every step, read no
    value."""
    name, kwargs, scaler_cls = CASES[case]
    mode = NoHostReads()
    wrap_kernels(monkeypatch, {}, around=mode.allow)
    params = [torch.nn.Parameter(p.to(DEVICE)) for p in make_params(SHAPES, torch.float32)]
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    opt = OUR_CLASSES[name](params, **kwargs, backend=backend)
    scaler = scaler_cls(DEVICE, init_scale=1024.0) if scaler_cls else None
    can_skip = scaler is not None or kwargs.get("nonfinite") == "skip"
    steps_read_nothing(opt, params, lambda step: [c.to(DEVICE) for c in make_grads(params, step)],
                       scaler, mode, (1, 0) if can_skip else None)


def test_capture_refuses_a_table_refresh_it_could_not_replay(monkeypatch):
    """During capture, new grads would need a host-to-device copy of their addresses: refused,
    with what to do, rather than captured from a host buffer nothing keeps alive."""
    from fusedopt import _multi_tensor
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warmup steps"):
        _multi_tensor.to_device([1, 2, 3], torch.device("cuda"))


def _train_step(model, opt, scaler, x, y):
    opt.zero_grad(set_to_none=False)  # the grads keep their storage: the graph's tables stay valid
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: CUDA graphs exist only there")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_cuda_graph_replay_matches_eager(name, backend):
    """A whole AMP training step captured once and replayed 8 times, a scheduler changing the
    Tensor lr between replays and one overflow step, against the same steps run eagerly."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                  torch.nn.Linear(256, 64)).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    kwargs = dict(lr=torch.tensor(0.01, device="cuda"), max_grad_norm=1.0, backend=backend)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    opts = [OUR_CLASSES[name](m.parameters(), **{k: v.clone() if isinstance(v, torch.Tensor) else v
                                                 for k, v in kwargs.items()}) for m in models]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in opts]
    scalers = [fusedopt.GradScaler("cuda", init_scale=2.0 ** 10) for _ in opts]
    data = [(torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda"))
            for _ in range(11)]
    data[6][0][0, 0] = math.inf  # an overflow step: skipped on the device, scale halved
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            for m, o, s in zip(models, opts, scalers):
                _train_step(m, o, s, *data[i])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_step(models[0], opts[0], scalers[0], static_x, static_y)
    for i in range(3, 11):
        static_x.copy_(data[i][0])
        static_y.copy_(data[i][1])
        graph.replay()
        _train_step(models[1], opts[1], scalers[1], *data[i])
        for s in scheds:
            s.step()
        assert_close(opts[0].param_groups[0]["lr"], opts[1].param_groups[0]["lr"])
    torch.cuda.synchronize()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert_close(a, b)
