"""One optimizer step on the Triton backend, and the plan that spares the next step the setup.

A step splits the tensors between the kernels and the torch path, runs the norm pass per dtype
group, then one update launch per (param group, dtype): 2 launches per dtype group for a single
param group, whatever the number of tensors. No host sync: the clip coefficient, the step
counters and a Tensor lr stay on the device. Tensors a kernel cannot take (fp64, non-contiguous,
misaligned, empty, tensor subclasses) take the torch path, clipped by the same total norm; their
gradients are copied first, so that ``.grad`` is never written on this backend.

The plan (StepPlan) holds the addresses of params and state tensors in its tables. A step reuses
it only after ``StepPlan.inputs`` has checked, before anything launches, that
- ``opt.state`` is the TrackedState the plan was built from, at the same version (any change of
  a state entry bumps it: fusedopt/_state.py), and each state dict the user owns holds the same
  tensors;
- every param group holds the same params (by identity), the same ones have a grad, with the
  same row flags (SGD momentum on/off, AMSGrad), and the backend and launch settings are the same;
- every param and state tensor of the tables is still at its address (``.data =``, ``set_`` or a
  device move changes it);
- every grad is a plain contiguous tensor and, whenever its address is new, of its param's
  numel, 16-byte aligned and not shared with another param.
Anything else takes the slow path: every check of a first step, and a new plan.
"""
import functools
import operator

import torch

from fusedopt import clip as _clip
from fusedopt import nonfinite as _nonfinite
from fusedopt._dispatch import interpreting
from fusedopt._distributed import NormReduce, is_dtensor, local
from fusedopt._multi_tensor import (DeviceInts, LaunchTable, device_guard, norm_grid,
                                     scalars_fit_kernel, unfit_reason, update_grid)
from fusedopt._report import StepReport
from fusedopt._state import TrackedState

_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_CONTIGUOUS = torch.Tensor.is_contiguous
_NUMEL = torch.Tensor.numel
_ONLY_TENSORS = {torch.Tensor}  # the grad types the fast check accepts (no None, no subclass)


class KernelClip:
    """What every launch of one step needs to know about clipping and its guard
    (fusedopt.nonfinite.StepGuard: AMP scale, GradScaler's found-inf flag, inf/NaN detection).

    ``partials``: ``n_slots`` blocks of ``num_partials`` norm partials, then as many inf/NaN
    partials when detecting. ``out``: [total norm, skip flag], stored by the first update launch.
    """

    def __init__(self, device, n_slots, norm_type, max_norm, max_value, num_partials, guard):
        from fusedopt.kernels._common import NORM_INF, NORM_L2, NORM_NONE
        self.norm = NORM_NONE if max_norm is None else (NORM_INF if norm_type == float("inf") else NORM_L2)
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


def _picker(indices: list[int], n: int):
    """A function taking the items at ``indices`` from a list of ``n`` (None: all, in order)."""
    if indices == list(range(n)):
        return None
    if len(indices) == 1:
        i = indices[0]
        return lambda items: (items[i],)
    return operator.itemgetter(*indices)


