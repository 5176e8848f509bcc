"""bench/run.py's bytes per element (its GB/s column) against a count of what one step really
does: every aten op a step dispatches, its whole-tensor reads and writes summed
(bench/measure.py's ByteCount, which run.py also uses for LAMB and Adafactor). Every optimizer
with a formula, every implementation that runs on the CPU, fp32 and bf16, each clip mode."""
import importlib
import sys

import pytest
import torch

from conftest import BENCH

NUMEL = 4099  # per tensor: no step counter, norm or scale has this size


@pytest.fixture(scope="module")
def run():
    """bench/run.py imported (bench/ on sys.path for its own imports; its modules dropped
    after)."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))
        for name in ("run", "measure", "report", "shapes"):
            if name not in before:
                sys.modules.pop(name, None)


def counted_bytes(run, opt, impl, dtype, clip):
    """Bytes per element of one steady-state step (after run.py's own warm-up) of two tensors."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(NUMEL, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
    masters = [torch.randn(NUMEL, generator=gen).to(dtype) for _ in params]
    for p, g in zip(params, masters):
        p.grad = g.clone()
    step = run.make_step(opt, impl, params, clip)
    for _ in range(max(2, run.MIN_WARMUP.get(opt, 1)) + 1):
        torch._foreach_copy_([p.grad for p in params], masters)
        step()
    torch._foreach_copy_([p.grad for p in params], masters)
    with run.measure.ByteCount(min_numel=NUMEL) as count:
        step()
    return count.bytes / (2 * NUMEL), count.ops


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw", "adagrad", "rmsprop", "nadam", "radam",
                                 "adamax", "lion"])
def test_bytes_per_element_is_what_a_step_moves(run, opt):
    assert opt in run.OPTIMIZERS
    impls = [i for i in run.impls_for(opt, torch.device("cpu"), False)]
    assert impls[-1] == "fusedopt (torch)"  # the Triton kernels are counted by hand only
    wrong = []
    for dtype in (torch.float32, torch.bfloat16):
        elt = torch.empty((), dtype=dtype).element_size()
        for clip in run.CLIP_MODES:
            for impl in impls:
                counted, ops = counted_bytes(run, opt, impl, dtype, clip)
                table = run.bytes_per_element(opt, impl, elt, clip, "cpu")
                if counted != table:
                    wrong.append(f"{impl} {dtype} clip {clip}: table {table}, counted {counted} "
                                 f"({'; '.join(ops)})")
    assert not wrong, "\n".join(wrong)


def test_fused_recipes_only_where_torch_has_them(run):
    cpu = torch.device("cpu")
    fused = {o for o in run.OPTIMIZERS if "torch fused" in run.impls_for(o, cpu, False)}
    assert fused == {"sgd", "adam", "adamw", "adagrad"}  # torch 2.13
    for opt in set(run.OPTIMIZERS) - set(run.COUNTED):
        assert run.fused_elements(opt) == 3 + 2 * run.STATE_COPIES[opt]
        assert run.bytes_per_element(opt, "fusedopt (triton)", 4, "on") == \
            4 * (1 + run.fused_elements(opt))  # norm pass 1 + one fused update
    for opt in run.COUNTED:  # no formula, and no Triton rows (fusedopt has no kernel for them)
        with pytest.raises(ValueError, match="counted at run time"):
            run.bytes_per_element(opt, "fusedopt (torch)", 4, "on")
        assert run.OPTIMIZERS[opt][1]._NO_KERNELS


def test_counted_bytes_for_lamb_and_adafactor(run):
    """What ByteCount gives run.py for LAMB and Adafactor, against the costs their classes'
    docstrings give (fusedopt/optim/lamb.py, adafactor.py), fp32 with the clip."""
    # LAMB: 12 foreach passes, 108 B, + the norm pass and the clip written back, 12: 120 per
    # element, on fusedopt's path and, pass for pass, on the bench's Apex stand-in too
    for impl in ("torch for-loop", "torch foreach", "fusedopt (torch)"):
        assert counted_bytes(run, "lamb", impl, torch.float32, "on")[0] == 120, impl
    # Adafactor, a vector (elementwise variance): torch's for-loop 76 + clip 12 = 88
    assert counted_bytes(run, "adafactor", "torch for-loop", torch.float32, "on")[0] == 88
