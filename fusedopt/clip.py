"""Gradient clipping for the torch path: value clamp, total norm and the clip coefficient.

Same math as torch.nn.utils.clip_grad_value_ / clip_grad_norm_, kept on the device: no ``.item()``
and no host branch on the norm (torch's own rule: see torch/nn/utils/clip_grad.py). The Triton
twin of the norm pass is kernels/norm.py (kernel issue).

One deliberate difference: fp16 gradients' norms are accumulated and returned in fp32 on every
device. clip_grad_norm_ takes each tensor's norm in fp16, so a tensor whose L2 norm passes 65504
gives inf, the total is inf and the clip coefficient 0 zeroes the whole update; here (as in the
Triton kernels) the norm comes out finite and the step is clipped to it.
"""
import math
from typing import NamedTuple

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


# The clip settings, kept in the param groups as torch keeps its hyperparameters (so they are in
# state_dict(), a resumed run takes the saved ones, and a scheduler can change them between steps),
# each only while it differs from its default here: a non-clipping optimizer's groups and
# state_dict stay torch.optim's, key for key (torch.distributed.checkpoint refuses to load a
# checkpoint that lacks a key the loading optimizer's groups have).
CLIP_DEFAULTS = dict(max_grad_norm=None, norm_type=2.0, max_grad_value=None)


class ClipSettings(NamedTuple):
    """One step's clip, the same for every param group: one norm is taken over all of them."""
    max_norm: float | None
    norm_type: float
    max_value: float | None


def check_setting(key: str, value):
    """A clip setting as stored (norm_type 'inf' becomes float('inf')), or the error naming it."""
    return check_norm_type(value) if key == "norm_type" else check_positive(key, value)


def settings_of(name: str, groups: list[dict]) -> ClipSettings:
    """The clip settings of ``groups`` (a key a group lacks has its default), checked: every group
    must ask for the same, since one global norm clips them all; a value a scheduler wrote is
    checked as the constructor checks it."""
    first = None
    for gi, group in enumerate(groups):
        asked = tuple(group.get(k, d) for k, d in CLIP_DEFAULTS.items())
        if first is None:
            first = asked
        elif asked != first:
            key = next(k for k, a, b in zip(CLIP_DEFAULTS, first, asked) if a != b)
            raise ValueError(
                f"fusedopt.{name}: param group {gi} has {key}={group.get(key, CLIP_DEFAULTS[key])!r} "
                f"where group 0 has {groups[0].get(key, CLIP_DEFAULTS[key])!r}; the clip is global "
                "(one norm over every group), so every group must have the same value: set "
                f"opt.{key} = value to change it in all groups")
    if first is None:
        return ClipSettings(None, 2.0, None)
    return ClipSettings(*(check_setting(k, v) for k, v in zip(CLIP_DEFAULTS, first)))


