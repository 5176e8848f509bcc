"""How much faster is fusedopt.Muon(max_grad_norm=1.0).step() than clip_grad_norm_ +
torch.optim.Muon.step() on a model's 2-D parameters (the ones Muon takes)?

    python bench/muon.py                  # gpt2-small's 50 matrices, fp32: ~4 min on 2 CPU cores
    python bench/muon.py --quick          # the smoke set's one matrix: checks the script runs
    python bench/muon.py --sets gpt2-small,resnet50 --steps 3 --out-dir /tmp/m

Both sides start from the same fp32 matrices and step on the same gradients (restored, untimed,
before every step: the clip rewrites .grad); the two implementations alternate step by step, so
a neighbour on the machine slows both alike, and each step's ratio is also reported (paired).
Timed: the whole recipe, clip included. Also reported: ATen ops dispatched per step (a
TorchDispatchMode's count, views left out: on CUDA about one launch each, a foreach op one per
chunk of tensors), the Newton-Schulz GEMM FLOPs per step and the rate they ran at, and how far
the two sides' parameters are apart after the first step (bf16 Newton-Schulz rounding).
Writes Markdown (also printed) and JSON to <out-dir>/muon-<device>-<date>[-<tag>][-N].{md,json}
(report.result_paths: no tag for the default run, else 'quick' or the options that differ from
the defaults; -2, -3, ... rather than over another run's files; --out-dir defaults to
bench/results/ beside this script).
Shapes come from bench/shapes.py.
"""
import argparse
import datetime
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
import measure  # bench/ is on sys.path when run as `python bench/muon.py`
import report
import shapes
from fusedopt.optim.muon import Muon

