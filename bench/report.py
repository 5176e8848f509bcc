"""What bench/run.py writes: a Markdown report (also on stdout), the raw JSON and a PNG chart of
the headline comparison, named by device and date under bench/results/."""
import datetime
import json
import pathlib
import re


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; a CPU is just 'cpu'."""
    if "torch threads" in device_name:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def paths(out_dir: str, meta: dict, quick: bool) -> dict:
    stem = f"{slug(meta['device'])}-{datetime.date.today().isoformat()}{'-quick' if quick else ''}"
    base = pathlib.Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    return {kind: base / f"{stem}.{kind}" for kind in ("md", "json", "png")}


def unused_paths(out_dir: str, stem: str, tail: str, kinds) -> dict:
    """{kind: <out_dir>/<stem>[-N]<tail>.<kind>}, N = 2, 3, ... where the plain name is taken by
    any kind, so that no earlier run is overwritten (bench/distributed.py's scheme)."""
    base = pathlib.Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        name = stem + (f"-{n}" if n > 1 else "") + tail
        found = {kind: base / f"{name}.{kind}" for kind in kinds}
        if not any(p.exists() for p in found.values()):
            return found
        n += 1


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
           else "; wall time"),
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
           else "; wall time"),
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
