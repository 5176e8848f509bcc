"""Machine code without a GPU: every kernel variant compiles for sm_80 and sm_90, spills nothing,
and moves each tensor with 128-bit global loads and stores on its full blocks.

tests/compile_kernels.py does the compiling, in a child process without TRITON_INTERPRET (the
interpreter replaces the JIT functions that triton.compile needs), with Triton's bundled ptxas
giving registers and spill bytes.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("compile_kernels.py")
# variant -> (tensors read, tensors written, bytes per element) on a full block
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
}
ARCHS = ("sm_80", "sm_90")
ELEMENTS_PER_THREAD = 8  # BLOCK_SIZE 1024 / (4 warps x 32 threads)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_variant_is_reported(report):
    assert set(report) == set(TRAFFIC)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(TRAFFIC))
def test_compiles_without_spills(report, variant, arch):
    facts = report[variant][arch]
    assert facts["cubin_bytes"] > 0
    assert facts["spill_bytes"] == 0, facts
    assert 0 < facts["registers"] <= 128, facts  # 128: room for 4 blocks of 128 threads per SM


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(TRAFFIC))
def test_full_blocks_use_128_bit_accesses(report, variant, arch):
    reads, writes, elt = TRAFFIC[variant]
    per_tensor = ELEMENTS_PER_THREAD * elt // 16  # 128-bit accesses per thread per tensor
    facts = report[variant][arch]
    assert facts["v4_loads"] >= reads * per_tensor, facts
    assert facts["v4_stores"] >= writes * per_tensor, facts
