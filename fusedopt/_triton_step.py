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
from fusedopt import nonfinite as _nonfinite
from fusedopt._multi_tensor import (DeviceInts, LaunchTable, norm_grid, tensors_fit_kernel,
                                     update_grid)


class KernelClip:
    """What every launch of one step needs to know about clipping and its guard
    (fusedopt.nonfinite.StepGuard: AMP scale, GradScaler's found-inf flag, inf/NaN detection).

    ``partials``: ``n_slots`` blocks of ``num_partials`` norm partials, then as many inf/NaN
    partials when detecting. ``out``: [total norm, skip flag], stored by the first update launch.
    """

    def __init__(self, device, n_slots, norm_type, max_norm, max_value, num_partials, guard):
        from fusedopt.kernels._common import NORM_INF, NORM_L2, NORM_NONE
        self.norm = NORM_NONE if max_norm is None else (NORM_INF if norm_type == math.inf else NORM_L2)
        self.max_norm = 0.0 if max_norm is None else max_norm
        self.value_clip = max_value is not None
        self.max_value = 0.0 if max_value is None else max_value
        self.detect = guard.detect
        self.num_partials = num_partials  # per dtype group: the norm pass's largest grid
        self.n_partials = num_partials * n_slots
        size = self.n_partials * (2 if self.detect else 1) if self.norm or self.detect else 1
        self.partials = torch.empty(size, dtype=torch.float32, device=device)
        self.out = torch.empty(2, dtype=torch.float32, device=device)
        self.inv_scale = None if guard.scale is None else guard.inv_scale(device).reshape(1)
        self.found_in = None if guard.found_in is None else _as_kernel_scalar(guard.found_in, device)
        self.skips = guard.skips
        self.write_out = True  # the first update launch stores the total norm and the skip flag

    def flags(self, slot: int, width: int):
        """The inf/NaN partials of dtype group ``slot`` (a 1-slot dummy, never written, when not
        detecting)."""
        if not self.detect:
            return self.partials[:1]
        start = self.n_partials + slot * width
        return self.partials[start:start + width]


def _as_kernel_scalar(t: torch.Tensor, device) -> torch.Tensor:
    """A GradScaler tensor as the kernels read it: 1-element fp32 on the device (no copy if it is)."""
    return t.reshape(1).to(device=device, dtype=torch.float32, non_blocking=True)


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


def step_triton(opt, gathered, guard):
    """One step; returns the skip flag (0-dim fp32 on the device) when ``guard`` can skip."""
    from fusedopt.kernels._common import DEFAULT_LAUNCH
    from fusedopt.kernels.norm import norm_pass_

    cfg = opt.__dict__.get("_launch_config", DEFAULT_LAUNCH)  # bench/tune.py sets another

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
        return opt._step_torch(gathered, guard)
    device = next(entry[0][0].device for plan in group_plans for entry in plan.by_dtype.values())
    clipping = opt.max_grad_norm is not None
    clip = KernelClip(device, len(dtypes) + (1 if fallback_params else 0), opt.norm_type,
                      opt.max_grad_norm, opt.max_grad_value, cfg.num_partials, guard)

    # 2. per dtype: the grad addresses of all param groups in one device array (one copy per
    #    step), the norm pass over them (it also advances Adam's step counters and looks for
    #    inf/NaN), then one update launch per param group reading its slice of the same array
    updates = []
    for slot, dtype in enumerate(dtypes):
        parts = [(gi, plan.by_dtype[dtype]) for gi, plan in enumerate(group_plans)
                 if dtype in plan.by_dtype]
        grads = _cached(tables, ("grads", dtype), DeviceInts, device)
        grads.refresh(grad_ptrs[parts[0][0]][dtype] if len(parts) == 1
                      else [x for gi, _ in parts for x in grad_ptrs[gi][dtype]])
        offset = 0
        for gi, (ps, rows, _, numels) in parts:
            table = _cached(tables, ("update", gi, dtype), LaunchTable, device, dtype,
                            cfg.block_size)
            table.refresh(rows, numels, grads.tensor[offset:offset + len(ps)])
            updates.append((opt.param_groups[gi], table))
            offset += len(ps)
        if clipping or opt._HAS_STEP or clip.detect:
            table = _cached(tables, ("norm", dtype), LaunchTable, device, dtype, cfg.block_size)
            if len(parts) == 1:
                table.refresh(parts[0][1][2], parts[0][1][3], grads.tensor)
            else:
                table.refresh([row for _, entry in parts for row in entry[2]],
                              [n for _, entry in parts for n in entry[3]], grads.tensor)
            norm_pass_(table, clip, slot, dtype, opt.max_grad_value, opt._HAS_STEP,
                       norm_grid(device, table.n_blocks, cfg.num_partials), cfg.num_warps)
    if fallback_params:
        _fallback_prepare_(clip, fallback_params, opt, guard, len(dtypes), cfg.num_partials)

    # 3. the updates, once every norm pass (and the torch-path share) is in the partials
    for group, table in updates:
        opt._launch_update_(group, table, clip,
                            update_grid(device, table.n_blocks, cfg.programs_per_sm), cfg.num_warps)
    if clipping:
        opt.grad_norm = clip.out[0]
    skip = clip.out[1] if clip.skips else None

    # 4. the torch path for the rest, clipped by the same total norm, skipped by the same flag
    if fallback_params:
        scale = _clip.ClipScale(clip.out[0], opt.max_grad_norm) if clipping else None
        opt._step_torch_groups(fallback, scale, skip)
    return skip


def _cached(tables, key, cls, *args):
    """The launch-table object cached under ``key``, made anew for another device or block size."""
    obj = tables.get(key)
    if obj is None or obj.device != args[0] or (len(args) > 2 and obj.block_size != args[2]):
        obj = tables[key] = cls(*args)
    return obj


def _fallback_prepare_(clip, params, opt, guard, slot, width) -> None:
    """The torch-path tensors' grads, made ready in place as the torch path does (unscaled, inf/NaN
    checked, clamped), and their shares of the norm and of the inf/NaN check, written as one more
    partials slot (``slot``) beside the kernels' ones."""
    grads = [p.grad for p in params]
    device = clip.partials.device
    if guard.scale is not None or guard.detect:
        found = _nonfinite.unscale_and_check_(grads, _nonfinite.StepGuard(guard.scale, None, True),
                                              device)
        if clip.detect:
            flags = clip.flags(slot, width)
            flags.zero_()
            flags[0] = torch.where(found != 0, float("nan"), 0.0)
    if opt.max_grad_value is not None:
        _clip.clamp_grads_(grads, opt.max_grad_value)
    if clip.norm:
        norm = _clip.total_norm(grads, opt.norm_type, device).float()
        share = norm * norm if opt.norm_type == 2.0 else norm
        partials = clip.partials[slot * width:(slot + 1) * width]
        partials.zero_()
        partials[0] = share
