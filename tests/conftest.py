"""Shared test settings: the one tolerance table.

fusedopt's torch path runs torch's fused optimizer ops and folds the clip coefficient into their
``grad_scale`` (a division by an fp32 scalar where torch multiplies), so against torch's for-loop
optimizer + clip_grad_norm_ it differs by a few fp32 ulps per step; over 7 steps that stays under
rtol 1e-5. In fp64 the clip is the same multiply as torch's and only op order differs.
"""
import contextlib
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run on CPU tensors through Triton's interpreter. Set before
    # anything imports triton (fusedopt imports it only when the Triton backend first runs).
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-11, atol=1e-13),
}


def low_precision_bound(err_torch: float, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Low precision, flash-attn style: one step from identical state may leave the Triton result
    off the fp32 reference by twice what torch's own fused op in ``dtype`` is off, plus half an ulp
    of the largest value: the kernels round to nearest even as torch does (kernels/_common.round_to,
    bf16 included, where the interpreter's own cast truncates), at most half an ulp."""
    largest = float(expected.detach().abs().max()) if expected.numel() else 0.0
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest)) if largest > 0 else 0.0
    return 2 * err_torch + ulp / 2


def run_bench(script, *args, out_dir, timeout=300) -> str:
    """Run ``bench/<script> *args --out-dir out_dir`` as a user would; fail with the end of its
    stderr unless it exits 0; return its stdout."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_close(actual, expected, dtype=None, **kw):
    tol = dict(TOL[dtype or expected.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


class LaunchCounter:
    """Wraps a kernel: counts launches (``kernel[grid](...)``) and forwards them, each inside the
    context ``around()`` when given."""

    def __init__(self, kernel, counts, name, around=None):
        self.kernel, self.counts, self.name, self.around = kernel, counts, name, around

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with (self.around or contextlib.nullcontext)():
                return launch(*args, **kwargs)
        return run


def wrap_kernels(monkeypatch, counts, around=None):
    """Put a LaunchCounter around each of fusedopt's kernels."""
    import fusedopt.kernels.norm as norm
    import fusedopt.kernels.update as update
    for module, attr in ((norm, "_norm_kernel"), (update, "_update_kernel")):
        monkeypatch.setattr(module, attr, LaunchCounter(getattr(module, attr), counts, attr, around))


@pytest.fixture
def launches(monkeypatch):
    """Kernel name -> launches since the last ``clear()``."""
    counts = {}
    wrap_kernels(monkeypatch, counts)
    return counts