class _DtypeLaunches:
    """The launches of one dtype: one grad-address table shared by the norm pass and the updates
    (each param group's segment starts at an even index, so every slice is 16-byte aligned, as
    the kernels are compiled for), one update table per param group, one norm table."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.grads = DeviceInts(device)
        # (param group index, picker, count, update rows, norm rows, numels)
        self.segments = []
        self.pads = []  # zero entries after each segment in the grad table (see build)
        self.flat_ptrs = None  # last step's grad addresses, checked
        self.numels = []
        self.updates = []  # (param group index, LaunchTable)
        self.norm = None
        self.has_step = False  # some row's step counter advances in the norm pass
        self.scratch = None  # the step slot of rows without a counter in such a launch

    def add(self, gi, picker, rows, norm_rows, numels):
        self.segments.append((gi, picker, len(rows), rows, norm_rows, numels))
        self.numels.extend(numels)

    def build(self, cfg):
        # with several segments, an odd one is followed by one zero, so the next starts even
        several = len(self.segments) > 1
        self.pads = [count & 1 if several else 0 for _, _, count, *_ in self.segments]
        start = 0
        norm_rows, norm_numels = [], []
        for (gi, _, count, rows, norms, numels), pad in zip(self.segments, self.pads):
            table = LaunchTable(self.device, self.dtype, cfg.block_size, rows, numels)
            table.grid = update_grid(self.device, table.n_blocks, cfg.programs_per_sm)
            table.grads_slice = (start, start + count)
            self.updates.append((gi, table))
            start += count + pad
            # the norm pass reads the whole grad table: an empty row (no block) stands for a pad
            norm_rows.extend(norms + [[0] * len(norms[0])] * pad)
            norm_numels.extend(numels + [0] * pad)
        # param groups with and without a step counter in one launch (SGD with stochastic
        # rounding in one group only): the others advance a scratch slot nobody reads
        width = max(map(len, norm_rows))
        self.has_step = width > 1
        if any(len(row) < width for row in norm_rows):
            self.scratch = torch.zeros(1, dtype=torch.float32, device=self.device)
            norm_rows = [row + [self.scratch.data_ptr()] * (width - len(row)) for row in norm_rows]
        self.norm = LaunchTable(self.device, self.dtype, cfg.block_size, norm_rows, norm_numels)
        self.norm.grid = norm_grid(self.device, self.norm.n_blocks, cfg.num_partials)

    def grads_of(self, with_grad: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """This dtype's grads, in table order, from each param group's grads."""
        if len(self.segments) == 1 and self.segments[0][1] is None:
            return with_grad[self.segments[0][0]]  # one group, every grad: no copy
        out = []
        for gi, picker, *_ in self.segments:
            out.extend(with_grad[gi] if picker is None else picker(with_grad[gi]))
        return out

    def grads_fit(self, grads, ptrs) -> bool:
        """The checks a grad address that was not seen last step must pass (the rest of a grad's
        checks run every step in StepPlan.inputs)."""
        if list(map(_NUMEL, grads)) != self.numels or len(set(ptrs)) != len(ptrs):
            return False
        # 16-byte aligned and not 0 (a wrapper without storage), at C speed: 18 + 9 ns a tensor
        return functools.reduce(operator.or_, ptrs) & 15 == 0 and min(ptrs) > 0

    def refresh_grads(self, ptrs) -> None:
        """Copy this step's grad addresses to the device if they changed (one copy per dtype)."""
        table = ptrs
        if any(self.pads):
            table, at = [], 0
            for (_, _, count, *_), pad in zip(self.segments, self.pads):
                table.extend(ptrs[at:at + count])
                table.extend([0] * pad)
                at += count
        if self.grads.refresh(table):  # always on a new plan's first step
            for _, update in self.updates:
                update.grads = self.grads.tensor[update.grads_slice[0]:update.grads_slice[1]]
            self.norm.grads = self.grads.tensor


class _GroupEntry:
    """One param group in a plan: its params' identities, the indices of those without a grad,
    its row flags, and the indices (into its params with a grad) that take the torch path."""

    __slots__ = ("ids", "missing", "flags", "fallback", "fallback_params", "fallback_counted",
                 "placements")

    def __init__(self, group, opt):
        params = group["params"]
        self.ids = list(map(id, params))
        self.missing = [i for i, p in enumerate(params) if p.grad is None]
        self.flags = opt._row_flags(group)
        self.fallback, self.fallback_params, self.fallback_counted = [], [], []
        self.placements = None  # DTensor plans: each grad's placements (None: plain or none)


def _placements(t):
    return getattr(t, "placements", None)


