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


def counted_bytes(run, opt, impl, dtype, clip, memory=None):
    """Bytes per element of one steady-state step (after run.py's own warm-up) of two tensors
    (``memory``: one of run.MEMORY's configurations, as run.py --memory steps it)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(NUMEL, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
    masters = [torch.randn(NUMEL, generator=gen).to(dtype) for _ in params]
    for p, g in zip(params, masters):
        p.grad = g.clone()
    step = run.make_step(opt, impl, params, clip, memory)
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


# -- run.py --memory ---------------------------------------------------------------------------

# AdamW with the clip, bytes per param one Triton step moves (the README's memory-lean table)
TRITON_ADAMW = {"bf16": 16, "bf16+sr": 16, "bf16+sr+fp32-states": 24, "bf16+master": 20,
                "bf16+master+fp32-states": 28, "fp16+master": 22, "fp16+master+fp32-states": 30,
                "fp32+bf16-states": 24}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_memory_bytes_per_element_is_what_a_step_moves(run, opt):
    """Every torch recipe of run.py --memory (torch.optim in the param dtype, and the fp32 master
    copy kept by hand) against the count of its step, clip off and on; fusedopt's torch path is
    counted as it runs, so it has no table entry, and its non-lean configuration ("bf16": torch's
    fused op) moves what bytes_per_element says."""
    cpu = torch.device("cpu")
    wrong, seen = [], set()
    for memory, (dtype, _, recipe) in run.MEMORY.items():
        impls = run.memory_impls_for(opt, memory, cpu)
        assert impls[-1] == "fusedopt (torch)" and len(impls) == 4, impls
        assert all(i.endswith(" + fp32 master") == (recipe == "fp32 master") for i in impls[:-1])
        with pytest.raises(ValueError, match="counted at run time"):
            run.memory_bytes_per_element(opt, memory, "fusedopt (torch)", "on", "cpu")
        for clip in ("off", "on"):
            for impl in impls[:-1]:
                if (dtype, impl, clip) in seen:  # configurations of one dtype share the recipes
                    continue
                seen.add((dtype, impl, clip))
                counted, ops = counted_bytes(run, opt, impl, dtype, clip, memory)
                table = run.memory_bytes_per_element(opt, memory, impl, clip, "cpu")
                if counted != table:
                    wrong.append(f"{memory} {impl} clip {clip}: table {table}, counted {counted} "
                                 f"({'; '.join(ops)})")
    for clip in ("off", "on"):
        counted, _ = counted_bytes(run, opt, "fusedopt (torch)", torch.bfloat16, clip, "bf16")
        assert counted == run.bytes_per_element(opt, "fusedopt (torch)", 2, clip, "cpu")
    assert not wrong, "\n".join(wrong)


def test_memory_triton_bytes(run):
    """The Triton step's bytes by hand: the plain rows' formula for the non-lean configurations,
    the README's table for AdamW, and SGD's single state column."""
    for opt in ("sgd", "adamw", "rmsprop"):
        for clip in ("off", "on"):
            assert run.memory_triton_bytes(opt, "bf16", clip) == \
                run.bytes_per_element(opt, "fusedopt (triton)", 2, clip)
    assert {m: run.memory_triton_bytes("adamw", m, "on") for m in run.MEMORY} == TRITON_ADAMW
    assert run.memory_triton_bytes("sgd", "bf16+master+fp32-states", "on") == 2 + 6 + 8 + 4
    assert run.memory_triton_bytes("sgd", "fp16+master", "off") == 2 + 2 + 4 + 8
    # the hand-kept master recipe, bf16 AdamW fused with the clip: grads to fp32 (2 + 4), fp32
    # clip + fused AdamW (40), masters back into the params (4 + 2)
    assert run.memory_bytes_per_element("adamw", "bf16+master", "torch fused + fp32 master",
                                        "on") == 52
