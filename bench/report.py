"""What bench/run.py writes: a Markdown report (also on stdout), the raw JSON and a PNG chart of
the headline comparison; and what every bench script shares: where results go and how they are
named (RESULTS_DIR, result_paths, run_tag), progress lines with the time left (Progress)."""
import datetime
import json
import pathlib
import re


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; a CPU is just 'cpu'."""
    if "torch threads" in device_name:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


# Where every bench script writes by default: bench/results/ beside this file, whatever the
# current directory (a relative --out-dir is the user's own and counts from the current directory)
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
MAX_TAG = 60  # characters of a run's tag in its file names; the JSON keeps every argument
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def run_tag(mode: str, changed: dict, keyed=("clip",)) -> str:
    """What kind of run it was, for its file names: '' for a script's default full run, else
    ``mode`` ('quick', 'smoke', ...) and each argument that differs from that mode's default, in
    ``changed``'s order: a list (or comma string) as its values joined by '_' (``keyed`` ones
    after their option's name: 'clipamp'), a number as name + value ('steps3'), a flag as its
    name ('compile'; an option that turns a default off: 'no' + name). Characters other than
    lower case letters, digits and '+_.' become '-' ('fusedopt (torch)' -> 'fusedopt-torch');
    at most MAX_TAG characters.

    run_tag('quick', {}) -> 'quick';
    run_tag('', {'shapes': ['smoke'], 'optimizers': ['sgd', 'adamw'], 'steps': 3})
    -> 'smoke-sgd_adamw-steps3'."""
    def clean(text):
        return re.sub(r"[^a-z0-9+_.]+", "-", str(text).lower()).strip("-")
    parts = [mode] if mode else []
    for key, value in changed.items():
        name = key.replace("_", "")
        if isinstance(value, bool):
            parts.append(name if value else "no" + name)
        elif isinstance(value, (int, float)):
            parts.append(f"{name}{value:g}")
        else:
            values = value.split(",") if isinstance(value, str) else list(value)
            text = "_".join(clean(_SHORT.get(v, v)) for v in values)
            parts.append(name + text if key in keyed else text)
    return "-".join(p for p in parts if p)[:MAX_TAG].strip("-_.")


def changed_args(args, defaults: dict) -> dict:
    """{option: args' value} for each option of ``defaults`` whose value in ``args`` differs from
    it (lists and comma strings compare as lists), in ``defaults``' order: run_tag's input."""
    def norm(v):
        if isinstance(v, str):
            return v.split(",")
        return list(v) if isinstance(v, tuple) else v
    return {k: getattr(args, k) for k, d in defaults.items() if norm(getattr(args, k)) != norm(d)}


def result_paths(out_dir, kind: str, device_name: str, tag: str, exts) -> dict:
    """Every bench script's file names: {ext: <out_dir>/[<kind>-]<device>-<date>[-<tag>][-N]<ext>}
    with ``ext`` 'md' -> '.md' (one with a dot is taken as is: '-profile.txt'). ``kind`` says
    which script or mode ('' for run.py's step benchmark: cpu-2026-11-29.md), ``tag`` what kind
    of run it was (run_tag: '' for the default full run); N = 2, 3, ... where the name without
    it is taken by any of ``exts``, so that no earlier run's files are overwritten. Makes
    ``out_dir``."""
    stem = "-".join(p for p in (kind, slug(device_name), datetime.date.today().isoformat(), tag)
                    if p)
    return unused_paths(out_dir, stem, "", exts)


def unused_paths(out_dir, stem: str, tail: str, kinds) -> dict:
    """{kind: <out_dir>/<stem>[-N]<tail><ext>}, N = 2, 3, ... where the plain name is taken by
    any kind, so that no earlier run is overwritten; ext is '.' + kind, or kind itself where it
    has a dot ('-profile.txt')."""
    base = pathlib.Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        name = stem + (f"-{n}" if n > 1 else "") + tail
        found = {kind: base / (name + (kind if "." in kind else "." + kind)) for kind in kinds}
        if not any(p.exists() for p in found.values()):
            return found
        n += 1


def eta_text(seconds: float) -> str:
    """'45 s', '3 min 10 s', '1 h 5 min': a time left, to the second under an hour."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """Progress lines on stderr with the time left: ``[done/total] what (T left)``, T the wall
    time since start per unit of work measured so far, times the work still to run. A row's
    work is 1 unless the caller weighs rows (``total_work`` and each row's ``work``: run.py
    weighs a row by its shape set's size, as a large set's rows take longest); rows skipped
    without measuring count as done and cost nothing. T is rough, and settles as the run goes
    on."""

    def __init__(self, total: int, total_work: float | None = None, stream=None, clock=None):
        import sys
        import time
        self.total, self.done = total, 0
        self.total_work = total if total_work is None else total_work
        self.work_done = self.work_measured = 0.0
        self._clock = clock or time.perf_counter
        self.start = self._clock()
        self.stream = stream if stream is not None else sys.stderr

    def skip(self, rows: int = 1, work: float | None = None) -> None:
        self.done += rows
        self.work_done += rows if work is None else work

    def left_s(self) -> float | None:
        if not self.work_measured:
            return None
        return ((self._clock() - self.start) / self.work_measured
                * max(0.0, self.total_work - self.work_done))

    def row(self, what: str, measured: bool = True, work: float = 1.0) -> str:
        """Counts one row (measured or not) and prints its line."""
        self.done += 1
        self.work_done += work
        if measured:
            self.work_measured += work
        left = self.left_s()
        line = f"[{self.done}/{self.total}] {what}"
        if self.done < self.total and left is not None:
            line += f" ({eta_text(left)} left)"
        elif self.done >= self.total:
            line += f" (done in {eta_text(self._clock() - self.start)})"
        print(line, file=self.stream, flush=True)
        return line


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def markdown(meta: dict, results: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        "# fusedopt step benchmark: clip + update, one whole optimizer step", "",
        f"- device: {meta['device']}",
        f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, Python {v['python']}, "
        f"fusedopt {meta['fusedopt']}" + (f" at {meta['commit']}" if meta.get("commit") else ""),
        f"- date: {meta['date']}; {meta['warmup']} warm-up + {meta['steps']} timed steps per row"
        + "".join(f" ({o}: {w} warm-up)" for o, w in meta.get("min_warmup", {}).items())
        + ("; CUDA events, L2 flushed between steps" if meta["device_type"] == "cuda"
           else "; wall time")
        + (f"; all rows took {eta_text(meta['wall_s'])}" if meta.get("wall_s") is not None
           else ""),
        f"- device-to-device copy bandwidth, same run: **{meta['copy_gbs']:.1f} GB/s** "
        "(read + write)",
    ]
    if meta.get("hyperparameters"):
        lines.append("- settings, every implementation: " + "; ".join(
            f"{o} " + ", ".join(f"{k}={v}" for k, v in h.items())
            for o, h in meta["hyperparameters"].items()))
    if meta.get("busy_cpus") is not None:
        lines.append(f"- CPUs busy with other work at start / end: {meta['busy_cpus']}")
    lines += [
        "", "median ms (p10-p90); GB/s from the bytes each implementation moves "
        "(bench/run.py: bytes_per_element"
        + ("; counted from the step itself, measure.ByteCount, for "
           + ", ".join(sorted({r["optimizer"] for r in results if r.get("bytes_counted")}))
           if any(r.get("bytes_counted") for r in results) else "")
        + "), and as % of the copy bandwidth; launches: GPU kernels "
        "+ copies per step (torch profiler); host: ms until step() returns (GPU only); "
        "speedup: best torch median / this median.", "",
        "| shapes | dtype | clip | optimizer | implementation | median ms | p10-p90 | GB/s | % copy "
        "| launches | host ms | speedup |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        launches = "-" if r["launches"] is None else \
            f"{r['launches']['kernels']}+{r['launches']['copies']}"
        lines.append(
            f"| {r['shapes']} ({r['tensors']} t, {r['numel'] / 1e6:.1f}M) | {r['dtype']} | "
            f"{r['clip']} | {r['optimizer']} | {r['impl']} | "
            f"{r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['gb_per_s']:.1f} | "
            f"{r['pct_of_copy']:.0f}% | {launches} | {_fmt(r['host_ms'], '.3f')} | "
            f"{r['speedup_vs_best_torch']:.2f}x |")
    lines += ["", "## fusedopt against the best torch recipe", ""]
    for r in results:
        if r["impl"].startswith("fusedopt"):
            lines.append(f"- {r['shapes']} {r['dtype']} clip {r['clip']} "
                         f"{r['optimizer']}, {r['impl']}: **{r['speedup_vs_best_torch']:.2f}x** "
                         f"({r['best_torch_impl']} {r['best_torch_ms']:.3f} ms -> "
                         f"{r['median_ms']:.3f} ms)")
    return "\n".join(lines) + "\n"


def memory_markdown(meta: dict, results: list[dict]) -> str:
    """bench/run.py --memory's report: per configuration, fusedopt against the best torch recipe
    for the same param dtype (time, bytes moved, state bytes), then every row."""
    v = meta["versions"]
    lines = [
        "# fusedopt memory-lean options: one optimizer step (clip + update) against torch's "
        "recipes", "",
        f"- device: {meta['device']}",
        f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, Python {v['python']}, "
        f"fusedopt {meta['fusedopt']}" + (f" at {meta['commit']}" if meta.get("commit") else ""),
        f"- date: {meta['date']}; {meta['warmup']} warm-up + {meta['steps']} timed steps per row"
        + ("; CUDA events, L2 flushed between steps" if meta["device_type"] == "cuda"
           else "; wall time")
        + (f"; all rows took {eta_text(meta['wall_s'])}" if meta.get("wall_s") is not None
           else ""),
        f"- device-to-device copy bandwidth, same run: {meta['copy_gbs']:.1f} GB/s (read + write)",
        "- settings, every implementation: " + "; ".join(
            f"{o} " + ", ".join(f"{k}={x}" for k, x in h.items())
            for o, h in meta["hyperparameters"].items())
        + f"; clip_grad_norm_ {meta['max_grad_norm']}",
    ]
    if meta.get("busy_cpus") is not None:
        lines.append(f"- CPUs busy with other work at start / end: {meta['busy_cpus']}")
    lines += ["- configurations (fusedopt options; the torch recipe each is measured against):"]
    for name, c in meta["memory"].items():
        options = ", ".join(f"{k}={x}" for k, x in c["options"].items()) or "defaults"
        recipe = ("torch.optim on fp32 masters kept by hand, copied into the model's params"
                  if c["recipe"] == "fp32 master" else f"torch.optim in {c['dtype']}")
        lines.append(f"  - {name}: {c['dtype']} params, {options}; vs {recipe}")
    lines += [
        "", "## fusedopt against the best torch recipe for the same param dtype", "",
        "Per parameter. state: bytes of every tensor in opt.state after the timed steps (step "
        "counters included), for the fp32 master recipe plus its fp32 copy and fp32 grads, which "
        "live outside opt.state (params and the model's grads, alike in both, not counted). "
        "moved: bytes one step reads + writes; fusedopt's torch path counted from the step "
        "(measure.ByteCount), its Triton kernel by hand (run.memory_triton_bytes), torch's recipe "
        "from run.memory_bytes_per_element. speedup: best torch median / fusedopt median.", "",
        "| shapes | clip | optimizer | configuration | impl | state B: fusedopt / torch | "
        "moved B: fusedopt torch path / Triton / best torch | ms: fusedopt / best torch "
        "| speedup |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["memory"] is None:
            continue
        lines.append(
            f"| {r['shapes']} ({r['numel'] / 1e6:.1f}M) | {r['clip']} | {r['optimizer']} | "
            f"{r['memory']} | {r['impl']} | {r['state_bytes_per_param']:.2f} / "
            f"{r['best_torch_state_bytes_per_param']:.2f} | "
            f"{r['bytes_per_element']:.0f} / {r['triton_bytes_per_element']} / "
            f"{r['best_torch_bytes_per_element']:.0f} | {r['median_ms']:.1f} / "
            f"{r['best_torch_ms']:.1f} ({r['best_torch_impl']}) | "
            f"{r['speedup_vs_best_torch']:.2f}x |")
    lines += [
        "", "## Every row", "",
        "median ms (p10-p90); moved: bytes per parameter one step reads + writes (counted: "
        "measured from the step); state: opt.state bytes per parameter (+ kept outside it).", "",
        "| shapes | clip | optimizer | params | configuration or recipe | implementation "
        "| median ms | p10-p90 | moved B | GB/s | state B |",
        "|---|---|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        held = f" + {r['held_bytes_per_param']:.2f}" if r["held_bytes_per_param"] else ""
        lines.append(
            f"| {r['shapes']} ({r['tensors']} t, {r['numel'] / 1e6:.1f}M) | {r['clip']} | "
            f"{r['optimizer']} | {r['dtype']} | {r['memory'] or 'torch: ' + r['recipe']} | "
            f"{r['impl']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | "
            f"{r['bytes_per_element']:.1f}{' (counted)' if r['bytes_counted'] else ''} | "
            f"{r['gb_per_s']:.1f} | {r['state_bytes_per_param']:.2f}{held} |")
    return "\n".join(lines) + "\n"


def write_json(path, meta: dict, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


def chart(path, meta: dict, results: list[dict]) -> bool:
    """Bars of speedup against the best torch recipe, one group per workload, one bar per
    fusedopt backend. False when matplotlib is missing (it comes with the `bench` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ours = [r for r in results if r["impl"].startswith("fusedopt")]
    impls = list(dict.fromkeys(r["impl"] for r in ours))
    workloads = list(dict.fromkeys((r["shapes"], r["dtype"], r["clip"], r["optimizer"]) for r in ours))
    by_key = {(r["shapes"], r["dtype"], r["clip"], r["optimizer"], r["impl"]): r for r in ours}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.95 * len(workloads) + 0.4 * len(impls) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(workloads))]
        ys = [by_key.get((*w, impl), {}).get("speedup_vs_best_torch", 0.0) for w in workloads]
        bars = ax.bar(xs, ys, width, label=impl)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)))
    short = {"float32": "fp32", "bfloat16": "bf16"}
    ax.set_xticklabels([f"{s}\n{short.get(d, d)} {o}\nclip {c}"
                        for s, d, c, o in workloads], fontsize=7)
    ax.set_ylabel("speedup vs best torch recipe (x)")
    ax.set_title(f"fusedopt step vs torch.optim + clip_grad_norm_\n{meta['device']}, "
                 f"torch {meta['versions']['torch']}, {meta['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def split_names(parser, args, known: dict) -> None:
    """Each comma-separated option named in ``known`` (option -> its known names) becomes a list;
    an unknown name, or --steps/--warmup below 1, ends the script with argparse's error. One
    place for run.py, host.py and tune.py."""
    for key, names in known.items():
        setattr(args, key, getattr(args, key).split(","))
        for name in getattr(args, key):
            if name not in names:
                parser.error(f"unknown {key} {name!r}; known: {', '.join(names)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
