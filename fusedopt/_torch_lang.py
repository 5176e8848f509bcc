"""The few ``triton.language`` functions that fusedopt/rules.py calls, on torch tensors.

rules.py is written once against the name ``tl``: in the kernels ``tl`` is triton.language
(fusedopt/kernels/_common.py jits a twin of each rule with that global), on the torch path and in
the float64 reference it is this module. Each function here does what its Triton namesake does on
the values the rules pass (tensors, or Python floats for hyperparameters).
"""
import enum

import torch

float32, float64 = torch.float32, torch.float64  # for x.to(tl.float32), a method of both


class PropagateNan(enum.Enum):
    """tl.PropagateNan: torch.maximum/minimum always propagate NaN, so ALL is what they do."""
    NONE = 0
    ALL = 1


def _tensor(x, like):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype, device=like.device)


def maximum(a, b, propagate_nan=PropagateNan.NONE):
    """NaN-propagating max (the rules ask tl.maximum for PropagateNan.ALL wherever NaN matters;
    torch.maximum propagates either way)."""
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.maximum(a, _tensor(b, a))


def minimum(a, b, propagate_nan=PropagateNan.NONE):
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.minimum(a, _tensor(b, a))


def where(condition, x, y):
    return torch.where(condition, x, y)


def sqrt(x):
    """The correctly rounded square root, as numpy's under the interpreter: for fp32 through fp64
    (exact after rounding back, as 53 >= 2 * 24 + 2 bits). torch 2.13's own CPU fp32 sqrt was 1
    ulp off for 196k of 1e6 uniform inputs (2-core EPYC), which made the torch path and the
    interpreter differ."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    return torch.sqrt(x)


def exp(x):
    return torch.exp(x)


def abs(x):  # noqa: A001 (tl.abs)
    return torch.abs(x)


# Not in triton.language: the kernels get kernels/_common.sign in its place (rules.py's docstring)
sign = torch.sign