class StepPlan:
    """What a Triton step keeps (module docstring): built by ``StepPlan(opt, gathered)`` on a slow
    step; ``inputs(opt)`` checks it and gathers this step's grads, ``run`` launches."""

    def __init__(self, opt, gathered, device):
        from fusedopt.kernels._common import DEFAULT_LAUNCH, KERNEL_DTYPES
        state = opt.state
        # state made below (first steps) bumps the version: such a plan serves one step only,
        # which is also what drops SGD's first-step flags from its rows.
        self.state = state if type(state) is TrackedState else None
        self.version = state.version if self.state is not None else None
        self.foreign = [(d, list(d.items())) for d in state.foreign.values()] \
            if self.state is not None else None
        self.backend = opt.backend
        self.norm_group = opt.norm_group
        # DTensor params (FSDP2, tensor parallel): rows hold their local shards' addresses, and
        # each step re-reads the shards (a DTensor's local tensor can be swapped under it)
        flat = [p for ps in gathered for p in ps]
        self.dtensor = any(map(is_dtensor, flat))
        self.reduce = NormReduce.build(type(opt).__name__, flat, opt.norm_group)
        counted = self.reduce.counted if self.reduce is not None else None
        at = 0  # flat index of the group's first param with a grad
        self.cfg_key = opt.__dict__.get("_launch_config")
        self.cfg = self.cfg_key or DEFAULT_LAUNCH
        self.device = device
        self.interpret = device.type == "cpu"
        self.entries = []
        self.static, self.static_ptrs = [], []
        self.snapshots = []  # the plan's own scratch (kernels/update.py's SNAP column)
        owners = []  # (param group, index among its params with a grad) of each static
        launches: dict[torch.dtype, _DtypeLaunches] = {}
        fallback_why: dict[str, int] = {}  # why tensors take the torch path: how many
        for gi, (group, params) in enumerate(zip(opt.param_groups, gathered)):
            entry = _GroupEntry(group, opt)
            if self.dtensor:
                entry.placements = [_placements(p.grad) for p in group["params"]]
            by_dtype: dict[torch.dtype, tuple] = {}
            for i, p in enumerate(params):
                row = None
                counts = counted is None or counted[at + i]
                why = unfit_reason([local(p), local(p.grad)], KERNEL_DTYPES, device)
                if why is None:
                    row = opt._kernel_row(group, p)  # may create p's state
                    tensors, scalars, _ = row
                    why = unfit_reason(list(map(local, tensors)), KERNEL_DTYPES + (torch.int16,),
                                       device, same_dtype=False)
                    if why is None and not scalars_fit_kernel(scalars, device):
                        why = "a step counter not a 1-element fp32 tensor on its device"
                    if why is not None:
                        row = None
                        why = f"state {why}"
                if row is None:
                    fallback_why[why] = fallback_why.get(why, 0) + 1
                    entry.fallback.append(i)
                    entry.fallback_params.append(p)
                    entry.fallback_counted.append(counts)
                    continue
                tensors, scalars, ints = row
                numel = local(p).numel()
                idx, rows, norm_rows, numels = by_dtype.setdefault(p.dtype, ([], [], [], []))
                idx.append(i)
                numels.append(numel)
                # kernels/update.py's columns: p, s0, s1, s2, master, step (0: none), numel,
                # first, rounding key, scalar state (0: none), its snapshot slot (set below)
                rows.append([local(t).data_ptr() for t in tensors]
                            + [scalars[0].data_ptr() if scalars else 0, numel] + ints
                            + [scalars[1].data_ptr() if len(scalars) > 1 else 0, 0])
                # a tensor another rank counts (replicated over a reduced mesh dim): its blocks
                # still run (Adam's counter advances) but read nothing, as if of 0 elements
                norm_rows.append([numel if counts else 0] + [t.data_ptr() for t in scalars]
                                 + ([0] if len(scalars) > 1 else []))
                for t in dict.fromkeys(tensors + scalars, None):  # p twice when it stands in
                    self.static.append(t)  # the DTensor itself, not its shard: re-read each step
                    owners.append((gi, i))
            at += len(params)
            for dtype, (idx, rows, norm_rows, numels) in by_dtype.items():
                if len(norm_rows[0]) > 3:  # a scalar state: one fp32 snapshot slot per row
                    snapshots = torch.empty(len(rows), dtype=torch.float32, device=device)
                    self.snapshots.append(snapshots)
                    for j, (row, norm_row) in enumerate(zip(rows, norm_rows)):
                        row[-1] = norm_row[-1] = snapshots.data_ptr() + 4 * j
                launch = launches.setdefault(dtype, _DtypeLaunches(device, dtype))
                launch.add(gi, _picker(idx, len(params)), rows, norm_rows, numels)
            self.entries.append(entry)
        self.static_ptrs = self._static_ptrs()
        _refuse_shared_memory(opt, self.static_ptrs, owners)
        with device_guard(device):
            for launch in launches.values():
                launch.build(self.cfg)
        self.launches = list(launches.values())
        self.has_fallback = any(e.fallback for e in self.entries)
        n_torch = sum(fallback_why.values())
        self.report = StepReport("triton", len(flat) - n_torch, n_torch, tuple(fallback_why.items()))

    def _static_ptrs(self) -> list[int]:
        if self.dtensor:
            return list(map(_DATA_PTR, map(local, self.static)))
        return list(map(_DATA_PTR, self.static))

    @property
    def reusable(self) -> bool:
        """Whether a later step may take this plan (only over a TrackedState)."""
        return self.state is not None

    def inputs(self, opt):
        """This step's grads per param group (those with a grad, in order), or None when
        anything the plan rests on changed (module docstring). Reads no device value."""
        state = opt.state
        if state is not self.state or state.version != self.version:
            return None
        for d, items in self.foreign:
            if len(d) != len(items) or any(d.get(k) is not v for k, v in items):
                return None
        if opt.backend is not self.backend or opt.__dict__.get("_launch_config") is not self.cfg_key \
                or opt.norm_group is not self.norm_group:
            return None
        if self.interpret and not interpreting():
            return None
        groups = opt.param_groups
        if len(groups) != len(self.entries):
            return None
        with_grad = []
        for group, entry in zip(groups, self.entries):
            params = group["params"]
            if list(map(id, params)) != entry.ids or opt._row_flags(group) != entry.flags:
                return None
            grads = list(map(_GRAD, params))
            if self.dtensor:
                # a grad whose placements change (Partial, another shard dim) has local memory
                # of the same size but other meaning: rebuild, and the slow path checks it
                if list(map(_placements, grads)) != entry.placements:
                    return None
                grads = list(map(local, grads))
            if set(map(type, grads)) - _ONLY_TENSORS:  # None, or a tensor subclass
                missing = [i for i, g in enumerate(grads) if g is None]
                if missing != entry.missing:
                    return None
                grads = [g for g in grads if g is not None]
                if set(map(type, grads)) - _ONLY_TENSORS:
                    return None
            elif entry.missing:
                return None
            with_grad.append(grads)
        if self._static_ptrs() != self.static_ptrs:
            return None
        per_dtype = []
        for launch in self.launches:
            grads = launch.grads_of(with_grad)
            try:
                ptrs = list(map(_DATA_PTR, grads))
                if not all(map(_CONTIGUOUS, grads)):
                    return None
            except RuntimeError:  # sparse: the slow path names it
                return None
            if ptrs != launch.flat_ptrs and not launch.grads_fit(grads, ptrs):
                return None
            per_dtype.append(ptrs)
        return with_grad, per_dtype

    def run(self, opt, inputs, guard):
        """Launch this step; returns the skip flag (0-dim fp32 on the device) when ``guard``
        can skip."""
        with_grad, per_dtype = inputs
        fallback = [[grads[i] for i in entry.fallback] for entry, grads in zip(self.entries, with_grad)] \
            if self.has_fallback else None
        with device_guard(self.device):
            return self._launch(opt, per_dtype, fallback, guard)

    def _launch(self, opt, per_dtype, fallback_grads, guard):
        from fusedopt.kernels.norm import norm_pass_
        device, cfg = self.device, self.cfg
        settings = opt._clip  # this step's (ClippedStep.step)
        clipping = settings.max_norm is not None
        clip = KernelClip(device, len(self.launches) + (1 if fallback_grads else 0),
                          settings.norm_type, settings.max_norm, settings.max_value,
                          cfg.num_partials, guard)
        # 1. per dtype: this step's grad addresses (one copy, when they changed), the norm pass
        #    (it also advances Adam's step counters and looks for inf/NaN)
        for slot, (launch, ptrs) in enumerate(zip(self.launches, per_dtype)):
            launch.refresh_grads(ptrs)
            launch.flat_ptrs = ptrs
            if clipping or launch.has_step or clip.detect:
                norm_pass_(launch.norm, clip, slot, launch.dtype, settings.max_value, launch.has_step,
                           opt._SCALAR_STATE is not None, launch.norm.grid, cfg.num_warps)
        if fallback_grads:
            # copies: the torch path unscales and clamps in place, and .grad stays as it was
            fallback_grads = [[g.clone() for g in gs] for gs in fallback_grads]
            counted = [c for e in self.entries for c in e.fallback_counted]
            _fallback_prepare_(clip, [g for gs in fallback_grads for g in gs], counted, opt, guard,
                               len(self.launches), cfg.num_partials)
        if self.reduce is not None and (clipping or clip.detect):
            _all_reduce_partials_(clip, self.reduce, settings.norm_type, device)
        # 2. the updates, once every norm pass (and the torch-path share) is in the partials
        for launch in self.launches:
            for gi, table in launch.updates:
                opt._launch_update_(opt.param_groups[gi], table, clip, table.grid, cfg.num_warps)
        if clipping:
            opt.grad_norm = clip.out[0]
        skip = clip.out[1] if clip.skips else None
        # 3. the torch path for the rest, clipped by the same total norm, skipped by the same flag
        if fallback_grads:
            scale = _clip.ClipScale(clip.out[0], settings.max_norm) if clipping else None
            opt._step_torch_groups([e.fallback_params for e in self.entries], scale, skip,
                                   fallback_grads)
        return skip


