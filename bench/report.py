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
