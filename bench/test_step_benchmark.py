"""pytest-benchmark suite: the time of one whole optimizer step (global-norm clip + update).

It answers the question bench/run.py answers, in a form that pytest-benchmark can store and compare
from run to run: how long does ``fusedopt.X(..., max_grad_norm=1.0).step()`` take beside torch's
best recipe, ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)`` +
``torch.optim.X(fused=True).step()``, for SGD (momentum 0.9), Adam and AdamW, over small shape sets?
Each test times one step per round, nothing else: the gradients that the clip rewrote are restored
from a pristine copy in pedantic's ``setup`` (not timed), so every timed step clips and updates the
same gradients. The Triton backend is timed only where CUDA and triton are there; elsewhere its
tests skip and say why (on CPU the kernels would run in Triton's interpreter, which times nothing
useful).

bench/ is not in ``testpaths`` (pyproject.toml), so ``pytest`` / ``pytest tests`` never collect this
file: run it by path.

    pytest bench/                                         # run, print a table per group
    pytest bench/ --benchmark-autosave                    # ... and save the run under .benchmarks/
    pytest bench/ --benchmark-autosave --benchmark-compare --benchmark-compare-fail=median:25%
                         # ... and compare with the latest saved run first; fail a test whose
                         # median step is over 25% slower than in that run
    pytest-benchmark list                                 # the saved runs
    pytest-benchmark compare 0001 0002                    # two saved runs, side by side
    pytest-benchmark compare --group-by=group --columns=min,median,iqr,rounds
    pytest bench/ --benchmark-disable                     # run each step once, as a smoke test

``--benchmark-storage=PATH`` (pytest) / ``--storage PATH`` (pytest-benchmark, before the command)
pick another folder than ./.benchmarks. Results are grouped by (optimizer, shape set): each group's
table holds the torch baseline and fusedopt's backends, and ``extra_info`` records the bytes each
implementation moves per element (ELEMENTS_MOVED below), the tensor and element counts, the device
(on CPU with torch's thread count) and torch's version. Round counts are fixed here (ROUNDS), so
``--benchmark-max-time`` does not apply; ``--benchmark-min-rounds=N`` raises them.

On CPU, torch runs on one thread here (CPU_THREADS: with more, other processes on the cores can
stretch a step a hundredfold), so the CPU numbers are single-thread step times. They still move
with the machine's load: compare runs made on the same, quiet machine, and prefer the min and
median columns.
"""
import functools
import os
import platform
import sys

import pytest
import torch

import fusedopt

# bench/shapes.py is a plain module, not part of a package: put its folder on sys.path so that
# `import shapes` works whatever pytest's rootdir and --import-mode (bench/run.py gets the same
# from being run as a script).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import shapes  # noqa: E402  bench/shapes.py

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32
MAX_NORM = 1.0  # clip_grad_norm_(params, 1.0), norm type 2, as in bench/run.py

# name -> (torch class, fusedopt class, hyperparameters shared by both): bench/run.py's OPTIMIZERS.
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, fusedopt.SGD, dict(lr=1e-3, momentum=0.9)),
    "adam": (torch.optim.Adam, fusedopt.Adam, dict(lr=1e-3)),
    "adamw": (torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}

# Small shape sets, all from bench/shapes.py. "many-small-256" is the first 256 tensors of the
# many-small set: 256 x (4096,), 1M elements, the many-tensors regime at a size that keeps a CPU
# step around 10 ms.
SHAPE_SETS = {
    "smoke": lambda: shapes.get("smoke"),
    "many-small-256": lambda: shapes.get("many-small")[:256],
}
# Timed rounds per test (one step each) and untimed steps before them (the first step allocates the
# optimizer state; on CUDA the first Triton steps compile). Sized so that a CPU test takes well
# under a second.
ROUNDS = {"smoke": 50, "many-small-256": 20}
WARMUP_ROUNDS = 3

# torch's intra-op threads on CPU while a step is timed. One: with two or more, each of torch's
# fused CPU ops opens an OpenMP region that waits for every thread, so a neighbour on the cores
# stretches a step a hundredfold (many-small-256 AdamW on 2 cores beside a busy process: 2 s per
# step with 2 threads, 9 ms with 1), and a regression hides in that noise. Baseline and fusedopt
# get the same setting; the thread count is in each result's extra_info["device"].
CPU_THREADS = 1

