"""Machine code without a GPU: every kernel variant, built as the runtime builds it from a real
optimizer step's launch (the binder's pointer divisibility, the launch's own options), compiles for
sm_80 and sm_90, spills nothing, moves each tensor with 128-bit
global loads and stores on its full blocks, and the NaN-keeping maxes (AMSGrad's, Adamax's) stay
NaN-keeping. The update is one skeleton (kernels/update.py) with each optimizer's rule as a
constexpr: a variant is a rule and its flags, and every optimizer has some.

tests/compile_kernels.py records the launches and compiles them, in child processes without
TRITON_INTERPRET (the interpreter replaces the JIT functions that triton.compile needs), one per
arch; registers and the stack frame are read from the cubin Triton built. A variant has one build
per distinct specialization its launches get (say, a pointer only 8-byte aligned in one param
group's launch).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

SCRIPT = pathlib.Path(__file__).with_name("compile_kernels.py")
# variant -> (tensors read, tensors written, bytes per element) on a full block: g, p and the
# state columns read; p and the state columns written
TRAFFIC = {
    "norm-fp32-l2-value-step": (1, 0, 4),
    "norm-bf16-inf": (1, 0, 2),
    "norm-fp32-steps-only": (0, 0, 4),
    "sgd-fp32-all-flags": (3, 2, 4),
    "sgd-fp32-plain": (2, 1, 4),
    "sgd-bf16-momentum-inf": (3, 2, 2),
    "adam-fp32-all-flags": (5, 4, 4),
    "adam-fp32-plain": (4, 3, 4),
    "adamw-bf16-clip": (4, 3, 2),
    "adam-fp16-amsgrad": (5, 4, 2),
    "norm-fp32-l2-amp-detect": (1, 0, 4),
    "norm-fp16-detect-only": (1, 0, 2),
    "adamw-fp32-clip-amp-fused": (4, 3, 4),
    "adam-bf16-amp-torch": (4, 3, 2),
    "sgd-fp32-momentum-clip-amp-fused": (3, 2, 4),
    "sgd-fp16-all-guards": (3, 2, 2),
    "norm-fp32-l2": (1, 0, 4),
    "norm-fp32-l2-step-snapshot": (1, 0, 4),
    "norm-fp32-steps-snapshot": (0, 0, 4),
    "norm-bf16-l2-amp-step-snapshot": (1, 0, 2),
    "adagrad-fp32-clip-maximize": (3, 2, 4),
    "adagrad-fp16-value-amp-torch": (3, 2, 2),
    "rmsprop-fp32-centered-momentum-clip": (5, 4, 4),
    "rmsprop-bf16-centered-momentum-inf-skip": (5, 4, 2),
    "nadam-fp32-clip": (4, 3, 4),
    "nadam-fp32-plain": (4, 3, 4),
    "nadam-bf16-decoupled-clip-amp-torch": (4, 3, 2),
    "radam-fp32-decoupled-all-flags": (4, 3, 4),
    "radam-fp16-decoupled-clip": (4, 3, 2),
    "adamax-fp32-inf-value": (4, 3, 4),
    "adamax-bf16-clip-amp-fused": (4, 3, 2),
    "lion-fp32-clip-maximize": (3, 2, 4),
    "lion-fp32-plain": (3, 2, 4),
    "lion-bf16-clip-amp-torch": (3, 2, 2),
    "norm-bf16-l2-step": (1, 0, 2),
    # mixed element sizes: (bytes of each tensor read, bytes of each tensor written); a bf16
    # remainder master reads and writes p and the int16 remainder, an fp16 copy master reads the
    # fp32 copy in place of p and writes both
    "adamw-bf16-sr-clip": ((2, 2, 2, 2), (2, 2, 2)),
    "adamw-bf16-remainder-clip-amp-fused": ((2, 2, 2, 2, 2), (2, 2, 2, 2)),
    "adamw-fp16-copy-bf16-states-sr": ((2, 4, 2, 2), (2, 4, 2, 2)),
    "adam-fp32-bf16-states-sr-amsgrad": ((4, 4, 2, 2, 2), (4, 2, 2, 2)),
    "sgd-bf16-momentum-sr-clip": ((2, 2, 2), (2, 2)),
    "rmsprop-fp32-bf16-states-centered-momentum-sr": ((4, 4, 2, 2, 2), (4, 2, 2, 2)),
    "lion-bf16-remainder-fp32-states": ((2, 2, 2, 4), (2, 2, 4)),
}
# variants whose rule takes a NaN-keeping max of every element: AMSGrad's max(max_exp_avg_sq, v)
# and Adamax's max(beta2 * exp_inf, |g| + eps)
NAN_MAX = ("adam-fp32-all-flags", "adam-fp16-amsgrad", "adamax-fp32-inf-value",
           "adamax-bf16-clip-amp-fused")
ARCHS = ("sm_80", "sm_90")
ELEMENTS_PER_THREAD = 8  # BLOCK_SIZE 1024 / (4 warps x 32 threads)
PARTIALS_PER_THREAD = 8  # NUM_PARTIALS 1024 / (4 warps x 32 threads)
# configuration (by its update variant) -> whether its steps launch the norm pass. Lion and SGD
# keep no step counter: without a clip or a guard a step is its update launches alone. NAdam's
# counter and mu_product snapshot need the norm pass, clip or not.
NORM_PASS = {
    "lion-fp32-plain": False,
    "sgd-fp32-plain": False,
    "lion-fp32-clip-maximize": True,
    "nadam-fp32-plain": True,
    "lion-bf16-remainder-fp32-states": False,  # remainders need no counter; rounding does
    "sgd-bf16-momentum-sr-clip": True,
}


def _spill_cases() -> list:
    # none spills, on triton 3.9 (ptxas 13.4, with Triton's --regAllocOptLevel=2) nor 3.6 (ptxas
    # 12.8, checked by hand): keeping the float64 hyperparameters live across the block loop had
    # spilled fp32 AdamW with every flag on sm_90 (3.9) and fp16 AMSGrad (3.6), 8-byte stack frames
    return [pytest.param(variant, arch, id=f"{variant}-{arch}") for variant in TRAFFIC
            for arch in ARCHS]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["triton"] == triton.__version__
    return report


def builds(report, variant):
    found = report["variants"][variant]["builds"]
    assert found, f"no launch of {variant}: its configuration (compile_kernels.STEPS) made none"
    return found


def test_every_variant_is_built(report):
    assert set(report["variants"]) == set(TRAFFIC)
    for variant in TRAFFIC:
        builds(report, variant)


@pytest.mark.parametrize("variant", list(TRAFFIC))
def test_launch_specializes_as_named(report, variant):
    """The configuration behind each name launches the constexprs the name says (the rule by its
    name in kernels/_common.RULES)."""
    expected = report["variants"][variant]["expected"]
    for build in builds(report, variant):
        assert build["constexprs"] == expected


@pytest.mark.parametrize("variant", list(NORM_PASS))
def test_launches_per_step(report, variant):
    """A step launches the norm pass only when something needs it (a clip, a guard, a step
    counter), then one update per param group."""
    config, = [c for c in report["configurations"] if c["update"] == variant]
    one_step = ["_norm_kernel"] * NORM_PASS[variant] + ["_update_kernel"] * report["param_groups"]
    assert config["kernels"] == one_step * report["steps"]


def test_launches_pin_fp_fusion(report):
    """Every launch says enable_fp_fusion itself: Triton's default turns from on to off in 3.10
    (3.9 warns), and a Triton upgrade must not change the numbers. The build used it."""
    unpinned = [launch for launch in report["launches"]
                if "enable_fp_fusion" not in launch["options"]]
    assert not unpinned, f"{len(unpinned)} launches leave enable_fp_fusion to Triton: {unpinned[0]}"
    for variant in TRAFFIC:
        for build in builds(report, variant):
            for arch in ARCHS:
                assert build[arch]["enable_fp_fusion"] == build["options"]["enable_fp_fusion"]
                assert build[arch]["num_warps"] == build["options"]["num_warps"]


# Stochastic rounding over 16-bit state columns under triton 3.6 (the GPU image's): the random
# bits' hashes, 8 elements a thread, beside 4 fp32 columns. With each hash made just before its
# stores (kernels/update.py) triton 3.6 used at most 152 registers (fp32 AMSGrad with bf16 states,
# sm_90; fp16 AdamW with an fp32 copy and bf16 states 146 on sm_80), triton 3.9 at most 96: 3
# blocks of 128 threads per SM where 3.9 keeps 5. No spill either way; the bound still holds
# them there.
SR_HEAVY = ("adamw-fp16-copy-bf16-states-sr", "adam-fp32-bf16-states-sr-amsgrad",
            "rmsprop-fp32-bf16-states-centered-momentum-sr")


def register_limit(report, variant) -> int:
    old_triton = tuple(int(x) for x in report["triton"].split(".")[:2]) < (3, 9)
    return 160 if variant in SR_HEAVY and old_triton else 128


@pytest.mark.parametrize("variant, arch", _spill_cases())
def test_compiles_without_spills(report, variant, arch):
    """No stack frame: these kernels keep no arrays in local memory, so one is a register spill."""
    for build in builds(report, variant):
        facts = build[arch]
        assert facts["cubin_bytes"] > 0
        assert facts["stack_bytes"] == 0 and facts["local_bytes"] == 0, build
        # 128: room for 4 blocks of 128 threads per SM
        assert 0 < facts["registers"] <= register_limit(report, variant), build


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(TRAFFIC))
def test_full_blocks_use_128_bit_accesses(report, variant, arch):
    traffic = TRAFFIC[variant]
    if isinstance(traffic[0], tuple):  # element sizes per tensor
        reads, writes = (sum(ELEMENTS_PER_THREAD * e // 16 for e in sizes) for sizes in traffic)
        per_tensor = 1
    else:
        reads, writes, elt = traffic
        per_tensor = ELEMENTS_PER_THREAD * elt // 16  # 128-bit accesses per thread per tensor
    for build in builds(report, variant):
        facts = build[arch]
        # an update that clips also loads the fp32 norm partials 128 bits at a time: not counted
        # as a tensor's, or they would hide a tensor loaded 32 bits at a time
        clips = not variant.startswith("norm-") and build["constexprs"]["NORM"] != "0"
        partials = PARTIALS_PER_THREAD * 4 // 16 if clips else 0
        assert facts["v4_loads"] >= reads * per_tensor + partials, build
        assert facts["v4_stores"] >= writes * per_tensor, build


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", NAN_MAX)
def test_rule_max_keeps_nan(report, variant, arch):
    """The rule's max as torch.maximum, which returns NaN if either is NaN: PTX max.NaN.f32, one per
    element a thread holds, in the full-block and in the tail-block copy of the update. Plain
    max.f32 returns the other operand: a NaN v left AMSGrad's max_exp_avg_sq finite and the NaN
    out of the update (Adamax: exp_inf). The inf-norm's partials reduction (NORM 1) adds its own
    NaN-keeping max."""
    for build in builds(report, variant):
        constexprs = build["constexprs"]
        assert constexprs["RULE"] == "adamax_rule" or (constexprs["RULE"] == "adam_rule"
                                                       and constexprs["F0"] == "True")  # AMSGrad
        norm_share = PARTIALS_PER_THREAD if constexprs["NORM"] == "1" else 0
        assert build[arch]["nan_max"] >= 2 * ELEMENTS_PER_THREAD + norm_share, build