def _refuse_shared_memory(opt, ptrs, owners) -> None:
    """Two rows of one launch on the same memory (one state dict or state tensor stored for two
    params, two params on one storage start) would be updated by two programs at once: refused
    before anything launches. torch.optim's for-loop would update that memory twice in turn."""
    if len(set(ptrs)) == len(ptrs):
        return
    first = {}
    for ptr, (gi, i) in zip(ptrs, owners):
        if ptr in first and first[ptr] != (gi, i):  # another row's, not this one's
            (gj, j) = first[ptr]
            raise ValueError(
                f"fusedopt.{type(opt).__name__}: parameter {j} of group {gj} and parameter {i} of "
                f"group {gi} (counted among params with a grad) share memory: a parameter or a "
                "state tensor of one is the other's. One launch would update it from two programs "
                "at once; give each parameter its own state (e.g. clone the tensors)")
        first.setdefault(ptr, (gi, i))


def step_triton(opt, gathered, guard, device):
    """A step with a new plan (kept for later steps when it can be: StepPlan.reusable)."""
    plan = StepPlan(opt, gathered, device)
    if not plan.launches:
        opt.__dict__.pop("_step_plan", None)
        opt.last_step = StepReport("torch", 0, plan.report.torch_tensors, plan.report.why_torch)
        return opt._step_torch(gathered, guard)
    opt._step_plan = plan if plan.reusable else None
    opt.last_step = plan.report
    # the plan's own checks ran on these very tensors while it was built
    with_grad = [[local(p.grad) for p in ps] for ps in gathered]
    per_dtype = [list(map(_DATA_PTR, launch.grads_of(with_grad))) for launch in plan.launches]
    return plan.run(opt, (with_grad, per_dtype), guard)


