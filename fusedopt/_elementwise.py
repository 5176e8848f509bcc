"""What turns a rule of fusedopt/rules.py into an optimizer on both backends.

A class declares, as class attributes and three small methods:

- ``_RULE`` / ``_STEP_RULE``: the names of its rule and step rule in rules.py (``_STEP_RULE``
  None when no scalar depends on the step count);
- ``_STATE``: torch's state keys of the rule's columns s0, s1, s2 (None where unused),
  ``_HAS_STEP``: whether it keeps torch's ``state["step"]`` counter, and ``_SCALAR_STATE``: the
  key of a per-tensor fp32 scalar state the step rule carries (NAdam's ``mu_product``), if any;
- ``_hyper(group)``: h0..h7 as host floats (float64; ``1 - beta`` and ``ln(beta)`` formed here),
  ``_flags(group)``: F0..F2, ``_columns(group)``: which state columns this group uses (bits);
- ``_init_state(group, p, state)``: torch's state for a param's first step.

``ElementwiseStep`` then gives it the Triton rows and launch (kernels/update.py) and a torch path
(``rule_torch_``: the same rule, one tensor or 2**18-element piece at a time, in fp32 or fp64).
SGD and Adam keep torch's fused ops on their torch path (optim/adam.py, optim/sgd.py), CPU
Adagrad torch's fused Adagrad, and fp32/fp64 CPU steps of RMSprop, NAdam, RAdam and Adamax that
cannot skip torch.optim's own code (``_torch_step``), where those are faster.

Adding an elementwise optimizer: its rule (and step rule) in rules.py, its class with the
declaration above, its tests. Nothing here or in kernels/ changes.

Every such class also takes the memory-lean options (``_init_memory``), kept per param group:
``state_dtype`` (the state columns' dtype; default the param's, as torch), ``master_weights``
(bf16 params keep an int16 ``master_remainder`` that makes them an exact fp32 master, fp16 params
an fp32 ``master_param`` copy), ``stochastic_rounding`` (every bf16/fp16 store of a param or state
value rounds stochastically, from counter-based bits: fusedopt/rounding.py; a class without a step
counter keeps one then, since the bits need it) and ``rounding_seed``. A (group, dtype) that uses
any of them steps through the rule on the torch path (torch's fused ops cannot), and through the
same kernel with the STATE_DTYPE / MASTER / SR constexprs on Triton.
"""
import contextlib
import math
import struct

import torch

from fusedopt._distributed import local, wrap_like
from fusedopt.nonfinite import keep_where
from fusedopt.optimizer import ClippedStep, compute_dtype, kernel_lr, scalar_on
from fusedopt import rounding, rules

N_HYPER = 8

# the master column (kernels/update.py's MASTER constexpr)
MASTER_NONE, MASTER_REMAINDER, MASTER_COPY = 0, 1, 2
REMAINDER_KEY, MASTER_KEY = "master_remainder", "master_param"
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
MEMORY_OPTIONS = ("stochastic_rounding", "master_weights", "state_dtype", "rounding_seed")
# a group without a key has its default (rounding_seed: the optimizer's, stored in the group at
# its first rounding step); only options a user set are put in the groups, so that a default
# optimizer's state_dict is torch.optim's, key for key (torch.distributed.checkpoint refuses to
# load a checkpoint that lacks a key the loading optimizer's groups have)
MEMORY_DEFAULTS = dict(stochastic_rounding=False, master_weights=False, state_dtype=None)


def draw_seed() -> int:
    """A rounding seed from torch's default generator (so torch.manual_seed fixes it)."""
    return int(torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int64))


