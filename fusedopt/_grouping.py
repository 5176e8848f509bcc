"""Group tensors by (device, dtype): the unit every torch fused op and every kernel launch takes.

Optimizer-agnostic plumbing for the torch path; the Triton launch tables build on the same groups.
"""
from collections import defaultdict

import torch


def group_by_device_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` per (device, dtype), in first-seen order (deterministic)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return dict(groups)


def pick(items: list, indices: list[int]) -> list:
    return [items[i] for i in indices]