def _fallback_prepare_(clip, grads, counted, opt, guard, slot, width) -> None:
    """The torch-path tensors' grads (copies), made ready in place as the torch path does
    (unscaled, inf/NaN checked, clamped), and their shares of the norm (of those this rank
    ``counted``: fusedopt/_distributed.py) and of the inf/NaN check, written as one more partials
    slot (``slot``) beside the kernels' ones."""
    device = clip.partials.device
    if guard.scale is not None or guard.detect:
        found = _nonfinite.unscale_and_check_(grads, _nonfinite.StepGuard(guard.scale, None, True),
                                              device)
        if clip.detect:
            flags = clip.flags(slot, width)
            flags.zero_()
            flags[0] = torch.where(found != 0, float("nan"), 0.0)
    settings = opt._clip
    if settings.max_value is not None:
        _clip.clamp_grads_(grads, settings.max_value)
    if clip.norm:  # the share as the kernels' partials hold it: sum of squares, or max |g|
        share = _clip.norm_share([g for g, c in zip(grads, counted) if c], settings.norm_type,
                                 device)
        partials = clip.partials[slot * width:(slot + 1) * width]
        partials.zero_()
        partials[0] = share


def _all_reduce_partials_(clip, reduce, norm_type, device) -> None:
    """Sharded training: this rank's partials summed (or maxed) into its share, one all-reduce
    with the inf/NaN flag (NormReduce.all_reduce), and the result written back as the only
    non-zero partial and flag, so that every update launch reads the global norm and skip flag
    as it reads a local one. Six small ops and the collective; no host read."""
    n = clip.n_partials
    inf = norm_type == float("inf")
    share = found = None
    if clip.norm:
        partials = clip.partials[:n]
        share = partials.max() if inf else partials.sum(dtype=torch.float64)
    if clip.detect:
        found = torch.isnan(clip.partials[n:].sum()).float()
    share, found = reduce.all_reduce(share, found, inf, device)
    if clip.norm:
        clip.partials[:n].zero_()
        clip.partials[0] = share
    if clip.detect:
        clip.partials[n:].zero_()
        clip.partials[n] = torch.where(found != 0, float("nan"), 0.0)