def clamp_grads_(grads: list[torch.Tensor], max_value: float) -> None:
    """clip_grad_value_: clamp every gradient to [-max_value, max_value], in place."""
    for _, idx in group_by_device_dtype(grads).items():
        gs = pick(grads, idx)
        torch._foreach_clamp_min_(gs, -max_value)
        torch._foreach_clamp_max_(gs, max_value)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in fp32, or in fp64 for fp64 grads (bf16/fp16 partial sums would lose bits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Large fp32 CPU grads take their own norm path. torch's CPU _foreach_norm / vector_norm add up
# fp32 squares in a few running sums: on GPT-2's 38.6M-element wte (randn) the L2 norm came out
# 2.7e-3 too low (14 ms), and the inf norm of all 148 GPT-2 tensors took 207 ms. Rows of 8192
# elements through one batched dot (bmm), summed in fp64, gave 1.5e-8 in 10.9 ms; aminmax gives the
# inf norm in 35 ms for the whole model (2 AMD EPYC cores, torch 2.13).
_ROW = 8192
_LARGE = 1 << 16  # below this, one foreach launch for many tensors wins and its error is < 1e-6


def _large_cpu_norm(g: torch.Tensor, norm_type: float) -> torch.Tensor:
    flat = g.reshape(-1)
    if norm_type == math.inf:
        lo, hi = torch.aminmax(flat)
        return torch.maximum(lo.abs(), hi.abs())  # NaN propagates, as torch's norm
    k = flat.numel() // _ROW
    rows = flat[: k * _ROW].view(k, 1, _ROW)
    tail = flat[k * _ROW:]
    squares = torch.bmm(rows, rows.transpose(1, 2)).double().sum() + torch.dot(tail, tail).double()
    return squares.sqrt().float()


def group_norms(grads: list[torch.Tensor], norm_type: float,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """Each tensor's norm, in order, for non-empty tensors of one (device, dtype): accumulated in
    fp32 (fp64 for fp64), as clip_grad_norm_ rounds it (bf16 norms in bf16 on CPU), large fp32
    CPU tensors through _large_cpu_norm. Also the per-tensor norms LAMB's trust ratios and
    Adafactor's RMS take (a trust ratio carries a norm's error whole)."""
    out = [None] * len(grads)
    if grads[0].device.type == "cpu" and dtype == torch.float32:
        small = []
        for i, g in enumerate(grads):
            if g.numel() >= _LARGE:
                out[i] = _large_cpu_norm(g, norm_type)
            else:
                small.append(i)
    else:
        small = list(range(len(grads)))
    grads = [grads[i] for i in small]
    norms = []
    if grads:
        if grads[0].device.type == "cpu" and (dtype == torch.bfloat16 or (
                dtype == torch.float16 and norm_type == math.inf)):
            # torch's CPU foreach_norm without dtype still accumulates in fp32 and rounds the result
            # to the grads' dtype, as clip_grad_norm_ does; with dtype=float32 it is slower. On
            # GPT-2's 148 grads (2 cores, torch 2.13), L2: bf16 10 vs 57-79 ms, fp16 36 vs 53-55 ms;
            # inf: 162-168 vs 210-218 ms. bf16 has fp32's range and an fp16 max-abs is an fp16
            # value, so those keep the fast call. An fp16 L2 norm takes the 1.5x: in fp16 any
            # tensor's norm past 65504 is inf (see the module docstring).
            norms.extend(n.float() for n in torch._foreach_norm(grads, norm_type))
        else:
            norms.extend(torch._foreach_norm(grads, norm_type, dtype=accumulation_dtype(dtype)))
    for i, n in zip(small, norms):
        out[i] = n
    return out


def _tensor_norms(grads: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Each non-empty grad's norm, one foreach launch per (device, dtype) (group_norms); empty
    tensors add nothing (torch's inf-norm of an empty tensor raises)."""
    grads = [g for g in grads if g.numel() > 0]
    norms = []
    for (_, dtype), idx in group_by_device_dtype(grads).items():
        norms.extend(group_norms(pick(grads, idx), norm_type, dtype))
    return norms


def total_norm(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The norm of all ``grads`` seen as one vector, a 0-dim tensor on ``device``.

    As clip_grad_norm_: per-tensor norms, one foreach launch per (device, dtype) (large fp32 CPU
    tensors: see _large_cpu_norm), then the norm of the stacked norms. Empty tensors add nothing
    (torch's inf-norm of an empty tensor raises).
    """
    norms = _tensor_norms(grads, norm_type)
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    out_dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    stacked = torch.stack([n.to(device=device, dtype=out_dtype, non_blocking=True) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


def norm_share(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """This rank's share of a norm taken over several ranks (fusedopt/_distributed.py): the sum
    of squares (L2) or max |g| (inf) of ``grads``, a 0-dim fp64 tensor on ``device``; the
    all-reduce adds (or maxes) the shares, the root of the sum is the norm."""
    norms = _tensor_norms(grads, norm_type)
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.stack([n.to(device=device, dtype=torch.float64, non_blocking=True)
                           for n in norms])
    return stacked.max() if norm_type == math.inf else stacked.square().sum()


def root_of_share(share: torch.Tensor, norm_type: float, dtype: torch.dtype) -> torch.Tensor:
    """The norm from the all-reduced share (norm_share), in ``dtype``."""
    return (share if norm_type == math.inf else share.sqrt()).to(dtype)


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
