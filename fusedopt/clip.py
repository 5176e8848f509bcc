"""Gradient clipping for the torch path: value clamp, total norm and the clip coefficient.

Same math as torch.nn.utils.clip_grad_value_ / clip_grad_norm_, kept on the device: no ``.item()``
and no host branch on the norm (torch's own rule: see torch/nn/utils/clip_grad.py). The Triton
twin of the norm pass is kernels/norm.py (kernel issue).
"""
import math

import torch

from fusedopt._grouping import group_by_device_dtype, pick

EPS = 1e-6  # clip_grad_norm_'s guard: coef = max_norm / (total_norm + 1e-6)


def check_norm_type(norm_type) -> float:
    """2.0 or inf (torch also accepts the string 'inf'); anything else is refused."""
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        value = None
    if value not in (2.0, math.inf):
        raise ValueError(
            f"norm_type={norm_type!r} is not supported: fusedopt clips by the L2 norm (2.0) "
            "or the max-abs norm (float('inf'))"
        )
    return value


def check_positive(name: str, value) -> float | None:
    """None, or a number > 0 (inf allowed: it computes the norm and never clips)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0 (or None to disable), got {value}")
    return float(value)


def clamp_grads_(grads: list[torch.Tensor], max_value: float) -> None:
    """clip_grad_value_: clamp every gradient to [-max_value, max_value], in place."""
    for _, idx in group_by_device_dtype(grads).items():
        gs = pick(grads, idx)
        torch._foreach_clamp_min_(gs, -max_value)
        torch._foreach_clamp_max_(gs, max_value)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in fp32, or in fp64 for fp64 grads (bf16/fp16 partial sums would lose bits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def total_norm(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The norm of all ``grads`` seen as one vector, a 0-dim tensor on ``device``.

    As clip_grad_norm_: per-tensor norms with one foreach launch per (device, dtype), then the norm
    of the stacked norms. Empty tensors add nothing (torch's inf-norm of an empty tensor raises).
    """
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = []
    for (_, dtype), idx in group_by_device_dtype(grads).items():
        norms.extend(torch._foreach_norm(pick(grads, idx), norm_type, dtype=accumulation_dtype(dtype)))
    out_dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    stacked = torch.stack([n.to(device=device, dtype=out_dtype, non_blocking=True) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


class ClipScale:
    """The clip of one step, handed to each (device, dtype) group of the update.

    torch's fused optimizer ops divide every gradient by a ``grad_scale`` tensor in the pass that
    updates the parameter: passing ``(norm + 1e-6) / max_norm`` (at least 1) there folds the clip
    into the update and saves the read + write of every gradient that clip_grad_norm_'s
    ``_foreach_mul_`` costs. Those ops take only an fp32 ``grad_scale``, so fp64 groups are
    multiplied by the fp64 coefficient instead, exactly as clip_grad_norm_ does.
    """

    def __init__(self, norm: torch.Tensor, max_norm: float):
        self.norm = norm
        self.coef = torch.clamp(max_norm / (norm + EPS), max=1.0)
        self.scale = torch.clamp((norm + EPS) / max_norm, min=1.0).to(torch.float32)
        self._per_device: dict[tuple, torch.Tensor] = {}

    def _on(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._per_device:
            self._per_device[key] = tensor.to(device, non_blocking=True)
        return self._per_device[key]

    def grad_scale_for(self, grads: list[torch.Tensor], device: torch.device, dtype: torch.dtype):
        """The fp32 ``grad_scale`` for a fused op over ``grads``, or None after clipping them in place."""
        if dtype == torch.float64:
            torch._foreach_mul_(grads, self._on("coef", self.coef, device))
            return None
        return self._on("scale", self.scale, device)
