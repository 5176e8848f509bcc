"""Which launch settings make one clipped fusedopt step fastest on this GPU, per optimizer and
dtype, and how close does the best come to the copy bandwidth measured in the same run?

    python bench/tune.py                  # GPU: GPT-2-small, AdamW then SGD, fp32 and bf16, < 5 min
    python bench/tune.py --optimizers adamw --dtypes bfloat16 --budget-s 120
    TRITON_INTERPRET=1 python bench/tune.py --smoke --device cpu   # ~10 s on 2 CPU cores

The settings are kernels/_common.LaunchConfig's: norm-pass partials, block size, warps per program,
update programs per SM. A real fusedopt optimizer (backend="triton", max_grad_norm set) steps with
``opt._launch_config`` set. Coordinate sweeps from the default: one setting at a time, the others
at their defaults; then each setting's winner together ("combined"); then the default, the
combined and each setting's winner again, interleaved over --rounds rounds ("confirm"), whose
fastest is the best. The update grid is tried at fixed programs per SM, at the number that fits on
an SM by the compiled kernel's registers and warps ("occupancy") and at twice that.

Times: bench/measure.py (CUDA events, L2 flushed between steps); bytes: bench/run.py. Stops when
the next config would pass --budget-s (counted from start) and keeps what it has: the files are
rewritten after every config, so a kill loses at most one. Writes
tune-<device>-<date>[-<tag>][-N].{md,json} to --out-dir (bench/report.py's result_paths: no tag
for the default run, else 'smoke' or the options that differ from the defaults, -2, -3, ...
rather than over another run's files; default: bench/results/ beside this script); the Markdown
is also printed, progress goes to stderr. On CPU the numbers only show that the script runs:
never commit them.
"""
import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import signal
import statistics
import sys
import time

import torch

import fusedopt
import measure  # bench/ is on sys.path when run as `python bench/tune.py`
import report
import run

# the optimizers with a Triton kernel to tune (LAMB, Adafactor and Muon have none: _NO_KERNELS)
KERNEL_OPTIMIZERS = {k: v for k, v in run.OPTIMIZERS.items() if v[1]._NO_KERNELS is None}
import shapes

# --budget-s counts from here: the imports (torch: a few seconds) fall in gpu_check.sh's margin
_START = time.monotonic()

IMPL = "fusedopt (triton)"  # run.bytes_per_element's name for what is timed here
SETTINGS = ("programs_per_sm", "block_size", "num_warps", "num_partials")  # LaunchConfig's fields
# setting -> values tried; the default is always added. "occupancy": the update programs that fit
# on one SM at the compiled kernel's registers and warps (programs_per_sm_fit), per config.
SWEEP = {
    "programs_per_sm": (4, 8, 16, 32, "occupancy", "2x occupancy"),
    "block_size": (512, 1024, 2048, 4096),
    "num_warps": (2, 4, 8),
    "num_partials": (256, 512, 1024, 2048),  # a power of two (tl.arange in kernels/_common.py)
}
# The interpreter runs 16 programs whatever the grid (fusedopt/_multi_tensor.py): the grid values
# only prove the plumbing there.
SMOKE_SWEEP = {"programs_per_sm": (16, 8, "occupancy"), "block_size": (1024, 512),
               "num_warps": (4, 2), "num_partials": (1024, 256)}
OCCUPANCY_RULES = {"occupancy": 1, "2x occupancy": 2}
# Resident programs per SM at most, by compute capability, where not 32 (CUDA programming guide,
# compute capabilities table); torch does not report it.
MAX_BLOCKS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24}
DEFAULTS = {  # (smoke) -> settings not given on the command line
    False: dict(shapes="gpt2-small", optimizers="adamw,sgd", dtypes="float32,bfloat16",
                steps=100, warmup=5, rounds=3, budget_s=270.0),
    True: dict(shapes="smoke", optimizers="adamw,sgd", dtypes="float32",
               steps=2, warmup=1, rounds=1, budget_s=120.0),
}


# -- what fits on an SM -------------------------------------------------------------------------