def check_memory_options(name: str, group: dict) -> None:
    """The memory-lean options a param group sets, refused with the problem named."""
    for key in ("stochastic_rounding", "master_weights"):
        if key in group and not isinstance(group[key], bool):
            raise TypeError(f"fusedopt.{name}: {key} must be True or False, got {group[key]!r}")
    dtype = group.get("state_dtype")
    if dtype is not None and dtype not in STATE_DTYPES:
        raise TypeError(
            f"fusedopt.{name}: state_dtype must be None (the param's dtype, as torch.optim), "
            f"torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    if "rounding_seed" in group:
        seed = group["rounding_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise TypeError(
                f"fusedopt.{name}: rounding_seed must be an int in [0, 2**63), got {seed!r}")


def fp32_value(x: float) -> float:
    """``x`` rounded to fp32, as a kernel's float argument holds it (no tensor, no host read)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def ln(beta: float) -> float:
    """ln(beta) in float64 for rules.one_minus_pow; beta = 0 (torch allows it) gives -inf, so
    beta ** t = 0."""
    return math.log(beta) if beta > 0 else -math.inf


def _pad(values, n, fill):
    values = tuple(values)
    if len(values) > n:
        raise AssertionError(f"{len(values)} values where the rules take {n}")
    return values + (fill,) * (n - len(values))


class ElementwiseStep(ClippedStep):
    """The Triton rows and launch, and the torch path, of a rule-declared optimizer (module
    docstring)."""

    _RULE: str
    _STEP_RULE: str | None = None
    _STATE: tuple = (None, None, None)
    _HAS_STEP = True
    _SCALAR_STATE: str | None = None  # torch's key of a per-tensor fp32 scalar state (NAdam)

    # -- the memory-lean options (module docstring) -------------------------------------------------

    def _init_memory(self, stochastic_rounding, master_weights, state_dtype, rounding_seed) -> None:
        """Called before torch's constructor: the options a user set become defaults of every
        param group (add_param_group), so that they travel in state_dict() and can differ per
        group. The seed is drawn here when not given, and kept in every group that rounds."""
        asked = dict(stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                     state_dtype=state_dtype)
        if rounding_seed is not None:
            asked["rounding_seed"] = rounding_seed
        check_memory_options(type(self).__name__, asked)
        # drawn only for an optimizer that rounds (now, or at its first rounding step): one that
        # does not leaves torch's random stream (dropout's, a DataLoader's shuffle) as torch.optim
        # does, so that swapping it in changes no other random number
        self._rounding_seed = draw_seed() if rounding_seed is None and stochastic_rounding \
            else rounding_seed
        self._memory_defaults = {k: v for k, v in asked.items() if v != MEMORY_DEFAULTS.get(k)}
        if stochastic_rounding:
            self._memory_defaults["rounding_seed"] = self._rounding_seed

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self._memory_defaults.items():
            self.defaults.setdefault(key, value)  # after torch's own: torch fills groups from it
        if isinstance(param_group, dict):
            check_memory_options(type(self).__name__, param_group)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict) -> None:
        """torch's, then: groups saved without the memory options (a torch.optim checkpoint) take
        the constructor's (torch.distributed.checkpoint: load with
        ``DefaultLoadPlanner(allow_partial_load=True)``, as the checkpoint lacks their keys);
        state columns go back to the saved values' dtype where torch cast them
        to the param's (an fp32 exp_avg of a bf16 param would lose its low bits), and are then
        made the group's state_dtype at the next step (``_state_for``)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self._memory_defaults.items():
                # a None state_dtype is the default, as if not saved: torch.distributed.checkpoint's
                # load with allow_partial_load=True gives None for a torch.optim checkpoint's
                # missing group key (torch 2.13), where the constructor's value must win
                if group.get(key) is None:
                    group[key] = value
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                mine = self.state[p].get(key) if p in self.state else None
                if (isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor)
                        and key != "step" and value.dtype != mine.dtype):
                    self.state[p][key] = value.to(device=mine.device, dtype=value.dtype)

    def _own_state(self) -> dict:  # pickle, deepcopy: the options for groups added later too
        return dict(super()._own_state(), _memory_defaults=self._memory_defaults,
                    _rounding_seed=self._rounding_seed)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_memory_defaults" not in self.__dict__:  # torch's own pickle: groups hold all
            self._memory_defaults = {}
            self._rounding_seed = None  # drawn at the first rounding step

    def _memory(self, group, dtype):
        """(state dtype, master kind, stochastic rounding) of ``group``'s params of ``dtype``."""
        state_dtype = group.get("state_dtype") or dtype
        master = MASTER_NONE
        if group.get("master_weights", False):
            master = {torch.bfloat16: MASTER_REMAINDER, torch.float16: MASTER_COPY}.get(dtype, 0)
        return state_dtype, master, group.get("stochastic_rounding", False)

    def _lean(self, group, dtype) -> bool:
        """Whether these params need the memory-lean rule path (torch's fused ops cannot)."""
        state_dtype, master, sr = self._memory(group, dtype)
        return sr or master != MASTER_NONE or (state_dtype != dtype and self._columns(group) != 0)

    def _has_step(self, group) -> bool:
        """A step counter: the class's, or one kept for stochastic rounding's bits."""
        return self._HAS_STEP or group.get("stochastic_rounding", False)

    def _rounding_key(self, group, p) -> int:
        """fusedopt/rounding.tensor_key of p: its position among all params (state_dict ids).
        A group that rounds without a seed of its own (stochastic_rounding switched on in it
        later) gets the optimizer's, kept in the group from then on (so in its state_dict)."""
        positions = self.__dict__.get("_positions")
        if positions is None or id(p) not in positions:
            positions = self._positions = {
                id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        if "rounding_seed" not in group and self._rounding_seed is None:
            self._rounding_seed = draw_seed()
        seed = group.setdefault("rounding_seed", self._rounding_seed)
        return rounding.tensor_key(seed, positions[id(p)])

    def _first_step(self, group, p, state) -> int:
        """1 when p's first step makes a state column from the gradient (SGD's buffer = g); the
        class makes that column here, uninitialised."""
        return 0

    # -- declaration defaults ----------------------------------------------------------------------

    def _columns(self, group) -> int:
        """Bits of the state columns this group's rule reads and writes (default: all declared)."""
        return sum(1 << i for i, key in enumerate(self._STATE) if key is not None)

    def _flags(self, group) -> tuple:
        return (group["maximize"],)

    # -- state ---------------------------------------------------------------------------------------

    def _state_for(self, group, p):
        """p's state, made as torch makes it on a first step (``_init_state``); a step counter
        moved to p's device as fp32, where the kernels and the torch path read it (a torch.optim
        state_dict keeps it on the CPU); the state columns in the group's state dtype, and the
        master column made (from p: remainder 0) or dropped as ``master_weights`` says."""
        state = self.state[p]
        columns = self._columns(group)
        if not state or any(columns >> i & 1 and key not in state
                            for i, key in enumerate(self._STATE)):
            self._init_state(group, p, state)
        if self._has_step(group):
            step = state.get("step")
            if step is None:  # stochastic rounding in a class without a counter (SGD, Lion)
                state["step"] = new_step(p)
            elif step.device != p.device or step.dtype != torch.float32:
                state["step"] = step.to(device=p.device, dtype=torch.float32)
        state_dtype, master, _ = self._memory(group, p.dtype)
        for i, key in enumerate(self._STATE):
            value = state.get(key) if columns >> i & 1 else None
            if value is not None and value.dtype != state_dtype:
                state[key] = value.to(state_dtype)
        for kind, key, dtype in ((MASTER_REMAINDER, REMAINDER_KEY, torch.int16),
                                 (MASTER_COPY, MASTER_KEY, torch.float32)):
            value = state.get(key)
            if master == kind and (value is None or value.dtype != dtype
                                   or value.shape != p.shape):
                # none yet, or one torch.optim's load_state_dict cast to the param's dtype (an
                # int16 remainder turned into a bf16 number, an fp32 copy into fp16): a master that
                # went through torch.optim is stale anyway, as torch stepped the param without it
                state[key] = (torch.zeros_like(p, dtype=torch.int16) if kind == MASTER_REMAINDER
                              else p.detach().to(torch.float32, copy=True))
            elif master != kind and value is not None:
                del state[key]
        return state

    def master_param(self, p) -> torch.Tensor:
        """p's master value as a new tensor: with ``master_weights``, the fp32 value a bf16 param
        and its remainder make bit for bit (or an fp16 param's fp32 copy); else p itself in its
        compute dtype (fp32, or fp64). What a checkpoint for fp32 training elsewhere (torch.optim
        with fp32 params) takes as the weights: ``p32.copy_(opt.master_param(p))``. A tensor that
        is not one of this optimizer's params (``p.detach()``, say) is refused: it has no master
        here, and its own value would pass for one."""
        if not any(q is p for g in self.param_groups for q in g["params"]):
            raise ValueError(
                f"fusedopt.{type(self).__name__}.master_param: the tensor (shape "
                f"{tuple(p.shape)}, {p.dtype}) is not one of this optimizer's parameters; pass "
                "the parameter itself (not a detached or cloned view)")
        state = self.state.get(p, {})
        remainder, copy = state.get(REMAINDER_KEY), state.get(MASTER_KEY)
        if remainder is not None:
            return wrap_like(p, rounding.join_bf16(local(p).detach(), local(remainder)))
        if copy is not None:
            return copy.detach().clone()
        return p.detach().to(compute_dtype(p.dtype), copy=True)

    def _master_of(self, state):
        """p's master column (remainder or fp32 copy), or None."""
        return state.get(REMAINDER_KEY, state.get(MASTER_KEY))

    def _state_tensors(self, group, state, p):
        """[s0, s1, s2] of one param (None where unused)."""
        columns = self._columns(group)
        return [state[key] if columns >> i & 1 else None for i, key in enumerate(self._STATE)]

    # -- the Triton backend: rows and launch (fusedopt/_triton_step.py) --------------------------------

    def _row_flags(self, group):
        return (self._flags(group), self._columns(group),
                tuple(group.get(key) for key in MEMORY_OPTIONS))

    def _kernel_row(self, group, p):
        """(element tensors p, s0, s1, s2, master; scalar tensors [step[, scalar state]]; ints
        [first, rounding key]) of p's row (kernels/update.py): p's address stands in for unused
        columns (never read)."""
        first = self._first_step(group, p, self.state[p])
        state = self._state_for(group, p)
        master = self._master_of(state)
        columns = self._state_tensors(group, state, p)
        state_dtype, kind, _ = self._memory(group, p.dtype)
        # what the launch's STATE_DTYPE and MASTER constexprs will take the addresses for:
        # _state_for made it so; a mismatch here would be a wrong pointer, so it stops the step
        want = {MASTER_NONE: None, MASTER_REMAINDER: torch.int16, MASTER_COPY: torch.float32}[kind]
        if any(s is not None and s.dtype != state_dtype for s in columns) or \
                (master.dtype if master is not None else None) != want:
            raise RuntimeError(
                f"fusedopt.{type(self).__name__}: the state of a {p.dtype} param of shape "
                f"{tuple(p.shape)} is {[None if s is None else s.dtype for s in columns]} with "
                f"master {None if master is None else master.dtype}, not the group's "
                f"state_dtype {state_dtype} and master {want}: report this as a fusedopt bug")
        tensors = [p] + [p if s is None else s for s in columns] \
            + [p if master is None else master]
        scalars = [state["step"]] if self._has_step(group) else []
        if self._SCALAR_STATE is not None:
            scalars.append(state[self._SCALAR_STATE])
        key = self._rounding_key(group, p) if group.get("stochastic_rounding") else 0
        return tensors, scalars, [first, key]

    def _spec(self, group, dtype):
        return (self._RULE, self._STEP_RULE, self._columns(group),
                _pad(self._flags(group), 3, False), self._has_step(group),
                self._SCALAR_STATE is not None, *self._memory(group, dtype))

    def _launch_update_(self, group, table, clip, grid, num_warps):
        from fusedopt.kernels.update import update_
        update_(table, clip, self._spec(group, table.dtype),
                hyper_buffer(table, self._hyper(group)), kernel_lr(group["lr"], table.device),
                grid, num_warps)

    # -- the torch path ------------------------------------------------------------------------------

    # torch's own step for an fp32/fp64 CPU group that cannot skip (no GradScaler, nonfinite
    # "propagate"): ``_torch_step(group, params, grads, states)`` calling torch.optim's
    # functional code, or None. The rule one piece at a time was 0.6-0.73x torch's best recipe
    # on GPT-2 small's shapes (2-core EPYC, fp32): its operators make more passes than torch's
    # in-place ones. A step that may skip keeps the rule path, which skips on the device without
    # a host read; bf16/fp16 keep it too: it computes in fp32 as the kernels do, where torch's
    # for-loop computes in the param dtype (fp16 NAdam's went to NaN within two steps).
    _torch_step = None

    def _update_(self, group, params, grads, grad_scale, device, found_inf=None):
        if device.type == "cpu" and found_inf is None and self._torch_step is not None \
                and params and params[0].dtype in (torch.float32, torch.float64) \
                and not self._lean(group, params[0].dtype):
            states = [self._state_for(group, p) for p in params]
            if grad_scale is not None:  # the clip, written back as the fused ops write it
                torch._foreach_div_(grads, grad_scale)
            self._torch_step(group, list(map(local, params)), grads,
                             [{k: local(v) for k, v in st.items()} for st in states])
            return
        self._update_rule_(group, params, grads, grad_scale, device, found_inf)

    def _update_rule_(self, group, params, grads, grad_scale, device, found_inf=None):
        """The rule on the torch path (rule_torch_), every option included."""
        firsts = [self._first_step(group, p, self.state[p]) for p in params]
        states = [self._state_for(group, p) for p in params]
        sr = group.get("stochastic_rounding", False)
        rule_torch_(self, group, list(map(local, params)), grads,
                    [[None if s is None else local(s) for s in self._state_tensors(group, st, p)]
                     for st, p in zip(states, params)],
                    [st["step"] for st in states] if self._has_step(group) else None,
                    firsts, scalar_on(group["lr"], device), grad_scale, found_inf,
                    [st[self._SCALAR_STATE] for st in states] if self._SCALAR_STATE else None,
                    [None if m is None else local(m) for m in map(self._master_of, states)],
                    [self._rounding_key(group, p) for p in params] if sr else None)


def hyper_buffer(table, values) -> torch.Tensor:
    """The param group's h0..h7 as a float64 tensor on the table's device, copied there only
    when a value changed since the last step (a scheduler moving betas or weight decay). The
    copy goes into the same buffer, so a CUDA graph captured earlier reads the new values at its
    next replay; a change during capture is refused (_multi_tensor.CAPTURE_ERROR)."""
    key = _pad((float(v) for v in values), N_HYPER, 0.0)
    cached = getattr(table, "hyper", None)
    if cached is None or cached[0] != key:
        from fusedopt._multi_tensor import to_device
        fresh = to_device(torch.tensor(key, dtype=torch.float64), table.device)
        if cached is None:
            table.hyper = (key, fresh)
        else:
            cached[1].copy_(fresh)
            table.hyper = (key, cached[1])
    return table.hyper[1]


# Elements per piece of a large tensor on the torch path: the rule runs operator by operator,
# each making a temporary of the piece's size, so pieces of 2**16 fp32 elements (256 KB) keep
# them in cache. Whole tensors made temporaries of up to 150 MB (GPT-2's embedding), which
# glibc maps fresh every step: RMSprop took 2835 ms a step on GPT-2 small's shapes (2-core EPYC,
# 716k page faults on the embedding alone) where torch's foreach took 296.
CHUNK = 1 << 18


def _pieces(tensors):
    """(start, the tensors (None kept) cut into matching flat pieces of CHUNK elements from
    element ``start``) when all are contiguous; else (0, whole tensors), once."""
    live = [t for t in tensors if t is not None]
    n = live[0].numel()
    if n <= CHUNK or not all(t.is_contiguous() for t in live):
        yield 0, tensors
        return
    flat = [None if t is None else t.view(-1) for t in tensors]
    for start in range(0, n, CHUNK):
        yield start, [None if t is None else t[start:start + CHUNK] for t in flat]


class _PieceBits:
    """A piece's random bits (fusedopt/rounding.py), each of its two hashes made once, when a
    column first asks for it."""

    def __init__(self, stream, start, shape):
        self.stream, self.start, self.shape, self.hashes = stream, start, shape, [None, None]

    def column(self, col):
        second = col >= 2
        if self.hashes[second] is None:
            self.hashes[second] = rounding.hashes32(self.stream, second, self.start, self.shape)
        return rounding.column_bits(self.hashes[second], col)


def _store_(dst, value, found_inf, bits, column):
    """``dst`` (a param or state piece) set to fp32/fp64 ``value``: rounded stochastically with
    ``bits`` (_PieceBits) when given and ``dst`` is bf16/fp16, else as copy_ rounds (to nearest
    even, as the kernels' round_to); the old value kept where ``found_inf``."""
    if bits is not None and dst.dtype in LOW_PRECISION:
        value = rounding.stochastic_round(value, dst.dtype, bits.column(column))
    dst.copy_(keep_where(found_inf, dst, value))


def rule_torch_(opt, group, params, grads, columns, steps, firsts, lr, grad_scale=None,
                found_inf=None, scalar_states=None, masters=None, keys=None):
    """One step of ``opt``'s rule over tensors of one (device, dtype), one tensor (or CHUNK-sized
    piece of one) at a time, in fp32 (fp64 for fp64), any layout, with the fused ops' contract:
    each grad is divided by ``grad_scale`` and written back; ``found_inf`` (0-dim fp32, 0 or 1)
    keeps every old value, step counters included, on the device. ``columns[i]``: [s0, s1, s2]
    of param i (None where unused; any dtype), updated in place; ``steps``: fp32 0-dim counters
    (None without), advanced here; ``firsts[i]``: 1 when a column is made on this step (SGD's
    buffer: zero if the step is skipped); ``scalar_states``: the fp32 0-dim scalar states (None
    without), set to the step rule's c3. ``masters[i]``: param i's int16 remainder or fp32 copy
    (None without, or None); ``keys``: the rounding keys when rounding stochastically (None: to
    nearest). No host read: the step scalars and the random bits are formed on the device from the
    counter."""
    rule = getattr(rules, opt._RULE)
    step_rule = getattr(rules, opt._STEP_RULE) if opt._STEP_RULE else None
    hyper = _pad(map(float, opt._hyper(group)), N_HYPER, 0.0)
    flags = _pad(opt._flags(group), 3, False)
    lr64 = lr.double() if isinstance(lr, torch.Tensor) else float(lr)
    if params and compute_dtype(params[0].dtype) == torch.float32 and isinstance(lr64, float):
        # the step scalars from lr as the kernels take a float lr (an fp32 argument), so that
        # both paths round the same: a 1e-3 lr otherwise made 6 of 4017 AdamW results 1-3 fp32
        # ulps apart after 3 steps (torch.optim's lr / bias_correction1 differs from this in
        # its 8th significant digit at most)
        lr64 = fp32_value(lr64)
    for i, (param, grad) in enumerate(zip(params, grads)):
        acc = compute_dtype(param.dtype)
        c = (0.0,) * 4
        if steps is not None:
            step = steps[i]
            if step_rule is not None:
                x = scalar_states[i].double() if scalar_states is not None else 0.0
                c = step_rule((step + 1).double(), x, lr64, *hyper)
                if scalar_states is not None:
                    scalar_states[i].copy_(keep_where(found_inf, scalar_states[i], c[3]))
                c = tuple(x.to(acc) if isinstance(x, torch.Tensor) else x for x in c)
            step.add_(1.0 if found_inf is None else 1.0 - found_inf)
        stream = None if keys is None else rounding.stream(keys[i], steps[i])
        master = None if masters is None else masters[i]
        if firsts[i] and found_inf is not None:  # a skipped first step leaves the column zero
            for s in columns[i]:
                if s is not None:
                    s.zero_()
        for start, (p, g, m, *old) in _pieces([param, grad, master, *columns[i]]):
            bits = None if stream is None else _PieceBits(stream, start, p.shape)
            g_acc = g.to(acc)
            if grad_scale is not None:
                g_acc = g_acc / grad_scale
                g.copy_(g_acc)
            values = [0.0 if s is None else s.to(acc) for s in old]
            if m is None:
                p_acc = p.to(acc)
            elif m.dtype == torch.int16:
                p_acc = rounding.join_bf16(p, m).to(acc)
            else:
                p_acc = m.to(acc)
            new_p, *new = rule(p_acc, g_acc, *values, *c, firsts[i], lr, *hyper, *flags)
            for col, (s, v) in enumerate(zip(old, new), start=1):
                if s is not None:
                    _store_(s, v, found_inf, bits, col)
            if m is None:
                _store_(p, new_p, found_inf, bits, 0)
            elif m.dtype == torch.int16:
                hi, rem = rounding.split_bf16(new_p.float())
                m.copy_(keep_where(found_inf, m, rem))
                p.copy_(keep_where(found_inf, p, hi))
            else:
                m.copy_(keep_where(found_inf, m, new_p))
                p.copy_(keep_where(found_inf, p, new_p))


# Elements of one fused-op call below which it runs on one CPU thread. torch 2.13's fused CPU
# optimizer ops split any work over every thread (a parallel_for of grain 0): where the cores are
# busy with other processes, a step of a 2,177-parameter model took 48 ms with 2 threads and
# 0.10 ms with 1 (2-core EPYC, two `yes` processes running; torch's own fused AdamW the same),
# since each parallel region waits for a thread the scheduler has parked. On an idle machine one
# thread was as fast up to ~8k elements (1k: 2.2 vs 2.9 us; 16k: 7.3 vs 5.5 us). These ops are
# elementwise, so the thread count changes no result.
ONE_THREAD_BELOW = 8192


@contextlib.contextmanager
def small_cpu_op(tensors):
    """Run a fused CPU op over ``tensors`` (its params) on one thread when it is small (above);
    torch's thread count is restored after."""
    threads = torch.get_num_threads()
    if threads == 1 or not tensors or tensors[0].device.type != "cpu" or \
            sum(t.numel() for t in tensors) >= ONE_THREAD_BELOW:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fused_counted_(op, tensors, steps, found_inf, **kwargs):
    """``op(*tensors, steps, found_inf=found_inf, **kwargs)``: one of torch's fused optimizer ops
    (Adam, AdamW, Adagrad), which read their step counters already advanced. A skipped step
    takes them back, on the device (torch's fused Adam does the same under GradScaler)."""
    torch._foreach_add_(steps, 1)
    with small_cpu_op(tensors[0]):
        op(*tensors, steps, found_inf=found_inf, **kwargs)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def new_state_like(p, fill=0.0):
    """A state tensor for p as torch.optim makes it (p's layout; a DTensor like p when p is one)."""
    return torch.full_like(p, fill, memory_format=torch.preserve_format)


def new_step(p) -> torch.Tensor:
    """torch's step counter, fp32 on p's device (torch keeps it on the CPU unless fused or
    capturable; fusedopt keeps it where the kernels and the torch path read it, and a
    torch.optim state_dict loads either way)."""
    return torch.zeros((), dtype=torch.float32, device=p.device)

