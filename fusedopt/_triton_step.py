"""One optimizer step on the Triton backend: split the tensors between the kernels and the torch
path, run the norm pass per dtype group, then one update launch per (param group, dtype).

Launches per step: one norm pass per dtype group (when clipping, or for Adam's step counters) and
one update per (param group, dtype): 2 per dtype group for a single param group, whatever the
number of tensors. No host sync: the clip coefficient, the step counters and a Tensor lr stay on
the device. Tensors a kernel cannot take (fp64, non-contiguous, misaligned) take the torch path,
clipped by the same total norm.
"""
import math

import torch

from fusedopt import clip as _clip
from fusedopt._grouping import group_by_device_dtype, pick
from fusedopt._multi_tensor import LaunchTable, norm_grid, tensors_fit_kernel, update_grid


class KernelClip:
    """What every launch of one step needs to know about clipping."""

    def __init__(self, device, n_slots, norm_type, max_norm, max_value, num_partials):
        from fusedopt.kernels._common import NORM_INF, NORM_L2, NORM_NONE
        self.norm = NORM_NONE if max_norm is None else (NORM_INF if norm_type == math.inf else NORM_L2)
        self.max_norm = 0.0 if max_norm is None else max_norm
        self.value_clip = max_value is not None
        self.max_value = 0.0 if max_value is None else max_value
        size = num_partials * n_slots if self.norm else 1
        self.partials = torch.empty(size, dtype=torch.float32, device=device)
        self.norm_out = torch.empty(1, dtype=torch.float32, device=device)
        self.write_norm = True  # the first update launch stores the total norm


def step_triton(opt, gathered) -> None:
    from fusedopt.kernels._common import BLOCK_SIZE, KERNEL_DTYPES, NUM_PARTIALS
    from fusedopt.kernels.norm import norm_pass_

    tables = opt.__dict__.setdefault("_launch_tables", {})
    # 1. which tensors the kernels take, with their table rows (state is created here, once)
    kernel, fallback = [], []  # per param group: [(param, row)] and [param]
    for group, params in zip(opt.param_groups, gathered):
        mine, theirs = [], []
        for p in params:
            if tensors_fit_kernel([p, p.grad], KERNEL_DTYPES):
                tensors, scalars, ints = opt._kernel_row(group, p)
                if tensors_fit_kernel(tensors, KERNEL_DTYPES):
                    mine.append((p, [t.data_ptr() for t in tensors + scalars] + [p.numel()] + ints))
                    continue
            theirs.append(p)
        kernel.append(mine)
        fallback.append(theirs)
    kernel_params = [p for rows in kernel for p, _ in rows]
    fallback_params = [p for ps in fallback for p in ps]
    if not kernel_params:
        return opt._step_torch(gathered)
    device = kernel_params[0].device
    dtypes = [dtype for _, dtype in group_by_device_dtype(kernel_params)]
    clipping = opt.max_grad_norm is not None
    clip = KernelClip(device, len(dtypes) + (1 if fallback_params else 0), opt.norm_type,
                      opt.max_grad_norm, opt.max_grad_value, NUM_PARTIALS)

    # 2. the norm pass, one launch per dtype group over all param groups; it also advances
    #    Adam's step counters (row column n_tensor_columns is the step's address)
    if clipping or opt._HAS_STEP:
        step_col = opt._N_TENSOR_COLUMNS
        for slot, dtype in enumerate(dtypes):
            entries = [(p, row) for rows in kernel for p, row in rows if p.dtype == dtype]
            norm_rows = [[p.grad.data_ptr(), p.numel()] + ([row[step_col]] if opt._HAS_STEP else [])
                         for p, row in entries]
            table = _table(tables, ("norm", dtype), device, dtype, BLOCK_SIZE, norm_rows,
                           [p for p, _ in entries])
            norm_pass_(table, clip.partials[slot * NUM_PARTIALS:(slot + 1) * NUM_PARTIALS], dtype,
                       clip.norm, opt.max_grad_value, opt._HAS_STEP,
                       norm_grid(device, table.n_blocks, NUM_PARTIALS))
    if fallback_params and clipping:
        _fallback_partial_(clip, fallback_params, opt, len(dtypes) * NUM_PARTIALS, NUM_PARTIALS)

    # 3. one update launch per (param group, dtype)
    for gi, (group, rows) in enumerate(zip(opt.param_groups, kernel)):
        for dtype in dtypes:
            entries = [(p, row) for p, row in rows if p.dtype == dtype]
            if not entries:
                continue
            table = _table(tables, ("update", gi, dtype), device, dtype, BLOCK_SIZE,
                           [row for _, row in entries], [p for p, _ in entries])
            opt._launch_update_(group, table, clip, update_grid(device, table.n_blocks))
    if clipping:
        opt.grad_norm = clip.norm_out[0]

    # 4. the torch path for the rest, clipped by the same total norm
    if fallback_params:
        if opt.max_grad_value is not None and not clipping:
            _clip.clamp_grads_([p.grad for p in fallback_params], opt.max_grad_value)
        scale = _clip.ClipScale(clip.norm_out[0], opt.max_grad_norm) if clipping else None
        opt._step_torch_groups(fallback, scale)


def _table(tables, key, device, dtype, block_size, rows, params) -> LaunchTable:
    """The cached table for ``key``, refreshed with this step's rows (a copy only on change)."""
    table = tables.get(key)
    if table is None or table.device != device:
        table = tables[key] = LaunchTable(device, dtype, block_size)
    table.refresh(rows, [p.numel() for p in params])
    return table


def _fallback_partial_(clip, params, opt, offset, width) -> None:
    """The torch-path tensors' share of the norm, written as one more partials slot."""
    grads = [p.grad for p in params]
    if opt.max_grad_value is not None:
        _clip.clamp_grads_(grads, opt.max_grad_value)  # torch path: clamps .grad in place
    norm = _clip.total_norm(grads, opt.norm_type, clip.partials.device).float()
    share = norm * norm if opt.norm_type == 2.0 else norm
    slot = clip.partials[offset:offset + width]
    slot.zero_()
    slot[0] = share
