"""Shared test settings: the one tolerance table.

fusedopt's torch path runs torch's fused optimizer ops and folds the clip coefficient into their
``grad_scale`` (a division by an fp32 scalar where torch multiplies), so against torch's for-loop
optimizer + clip_grad_norm_ it differs by a few fp32 ulps per step; over 7 steps that stays under
rtol 1e-5. In fp64 the clip is the same multiply as torch's and only op order differs.
"""
import torch

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-11, atol=1e-13),
}


def assert_close(actual, expected, dtype=None, **kw):
    tol = dict(TOL[dtype or expected.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)