def sm_limits(device: torch.device) -> dict:
    """The SM resources that bound resident programs; {} off CUDA."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return dict(
        sms=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}",
        regs_per_sm=getattr(props, "regs_per_multiprocessor", 0) or 65536,
        max_warps_per_sm=(getattr(props, "max_threads_per_multi_processor", 0) or 2048) // 32,
        max_blocks_per_sm=MAX_BLOCKS_PER_SM.get((props.major, props.minor), 32),
        shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 0) or 0,
        shared_reserved_per_block=1024 if props.major >= 8 else 0)


def programs_per_sm_fit(n_regs, num_warps: int, shared_bytes, limits: dict) -> int | None:
    """Programs of ``num_warps`` warps at ``n_regs`` registers a thread that one SM holds at once:
    registers go to warps in units of 256 (8 a thread), then warps, programs and shared memory
    bound it. 56 registers x 4 warps on 65536 registers: 9; 64: 8. None when n_regs is unknown."""
    if not n_regs or not limits:
        return None
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    fit = min(limits["regs_per_sm"] // regs_per_warp // num_warps,
              limits["max_warps_per_sm"] // num_warps, limits["max_blocks_per_sm"])
    if shared_bytes and limits.get("shared_per_sm"):
        per_program = shared_bytes + limits["shared_reserved_per_block"]
        fit = min(fit, limits["shared_per_sm"] // per_program)
    return max(1, fit)


def resolve_programs_per_sm(value, update_facts, num_warps: int, limits: dict) -> tuple[int, str]:
    """(programs per SM, rule) for a sweep value: an int is itself ("fixed"); "occupancy" and
    "2x occupancy" are 1 and 2 x programs_per_sm_fit of the compiled update kernel."""
    if not isinstance(value, str):
        return value, "fixed"
    facts = update_facts or {}
    fit = programs_per_sm_fit(facts.get("n_regs"), num_warps, facts.get("shared"), limits)
    if fit is None:
        raise RuntimeError(f"{value}: the update kernel's registers are unknown "
                           f"({'no GPU' if not limits else 'no compiled kernel found'})")
    return OCCUPANCY_RULES[value] * fit, value


# -- the compiled kernels' registers ------------------------------------------------------------

def jit_functions(module) -> list:
    """The triton.jit functions of ``module`` (helpers too: they never hold compiled kernels).
    Empty under TRITON_INTERPRET=1, whose functions compile nothing."""
    return [obj for obj in vars(module).values()
            if hasattr(obj, "device_caches") or isinstance(getattr(obj, "cache", None), dict)]


def compiled_kernels(jit_fn) -> list:
    """Every CompiledKernel cached by ``jit_fn``: triton >= 3.2 keeps device_caches[device] =
    (kernel_cache, [kernel_key_cache,] target, backend, binder); older ones cache[device][key]."""
    found = []
    for entry in list(getattr(jit_fn, "device_caches", {}).values()):
        if isinstance(entry, tuple) and entry and isinstance(entry[0], dict):
            found += list(entry[0].values())
    cache = getattr(jit_fn, "cache", None)
    if isinstance(cache, dict):
        for per_device in list(cache.values()):
            if isinstance(per_device, dict):
                found += list(per_device.values())
    return [k for k in found if k is not None]


def kernel_facts(kernel) -> dict:
    """Registers, spills, shared memory and warps of one CompiledKernel (n_regs and n_spills exist
    once its binary is loaded, which a launch does)."""
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        try:
            kernel._init_handles()
        except Exception:  # noqa: BLE001 (only facts for the report)
            pass
    meta = getattr(kernel, "metadata", None)
    name = getattr(kernel, "name", None) or getattr(meta, "name", None)
    return dict(name=name, n_regs=getattr(kernel, "n_regs", None),
                n_spills=getattr(kernel, "n_spills", None), shared=getattr(meta, "shared", None),
                num_warps=getattr(meta, "num_warps", None))


class KernelWatch:
    """Which kernels a step compiled: every jit function of every fusedopt.kernels module is looked
    at (kernels may move between files), and a kernel whose name or module says "norm" is the norm
    pass's, any other the update's."""

    def __init__(self):
        import fusedopt.kernels  # noqa: F401  (the package: its modules load as steps need them)
        self.seen = {id(k) for _, k in self._all()}

    @staticmethod
    def _all():
        fns = {id(f): f for name, module in list(sys.modules.items())
               if name.startswith("fusedopt.kernels") and module is not None
               for f in jit_functions(module)}
        return [(f, k) for f in fns.values() for k in compiled_kernels(f)]

    def new(self) -> dict:
        """kind -> facts of the kernel with the most registers among those compiled since the last
        call (None when none: under the interpreter, or compiled before)."""
        out = {"norm": [], "update": []}
        for f, k in self._all():
            if id(k) not in self.seen:
                self.seen.add(id(k))
                facts = kernel_facts(k)
                where = f"{facts['name']} {getattr(f, 'module', '')}"  # module: fn.__module__
                out["norm" if "norm" in where else "update"].append(facts)
        return {kind: max(facts, key=lambda f: f["n_regs"] or 0) if facts else None
                for kind, facts in out.items()}


# -- one (optimizer, dtype) section -------------------------------------------------------------

class Budget:
    """Seconds left of the run's budget and what the next config is expected to cost (the most the
    last three took), compile included when it brings a new kernel. The first config always runs."""

    def __init__(self, seconds: float):
        self.seconds, self.compiles, self.measures = seconds, [], []

    def elapsed(self) -> float:
        return time.monotonic() - _START

    def need(self, compiles: bool) -> float:
        return max(self.measures[-3:], default=0.0) + (max(self.compiles[-3:], default=0.0)
                                                       if compiles else 0.0)

    def allows(self, compiles: bool) -> bool:
        return not self.measures or self.elapsed() + self.need(compiles) <= self.seconds


class OutOfBudget(Exception):
    def __init__(self, what: str, need: float):
        super().__init__(f"{what}: would need ~{need:.0f} s")
        self.what, self.need = what, need


def compile_key(spec: dict) -> tuple:
    """The settings that make a new kernel (the grid does not)."""
    return spec["block_size"], spec["num_warps"], spec["num_partials"]


def spec_text(spec: dict) -> str:
    return (f"block {spec['block_size']}, {spec['num_warps']} warps, {spec['num_partials']} "
            f"partials, {spec['programs_per_sm']}/SM")


class Section:
    """One optimizer over one dtype's copy of the shape set, stepped under one config after
    another."""

    def __init__(self, opt_name, dtype_name, shape_list, args, device, limits, budget):
        from fusedopt.kernels._common import DEFAULT_LAUNCH
        self.opt_name, self.dtype_name, self.args, self.device = opt_name, dtype_name, args, device
        self.limits, self.budget, self.default_launch = limits, budget, DEFAULT_LAUNCH
        dtype = run.DTYPES[dtype_name]
        gen = torch.Generator(device=device).manual_seed(0)
        self.params = [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_()
                       for s in shape_list]
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=gen, device=device).to(dtype)
        _, cls, hyper = run.OPTIMIZERS[opt_name]
        # random grads have norms >> 1: the clip is active, as in run.py
        self.opt = cls(self.params, **hyper, max_grad_norm=run.MAX_NORM, backend="triton")
        self.watch = KernelWatch()
        self.kernels = {}  # compile_key -> {"norm": facts, "update": facts}
        self.numel = shapes.numel(shape_list)
        self.elt = torch.empty((), dtype=dtype).element_size()
        # norm pass 1 + update (SGD momentum 5: p, g, buf -> p, buf; Adam 7: p, g, m, v -> p, m, v)
        # elements, x elt: fp32 AdamW 32 B, bf16 16 B (DESIGN.md's budget)
        self.bytes_per_element = run.bytes_per_element(opt_name, IMPL, self.elt, "on")

    def launch(self, spec: dict):
        """The LaunchConfig of ``spec`` and its grid rule; an occupancy rule needs the kernel's
        registers, so ``spec``'s kernel is compiled (by one step) first."""
        update = (self.kernels.get(compile_key(spec)) or {}).get("update")
        pps, rule = resolve_programs_per_sm(spec["programs_per_sm"], update, spec["num_warps"],
                                            self.limits)
        return dataclasses.replace(self.default_launch, **{**spec, "programs_per_sm": pps}), rule

    def first_step(self, spec: dict) -> float:
        """One untimed step under ``spec``'s kernels (compiling them when new); its seconds."""
        fixed = dict(spec, programs_per_sm=self.default_launch.programs_per_sm)
        self.opt._launch_config = dataclasses.replace(self.default_launch, **fixed)
        start = time.monotonic()
        self.opt.step()
        sync(self.device)
        key = compile_key(spec)
        if key not in self.kernels:
            self.kernels[key] = self.watch.new()
        return time.monotonic() - start

    def measure(self, stage: str, spec: dict) -> dict:
        """A result row for ``spec``: one untimed first step, then warmup + steps timed ones."""
        compiles = (compile_key(spec)) not in self.kernels
        if not self.budget.allows(compiles):
            raise OutOfBudget(f"{stage} ({spec_text(spec)})", self.budget.need(compiles))
        row = dict(optimizer=self.opt_name, dtype=self.dtype_name, stage=stage, spec=dict(spec),
                   bytes_per_element=self.bytes_per_element, numel=self.numel)
        try:
            first_s = self.first_step(spec)
            if compiles:
                self.budget.compiles.append(first_s)
            cfg, rule = self.launch(spec)
            self.opt._launch_config = cfg
            start = time.monotonic()
            # no restore between steps: the Triton path never writes .grad
            times = measure.time_steps(self.opt.step, lambda: None, self.args.warmup,
                                       self.args.steps, self.device)
            self.budget.measures.append(time.monotonic() - start)
        except OutOfBudget:
            raise
        except Exception as e:  # noqa: BLE001  (a config that cannot run is a result too)
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}",
                       kernels=self.kernels.get(compile_key(spec)))
            return row
        row.update(settings(cfg, rule), kernels=self.kernels.get(compile_key(spec)),
                   first_step_s=first_s, **stats(times, self.bytes_per_element * self.numel))
        row.update(grid(self.device, cfg, self.numel_blocks(cfg.block_size)))
        return row

    def numel_blocks(self, block_size: int) -> int:
        return sum(-(-p.numel() // block_size) for p in self.params)

    def close(self):
        del self.opt, self.params
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settings(cfg, rule: str) -> dict:
    return dict(block_size=cfg.block_size, num_warps=cfg.num_warps, num_partials=cfg.num_partials,
                programs_per_sm=cfg.programs_per_sm, grid_rule=rule)


def grid(device, cfg, n_blocks: int) -> dict:
    """The programs each launch really gets (fusedopt/_multi_tensor.py's rules)."""
    try:
        from fusedopt._multi_tensor import norm_grid, update_grid
        return dict(n_blocks=n_blocks, norm_programs=norm_grid(device, n_blocks, cfg.num_partials),
                    update_programs=update_grid(device, n_blocks, cfg.programs_per_sm))
    except Exception:  # noqa: BLE001  (a renamed helper costs a column, not the run)
        return dict(n_blocks=n_blocks, norm_programs=None, update_programs=None)


def stats(times: list[float], bytes_per_step: int) -> dict:
    median = statistics.median(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [median] * 4
    gbs = bytes_per_step / (median * 1e-3) / 1e9  # bytes_per_element x numel per step
    return dict(times_ms=times, median_ms=median, p20_ms=q[0], p80_ms=q[-1], gb_per_s=gbs)


def sweep_section(sec: Section, sweep: dict, args, rows: list, save) -> None:
    """Default, one setting at a time, combined, confirm: rows appended (and saved) as they come."""
    d = sec.default_launch
    default = {k: getattr(d, k) for k in SETTINGS}

    def add(row):
        rows.append(row)
        save()
        ms = (f"{row['median_ms']:.3f} ms, {row['gb_per_s']:.0f} GB/s "
              f"({_f(row.get('pct_of_copy'), '.0f')}% of copy), registers {regs_text(row)}"
              if "median_ms" in row else row["error"])
        print(f"[{sec.opt_name} {sec.dtype_name}] {row['stage']}: {spec_text(row['spec'])}: {ms}",
              file=sys.stderr, flush=True)
        return row

    base = add(sec.measure("default", default))
    winners = {}
    for setting, values in sweep.items():
        values = [v for v in dict.fromkeys(values) if v != default[setting]
                  and (sec.limits or not isinstance(v, str))]  # occupancy: a GPU's registers
        tried = [base] + [add(sec.measure(setting, dict(default, **{setting: v}))) for v in values]
        ok = [r for r in tried if "median_ms" in r]
        if ok:
            winners[setting] = min(ok, key=lambda r: r["median_ms"])["spec"][setting]
    combined = dict(default, **winners)
    singles = [dict(default, **{s: v}) for s, v in winners.items()]
    if combined != default and combined not in singles:
        add(sec.measure("combined", combined))
    candidates = [default, combined] + singles
    candidates = [dict(c) for c in dict.fromkeys(tuple(sorted(c.items())) for c in candidates)]
    if len(candidates) < 2 or args.rounds < 1:
        return
    pooled, kept = [[] for _ in candidates], [None] * len(candidates)
    try:
        for _ in range(args.rounds):  # interleaved: a clock or neighbour change hits all alike
            for i, spec in enumerate(candidates):
                r = sec.measure("confirm", spec)
                if kept[i] is None or "median_ms" in r:
                    kept[i] = r
                pooled[i] += r.get("times_ms", [])
    finally:  # out of budget (or interrupted) in the middle: keep the rounds done
        for i, r in enumerate(kept):
            if r is not None:
                if pooled[i]:
                    r.update(stats(pooled[i], sec.bytes_per_element * sec.numel),
                             rounds=len(pooled[i]) // args.steps)
                add(r)


def best_rows(rows: list) -> dict:
    """(optimizer/dtype) -> the fastest row: among the confirm rows when there are any."""
    out = {}
    for key in dict.fromkeys(f"{r['optimizer']}/{r['dtype']}" for r in rows):
        mine = [r for r in rows if f"{r['optimizer']}/{r['dtype']}" == key and "median_ms" in r]
        pick = [r for r in mine if r["stage"] == "confirm"] or mine
        if pick:
            out[key] = min(pick, key=lambda r: r["median_ms"])
    return out


def add_relative(rows: list, meta: dict) -> None:
    """% of the copy bandwidth, and speed against the default of the same stage kind."""
    for r in rows:
        if "median_ms" not in r:
            continue
        r["pct_of_copy"] = 100 * r["gb_per_s"] / meta["copy_gbs"] if meta.get("copy_gbs") else None
        same = [q for q in rows if q["optimizer"] == r["optimizer"] and q["dtype"] == r["dtype"]
                and "median_ms" in q and q["spec"] == meta["default_spec"]
                and (q["stage"] == "confirm") == (r["stage"] == "confirm")]
        base = same[-1] if same else None
        if base is None and r["stage"] == "confirm":
            same = [q for q in rows if q["optimizer"] == r["optimizer"] and q["dtype"] == r["dtype"]
                    and q["stage"] == "default" and "median_ms" in q]
            base = same[-1] if same else None
        r["speedup_vs_default"] = base["median_ms"] / r["median_ms"] if base else None


# -- output -------------------------------------------------------------------------------------

def _f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def launch_config_text(r: dict) -> str:
    return (f"LaunchConfig(block_size={r['block_size']}, num_warps={r['num_warps']}, "
            f"num_partials={r['num_partials']}, programs_per_sm={r['programs_per_sm']})")


def regs_text(r: dict) -> str:
    k = r.get("kernels") or {}
    parts = []
    for kind in ("norm", "update"):
        f = k.get(kind) or {}
        parts.append(f"{_f(f.get('n_regs'), 'd')}" + (f" ({f['n_spills']} B spilled)"
                                                       if f.get("n_spills") else ""))
    return " / ".join(parts)


def markdown(meta: dict, rows: list, best: dict) -> str:
    v, lim = meta["versions"], meta["limits"]
    lines = [
        "# fusedopt launch-settings sweep: one clipped step (norm pass + update)", "",
        f"- device: {meta['device']}" + (
            f" ({lim['sms']} SMs, compute capability {lim['compute_capability']}; per SM "
            f"{lim['regs_per_sm']} registers, {lim['max_warps_per_sm']} warps, "
            f"{lim['max_blocks_per_sm']} programs at most)" if lim else ""),
        f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, Python {v['python']}, "
        f"fusedopt {meta['fusedopt']}",
        f"- date: {meta['date']}; shapes {meta['shapes']} ({meta['tensors']} tensors, "
        f"{meta['numel'] / 1e6:.1f}M elements); clip_grad_norm_ max_norm {meta['max_grad_norm']} "
        f"(active); {meta['warmup']} warm-up + {meta['steps']} timed steps a config"
        + ("; CUDA events, L2 flushed between steps" if meta["device_type"] == "cuda"
           else "; wall time (CPU interpreter: these numbers mean nothing)"),
        f"- device-to-device copy bandwidth, same run: **{_f(meta['copy_gbs'])} GB/s** "
        f"(read + write; {_f(meta.get('copy_gbs_end'))} GB/s at the end)",
        "- GB/s = bytes_per_element x elements / median (bench/run.py: norm pass 1 + update: "
        "SGD momentum 5, Adam/AdamW 7 elements, x element size)",
        f"- default: {spec_text(meta['default_spec'])}; stages: default, one setting at a time, "
        f"combined, confirm ({meta['rounds']} interleaved rounds of the default, the combined and "
        "each setting's winner; the best is the fastest confirm row)",
        f"- time: {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget"
        + (f"; **stopped early**: {meta['stopped_early']}" if meta.get("stopped_early") else ""),
        "", "## Best settings", "",
        "| optimizer | dtype | block | warps | partials | programs/SM (grid) | median ms | GB/s "
        "| % copy | vs default |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key, r in best.items():
        opt, dtype = key.split("/")
        lines.append(
            f"| {opt} | {dtype} | {r['block_size']} | {r['num_warps']} | {r['num_partials']} | "
            f"{grid_text(r)} | {r['median_ms']:.3f} | {r['gb_per_s']:.0f} | "
            f"{_f(r.get('pct_of_copy'), '.0f')}% | {_f(r.get('speedup_vs_default'), '.3f')}x |")
    lines += [""] + [f"- {key}: `{launch_config_text(r)}`" for key, r in best.items()]
    lines += [
        "", "## Every config", "",
        "vs default: the default's median (the confirm default for confirm rows) / this median. "
        "registers: norm pass / update kernel, from the compiled kernels (- under the "
        "interpreter).",
        "",
        "| optimizer | dtype | stage | block | warps | partials | programs/SM (grid) | registers "
        "| median ms | p20-p80 | GB/s | % copy | vs default | first step s |",
        "|---|---|---|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["spec"]
        if "median_ms" not in r:
            lines.append(f"| {r['optimizer']} | {r['dtype']} | {r['stage']} | {s['block_size']} | "
                         f"{s['num_warps']} | {s['num_partials']} | {s['programs_per_sm']} | "
                         f"{regs_text(r)} | failed: {r['error'][:120]} | | | | | |")
            continue
        lines.append(
            f"| {r['optimizer']} | {r['dtype']} | {r['stage']} | {r['block_size']} | "
            f"{r['num_warps']} | {r['num_partials']} | {grid_text(r)} | {regs_text(r)} | "
            f"{r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['gb_per_s']:.0f} | "
            f"{_f(r.get('pct_of_copy'), '.0f')}% | {_f(r.get('speedup_vs_default'), '.3f')}x | "
            f"{r['first_step_s']:.2f} |")
    if meta.get("skipped"):
        lines += ["", "## Not run", ""] + [f"- {s}" for s in meta["skipped"]]
    return "\n".join(lines) + "\n"


def grid_text(r: dict) -> str:
    rule = "" if r["grid_rule"] == "fixed" else f" ({r['grid_rule']})"
    programs = f", {r['update_programs']} programs" if r.get("update_programs") is not None else ""
    return f"{r['programs_per_sm']}/SM{rule}{programs}"


def write_files(files: dict, meta: dict, rows: list, best: dict) -> str:
    """Markdown and JSON (``files``: {'md': path, 'json': path}), each written whole to a
    temporary name and moved into place."""
    text = markdown(meta, rows, best)
    payload = json.dumps({"meta": meta, "best": {k: dict(launch_config=launch_config_text(r), **r)
                                                   for k, r in best.items()}, "results": rows},
                         indent=1)
    for kind, content in (("md", text), ("json", payload)):
        path = pathlib.Path(files[kind])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
    return text


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, two values a setting: proves the script runs")
    parser.add_argument("--shapes", help=f"one set from bench/shapes.py: {', '.join(shapes.NAMES)}")
    parser.add_argument("--optimizers", help=f"comma list of {', '.join(KERNEL_OPTIMIZERS)}, in order")
    parser.add_argument("--dtypes", help=f"comma list of {', '.join(run.DTYPES)}")
    parser.add_argument("--steps", type=int, help="timed steps a config (and a confirm round)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, help="interleaved confirm rounds (0: none)")
    parser.add_argument("--budget-s", type=float, help="stop sweeping past this many seconds from "
                        "start (gpu_check.sh gives its timeout less a margin)")
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="where the files go (default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.smoke].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shapes not in shapes.NAMES:
        parser.error(f"unknown shapes {args.shapes!r}; known: {', '.join(shapes.NAMES)}")
    report.split_names(parser, args, {"optimizers": KERNEL_OPTIMIZERS, "dtypes": run.DTYPES})
    changed = report.changed_args(args, DEFAULTS[args.smoke])
    if "budget_s" in changed:
        changed["budget"] = changed.pop("budget_s")
    args.tag = report.run_tag("smoke" if args.smoke else "", changed)
    if args.rounds < 0:
        parser.error("--rounds must be >= 0")
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on CPU the kernels run only under Triton's interpreter: "
                     "TRITON_INTERPRET=1 python bench/tune.py --smoke --device cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("on CPU only --smoke runs (the interpreter takes ~7 ms a program)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"the Triton kernels run on CUDA (or CPU under the interpreter), not {device}")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    # gpu_check.sh's timeout sends SIGINT, then SIGKILL: take SIGINT (and SIGTERM) as an interrupt
    # even where a background launch left SIGINT ignored, so that the files say where it stopped
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = parse_args(argv)
    device = torch.device(args.device)
    from fusedopt.kernels._common import DEFAULT_LAUNCH, LaunchConfig
    sweep = SMOKE_SWEEP if args.smoke else SWEEP
    missing = set(SETTINGS) - {f.name for f in dataclasses.fields(LaunchConfig)}
    if missing:
        sys.exit(f"tune.py: LaunchConfig has no {sorted(missing)} (kernels/_common.py changed?)")
    shape_list = shapes.get(args.shapes)
    limits = sm_limits(device)
    copy_mb = 16 if device.type != "cuda" else 256 if args.smoke else 1024  # 1 GB >> any L2
    meta = dict(device=measure.device_name(device), device_type=device.type,
                versions=measure.versions(), fusedopt=fusedopt.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), smoke=args.smoke,
                shapes=args.shapes, tensors=len(shape_list), numel=shapes.numel(shape_list),
                steps=args.steps, warmup=args.warmup, rounds=args.rounds, budget_s=args.budget_s,
                max_grad_norm=run.MAX_NORM, limits=limits, sweep=sweep,
                default_spec={k: getattr(DEFAULT_LAUNCH, k) for k in SETTINGS},
                copy_gbs=measure.copy_bandwidth_gbs(device, copy_mb),
                stopped_early=None, skipped=[], elapsed_s=0.0)
    files = report.result_paths(args.out_dir, "tune", meta["device"], args.tag, ("md", "json"))
    rows, budget = [], Budget(args.budget_s)

    def save():
        meta["elapsed_s"] = budget.elapsed()
        add_relative(rows, meta)
        return write_files(files, meta, rows, best_rows(rows))

    sections = [(o, d) for o in args.optimizers for d in args.dtypes]
    try:
        for i, (opt_name, dtype_name) in enumerate(sections):
            elt = torch.empty((), dtype=run.DTYPES[dtype_name]).element_size()
            if not run.fits_in_memory(meta["numel"], elt, opt_name, device):
                meta["skipped"].append(f"{opt_name} {dtype_name}: needs more memory than is free")
                continue
            sec = None
            try:
                sec = Section(opt_name, dtype_name, shape_list, args, device, limits, budget)
                sweep_section(sec, sweep, args, rows, save)
            except OutOfBudget as e:
                meta["stopped_early"] = (f"{budget.elapsed():.0f} s of {budget.seconds:.0f} s "
                                         f"used; next: {e}")
                meta["skipped"] += [f"{opt_name} {dtype_name}: {e.what} and what follows"] + [
                    f"{o} {d}: all" for o, d in sections[i + 1:]]
                break
            except Exception as e:  # noqa: BLE001  (one section's failure is not the others')
                meta["skipped"].append(f"{opt_name} {dtype_name}: {type(e).__name__}: {e}"[:400])
                print(f"[{opt_name} {dtype_name}] failed: {e!r}", file=sys.stderr, flush=True)
            finally:
                if sec is not None:
                    sec.close()
    except KeyboardInterrupt as e:  # keep what there is
        meta["stopped_early"] = f"interrupted ({e or 'SIGINT'}) after {budget.elapsed():.0f} s"
        print(save())
        print(f"tune.py: interrupted; wrote {files['md']} and {files['json']}", file=sys.stderr)
        sys.exit(130)
    meta["copy_gbs_end"] = measure.copy_bandwidth_gbs(device, copy_mb)
    text = save()
    print(text)
    print(f"wrote {files['md']}, {files['json']}")
    if not any("median_ms" in r for r in rows):
        sys.exit("tune.py: no config ran (see the failures above)")


if __name__ == "__main__":
    main()