# The implementations: the baseline (torch's best recipe) and fusedopt's two backends.
BASELINE = "torch-fused"
IMPLS = (BASELINE, "fusedopt-torch", "fusedopt-triton")

# Bytes one clip + update step moves per parameter element, in elements of DTYPE: the clip-on
# totals of bytes_per_element in bench/run.py (its docstring counts them kernel by kernel).
ELEMENTS_MOVED = {
    ("sgd", "torch-fused"): 8, ("sgd", "fusedopt-torch"): 7, ("sgd", "fusedopt-triton"): 6,
    ("adam", "torch-fused"): 10, ("adam", "fusedopt-torch"): 9, ("adam", "fusedopt-triton"): 8,
    ("adamw", "torch-fused"): 10, ("adamw", "fusedopt-torch"): 9, ("adamw", "fusedopt-triton"): 8,
}


def make_step(opt: str, impl: str, params: list[torch.Tensor]):
    """One whole step of ``impl`` over ``params`` (their .grad set), clip included."""
    torch_cls, our_cls, hyper = OPTIMIZERS[opt]
    if impl != BASELINE:
        backend = impl.removeprefix("fusedopt-")
        return our_cls(params, **hyper, max_grad_norm=MAX_NORM, backend=backend).step
    optimizer = torch_cls(params, **hyper, fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        optimizer.step()
    return step


def _triton_skip_reason() -> str | None:
    if DEVICE.type != "cuda":
        return ("the Triton backend is benchmarked on CUDA only; no CUDA device here (on CPU its "
                "kernels would run in Triton's interpreter)")
    from fusedopt._dispatch import triton_unavailable_reason
    reason = triton_unavailable_reason({DEVICE})
    return None if reason is None else f"the Triton backend cannot run: {reason}"


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} torch threads"


@pytest.fixture(autouse=True)
def _cpu_threads():
    if DEVICE.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _masters(set_name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pristine params and grads for a shape set, made once; tests step clones of them."""
    shape_list = SHAPE_SETS[set_name]()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = [torch.randn(s, generator=gen, device=DEVICE, dtype=DTYPE) for s in shape_list]
    grads = [torch.randn(s, generator=gen, device=DEVICE, dtype=DTYPE) for s in shape_list]
    # the clip must scale at every step, as in training with a clip that bites
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) > 2 * MAX_NORM, float(norm)
    return params, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("set_name", list(SHAPE_SETS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_step(benchmark, request, opt, set_name, impl):
    if impl == "fusedopt-triton":
        reason = _triton_skip_reason()
        if reason:
            pytest.skip(reason)

    master_params, master_grads = _masters(set_name)
    params = [m.clone().requires_grad_() for m in master_params]
    for p, g in zip(params, master_grads):
        p.grad = g.clone()
    grads = [p.grad for p in params]
    step = make_step(opt, impl, params)
    if DEVICE.type == "cuda":
        # evict the tensors from L2 between steps, as bench/measure.py and triton's do_bench do
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=DEVICE)
        sync = torch.cuda.synchronize
    else:
        flush, sync = None, (lambda: None)

    setups = 0

    def setup():  # not timed: undo the clip's rewrite of .grad, then let the device go idle
        nonlocal setups
        setups += 1
        torch._foreach_copy_(grads, master_grads)
        if flush is not None:
            flush.zero_()
        sync()

    def one_step():  # timed: the whole step, clip included, finished on the device
        step()
        sync()

    benchmark.group = f"{opt} {set_name}"
    benchmark.extra_info.update(
        optimizer=opt, impl=impl, shapes=set_name, tensors=len(params),
        numel=shapes.numel(SHAPE_SETS[set_name]()), dtype=str(DTYPE).removeprefix("torch."),
        device=_device_name(), torch=torch.__version__, max_grad_norm=MAX_NORM,
        bytes_per_element=ELEMENTS_MOVED[opt, impl] * DTYPE.itemsize,
    )
    rounds = max(ROUNDS[set_name], request.config.getoption("benchmark_min_rounds"))
    benchmark.pedantic(one_step, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS,
                       iterations=1)

    # what was timed was a real step on restored grads: one restore per step, params moved, finite
    assert setups == (WARMUP_ROUNDS + rounds if benchmark.enabled else 1)
    with torch.no_grad():
        assert all(bool(torch.isfinite(p).all()) for p in params)
        assert any(not torch.equal(p, m) for p, m in zip(params, master_params))