MAX_NORM = 1.0
KWARGS = dict(lr=0.02, weight_decay=0.1)  # torch's other defaults: momentum 0.95, Nesterov, 5 NS
TORCH, OURS = "torch.optim.Muon + clip_grad_norm_", "fusedopt.Muon(max_grad_norm=1.0)"
# Bytes per parameter element, fp32, beside the GEMMs (fusedopt/optim/muon.py's docstring):
# torch: norm 4 + clip multiply 8 + momentum 12 + Nesterov 12 + .bfloat16() 6 + normalise 6
#        + decay 8 + update 10 = 66; fusedopt: the same with a clip divide for the multiply and
#        one cast+stack for the .bfloat16() = 66.
BYTES_PER_ELEMENT = {TORCH: 66, OURS: 66}
VIEWS = {"select", "slice", "transpose", "permute", "t", "view", "_unsafe_view", "reshape",
         "expand", "unsqueeze", "alias", "detach", "as_strided", "_record_function_enter_new",
         "_record_function_exit", "promote_types"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def matrices(name: str) -> list[tuple[int, int]]:
    """The 2-D shapes of a set: what Muon steps (embeddings included, as given)."""
    return [s for s in shapes.get(name) if len(s) == 2]


def ns_flops(mats, ns_steps: int = 5) -> int:
    """Newton-Schulz GEMM FLOPs of one step: per matrix r x c (r <= c) and per iteration,
    X X^T (2 r^2 c) + gram gram (2 r^3) + gram_update X (2 r^2 c)."""
    total = 0
    for a, b in mats:
        r, c = min(a, b), max(a, b)
        total += ns_steps * (4 * r * r * c + 2 * r ** 3)
    return total


def make_step(impl: str, params):
    """(the recipe's step, its optimizer step alone without the clip) for ``params``."""
    if impl == TORCH:
        opt = torch.optim.Muon(params, **KWARGS)

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        return step, opt.step
    opt = Muon(params, **KWARGS, max_grad_norm=MAX_NORM)

    def alone():  # max_grad_norm is read at every step: None skips the norm and the clip
        opt.max_grad_norm = None
        try:
            opt.step()
        finally:
            opt.max_grad_norm = MAX_NORM
    return opt.step, alone


def count_ops(step) -> int:
    counter = OpCounter()
    with counter:
        step()
    return counter.n


def profile_top(step, n: int = 6) -> list[tuple[str, float]]:
    """The ``n`` ATen ops with the most self CPU time in one step: (name, ms)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3) for e in events
            if e.key.startswith("aten::")][:n]


def measure_set(name: str, args, device: torch.device) -> dict:
    mats = matrices(name)
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(s, generator=g).div_(s[0] ** 0.5).to(device) for s in mats]
    grads = [torch.randn(s, generator=g).to(device) for s in mats]
    sides = {}
    for impl in (TORCH, OURS):
        params = [torch.nn.Parameter(m.clone()) for m in masters]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        sides[impl] = (params, *make_step(impl, params))

    def restore(params):
        for p, gr in zip(params, grads):
            p.grad.copy_(gr)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {impl: [] for impl in sides}
    first_step_gap = None
    for i in range(args.warmup + args.steps):
        for impl, (params, step, _) in sides.items():
            restore(params)
            sync()
            start = time.perf_counter()
            step()
            sync()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= args.warmup:
                times[impl].append(elapsed)
        if i == 0:
            first_step_gap = max(float((a.detach() - b.detach()).abs().max())
                                 for a, b in zip(sides[TORCH][0], sides[OURS][0]))
    ops, ops_alone, top = {}, {}, {}
    for impl, (params, step, alone) in sides.items():
        restore(params)
        ops[impl] = count_ops(step)
        restore(params)
        ops_alone[impl] = count_ops(alone)
        if args.profile and device.type == "cpu":
            restore(params)
            top[impl] = profile_top(step)
    flops = ns_flops(mats)
    numel = shapes.numel(mats)
    rows = []
    for impl, ts in times.items():
        median = statistics.median(ts)
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [median] * 4
        rows.append(dict(
            set=name, matrices=len(mats), numel=numel,
            wide_shapes=len({tuple(sorted(s)) for s in mats}),
            impl=impl, times_ms=ts, median_ms=median, p20_ms=q[0], p80_ms=q[-1],
            ops_per_step=ops[impl], ops_without_clip=ops_alone[impl],
            profile_top_self_cpu_ms=top.get(impl), ns_gflop=flops / 1e9,
            ns_gflops_per_s=flops / median / 1e6,
            bytes_per_element=BYTES_PER_ELEMENT[impl]))
    torch_ms, ours_ms = rows[0]["median_ms"], rows[1]["median_ms"]
    paired = statistics.median(t / o for t, o in zip(times[TORCH], times[OURS]))
    rows[1].update(speedup=torch_ms / ours_ms, paired_speedup=paired,
                   first_step_max_param_gap=first_step_gap)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        "# fusedopt.Muon: clip + Muon step on a model's 2-D parameters", "",
        f"- device: {meta['device']}",
        f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, Python {v['python']}, "
        f"fusedopt {meta['fusedopt']}, commit {meta['commit']}",
        f"- date: {meta['date']}; {meta['warmup']} warm-up + {meta['steps']} timed steps per "
        "implementation, alternating step by step; wall time of the step (CUDA: synchronized)",
        f"- fp32 params; lr {KWARGS['lr']}, weight_decay {KWARGS['weight_decay']}, momentum 0.95, "
        f"Nesterov, ns_steps 5; max_grad_norm {MAX_NORM} (clip_grad_norm_(foreach=True) for torch)",
        f"- CPUs busy with other work at start / end: {meta['busy_cpus']}",
        "",
        "ops/step: ATen ops dispatched by the whole recipe (views left out); without clip: by "
        "the optimizer step alone (the clip's share differs by device: fusedopt's CPU norm of "
        "a large fp32 tensor is ~10 ops, clip.py). NS GFLOP: the Newton-Schulz GEMMs of one "
        "step, sum over matrices of 5 (4 r^2 c + 2 r^3) for r x c, r <= c; GFLOP/s: that over the "
        "median. Bytes per element beside the GEMMs: 66 both (fusedopt/optim/muon.py). "
        "speedup: torch median / fusedopt median; paired: median of the per-step ratios.", "",
        "| set (matrices, wide shapes) | elements | implementation | median ms | p20-p80 | "
        "ops/step | without clip | NS GFLOP | GFLOP/s | speedup | paired |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} ({r['matrices']}, {r['wide_shapes']}) | {r['numel'] / 1e6:.1f}M | "
            f"{r['impl']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
            f"{r['ops_per_step']} | {r['ops_without_clip']} | {r['ns_gflop']:.0f} | "
            f"{r['ns_gflops_per_s']:.0f} | "
            + (f"{r['speedup']:.2f}x | {r['paired_speedup']:.2f}x |" if "speedup" in r
               else "- | - |"))
    lines += ["", "## fusedopt against the torch recipe", ""]
    for r in rows:
        if "speedup" in r:
            lines.append(
                f"- {r['set']}: **{r['speedup']:.2f}x** (paired {r['paired_speedup']:.2f}x), "
                f"{r['ops_per_step']} ops/step; parameters after the first step differ by at most "
                f"{r['first_step_max_param_gap']:.2e} (bf16 Newton-Schulz rounding, lr "
                f"{KWARGS['lr']})")
    if any(r["profile_top_self_cpu_ms"] for r in rows):
        lines += ["", "## Where one step's time goes (torch profiler, self CPU ms of the top ATen "
                  "ops)", ""]
        for r in rows:
            if r["profile_top_self_cpu_ms"]:
                lines.append(f"- {r['set']}, {r['impl']}: " + ", ".join(
                    f"{name[6:]} {ms:.0f}" for name, ms in r["profile_top_self_cpu_ms"]))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the smoke set, 1 + 2 steps")
    parser.add_argument("--sets", default=None,
                        help=f"comma list from bench/shapes.py: {', '.join(shapes.NAMES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the torch profiler step (CPU: the ops taking the most time)")
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="where the files go (default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    defaults = dict(sets="smoke" if args.quick else "gpt2-small", steps=2 if args.quick else 5,
                    warmup=1, profile=True)
    args.sets = args.sets or defaults["sets"]
    args.steps = args.steps or defaults["steps"]
    report.split_names(parser, args, {"sets": shapes.NAMES})
    args.tag = report.run_tag("quick" if args.quick else "", report.changed_args(args, defaults))
    for name in args.sets:
        if not matrices(name):
            parser.error(f"shape set {name!r} has no 2-D shapes")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    busy = [measure.busy_cpus()]
    measure.warn_if_busy(busy[0], "at the start")
    rows = []
    for name in args.sets:
        rows += measure_set(name, args, device)
    busy.append(measure.busy_cpus())
    meta = dict(device=measure.device_name(device), device_type=device.type,
                versions=measure.versions(), fusedopt=fusedopt.__version__,
                commit=measure.commit(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                warmup=args.warmup, steps=args.steps,
                busy_cpus=" / ".join("-" if b is None else f"{b:.2f}" for b in busy))
    text = markdown(meta, rows)
    print(text)
    files = report.result_paths(args.out_dir, "muon", meta["device"], args.tag, ("md", "json"))
    files["md"].write_text(text)
    files["json"].write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {files['md']}, {files['json']}")


if __name__ == "__main__":
    main()
