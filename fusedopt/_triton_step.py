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
from fusedopt._multi_tensor import (DeviceInts, LaunchTable, norm_grid, tensors_fit_kernel,
                                     update_grid)


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


class GroupPlan:
    """What one param group's launches keep between steps: which params the kernels take, grouped
    by dtype, with their static table rows (param and state addresses, numel, flags).

    Rebuilt when ``key`` changes: the params with a grad (identity and storage address), the
    optimizer's state (its dict, its size, ``_state_version``: load_state_dict and new state bump
    it) and the row flags (momentum on/off, amsgrad). In between, a step reads only each grad's
    address and layout. A state tensor replaced by hand, in place of load_state_dict, is not
    seen: the kernels would go on updating the old one.
    """

    def __init__(self, opt, group, params, key):
        from fusedopt.kernels._common import KERNEL_DTYPES
        self.key = key
        self.fallback = []
        self.by_dtype = {}  # dtype -> (params, update rows, norm rows, numels)
        for p in params:
            if tensors_fit_kernel([p, p.grad], KERNEL_DTYPES):
                tensors, scalars, ints = opt._kernel_row(group, p)  # may create p's state
                if tensors_fit_kernel(tensors, KERNEL_DTYPES):
                    ps, rows, norm_rows, numels = self.by_dtype.setdefault(p.dtype, ([], [], [], []))
                    ps.append(p)
                    numels.append(p.numel())
                    rows.append([t.data_ptr() for t in tensors + scalars] + [p.numel()] + ints)
                    norm_rows.append([p.numel()] + [t.data_ptr() for t in scalars])
                    continue
            self.fallback.append(p)

    def grad_ptrs(self) -> dict | None:
        """dtype -> this step's grad addresses; None when a grad no longer fits the kernels (not
        contiguous or not 16-byte aligned; torch already makes a grad's dtype its param's)."""
        out = {}
        for dtype, (ps, *_) in self.by_dtype.items():
            grads = [p.grad for p in ps]
            ptrs = [g.data_ptr() for g in grads]
            if any(x & 15 for x in ptrs) or not all(map(torch.Tensor.is_contiguous, grads)):
                return None
            out[dtype] = ptrs
        return out


def plan_key(opt, group, params):
    return (tuple(map(id, params)), tuple(p.data_ptr() for p in params), id(opt.state),
            len(opt.state), opt.__dict__.get("_state_version", 0), opt._row_flags(group))


def step_triton(opt, gathered) -> None:
    from fusedopt.kernels._common import BLOCK_SIZE, NUM_PARTIALS
    from fusedopt.kernels.norm import norm_pass_

    tables = opt.__dict__.setdefault("_launch_tables", {})
    plans = opt.__dict__.setdefault("_group_plans", {})
    # 1. which tensors the kernels take (cached per param group), and this step's grad addresses
    group_plans, grad_ptrs = [], []
    for gi, (group, params) in enumerate(zip(opt.param_groups, gathered)):
        key = plan_key(opt, group, params)
        plan = plans.get(gi)
        ptrs = None if plan is None or plan.key != key else plan.grad_ptrs()
        if ptrs is None:
            plan = plans[gi] = GroupPlan(opt, group, params, key)
            ptrs = plan.grad_ptrs()
        group_plans.append(plan)
        grad_ptrs.append(ptrs)
    fallback = [plan.fallback for plan in group_plans]
    fallback_params = [p for ps in fallback for p in ps]
    dtypes = list(dict.fromkeys(dt for plan in group_plans for dt in plan.by_dtype))
    if not dtypes:
        return opt._step_torch(gathered)
    device = next(entry[0][0].device for plan in group_plans for entry in plan.by_dtype.values())
    clipping = opt.max_grad_norm is not None
    clip = KernelClip(device, len(dtypes) + (1 if fallback_params else 0), opt.norm_type,
                      opt.max_grad_norm, opt.max_grad_value, NUM_PARTIALS)

    # 2. per dtype: the grad addresses of all param groups in one device array (one copy per
    #    step), the norm pass over them (it also advances Adam's step counters), then one update
    #    launch per param group reading its slice of the same array
    updates = []
    for slot, dtype in enumerate(dtypes):
        parts = [(gi, plan.by_dtype[dtype]) for gi, plan in enumerate(group_plans)
                 if dtype in plan.by_dtype]
        grads = _cached(tables, ("grads", dtype), DeviceInts, device)
        grads.refresh(grad_ptrs[parts[0][0]][dtype] if len(parts) == 1
                      else [x for gi, _ in parts for x in grad_ptrs[gi][dtype]])
        offset = 0
        for gi, (ps, rows, _, numels) in parts:
            table = _cached(tables, ("update", gi, dtype), LaunchTable, device, dtype, BLOCK_SIZE)
            table.refresh(rows, numels, grads.tensor[offset:offset + len(ps)])
            updates.append((opt.param_groups[gi], table))
            offset += len(ps)
        if clipping or opt._HAS_STEP:
            table = _cached(tables, ("norm", dtype), LaunchTable, device, dtype, BLOCK_SIZE)
            if len(parts) == 1:
                table.refresh(parts[0][1][2], parts[0][1][3], grads.tensor)
            else:
                table.refresh([row for _, entry in parts for row in entry[2]],
                              [n for _, entry in parts for n in entry[3]], grads.tensor)
            norm_pass_(table, clip.partials[slot * NUM_PARTIALS:(slot + 1) * NUM_PARTIALS], dtype,
                       clip.norm, opt.max_grad_value, opt._HAS_STEP,
                       norm_grid(device, table.n_blocks, NUM_PARTIALS))
    if fallback_params and clipping:
        _fallback_partial_(clip, fallback_params, opt, len(dtypes) * NUM_PARTIALS, NUM_PARTIALS)

    # 3. the updates, once every norm pass (and the torch-path share) is in the partials
    for group, table in updates:
        opt._launch_update_(group, table, clip, update_grid(device, table.n_blocks))
    if clipping:
        opt.grad_norm = clip.norm_out[0]

    # 4. the torch path for the rest, clipped by the same total norm
    if fallback_params:
        if opt.max_grad_value is not None and not clipping:
            _clip.clamp_grads_([p.grad for p in fallback_params], opt.max_grad_value)
        scale = _clip.ClipScale(clip.norm_out[0], opt.max_grad_norm) if clipping else None
        opt._step_torch_groups(fallback, scale)


def _cached(tables, key, cls, *args):
    """The launch-table object cached under ``key``, made anew for another device."""
    obj = tables.get(key)
    if obj is None or obj.device != args[0]:
        obj = tables[key] = cls(*args)
    return obj


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
