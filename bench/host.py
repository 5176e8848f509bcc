"""How much host time (Python, table building, dispatch) does one clipped optimizer step cost, per
tensor, with the GPU work taken away? Measured on CPU, no GPU needed.

    python bench/host.py                   # full: ~1 min on 2 CPU cores
    python bench/host.py --quick           # a smoke run: ~10 s, most of it imports
    python bench/host.py --sets many-small --optimizers adamw --steps 500 --out-dir /tmp/host

fusedopt side: the real fusedopt.AdamW / SGD with backend="triton" on CPU tensors (allowed under
TRITON_INTERPRET=1, set below before triton is imported), every ``*_kernel`` in fusedopt.kernels
replaced by NullKernel, whose ``[grid]`` counts the launch and returns a function that does
nothing. Everything up to the launch is the real code: gather, checks, plan and table keys, grad
addresses, table rebuilds, the launch arguments. Not measured: Triton's own launch path
(JITFunction.run: argument binding, cache lookup, driver call; a constant per launch, not per
tensor) and, on CUDA, the pinned-memory copy and host-to-device copy of a changed table. On CPU
``_multi_tensor.to_device`` is ``.to("cpu")`` of a CPU tensor, which returns it as is: no copy.

torch side: clip_grad_norm_(params, 1.0, foreach=True) + torch.optim.X(fused=True) (and
foreach=True) on as many tensors of 1 element each, so that the arithmetic is negligible and what
remains is host cost. It is torch's CPU dispatch path (CPU foreach ops loop over tensors one by
one; CPU fused ops run a parallel_for per tensor), not the CUDA one, where foreach ops and fused
optimizers launch multi_tensor_apply kernels over many tensors at once: a reference point, not a
stand-in for the CUDA torch recipe.

Grads, per scenario: "fresh" = new grad tensors before every step (as zero_grad(set_to_none=True)
+ backward), allocated while the old ones are still alive so that the addresses change every step,
allocation untimed; "persistent" = the same grads, zero_grad(set_to_none=False) between steps
(untimed); "flat" = fusedopt's flat-grad mode, when the optimizers offer one. Only opt.step() (and
the torch recipe's clip_grad_norm_) is timed. Writes Markdown (also printed) and JSON to
<out-dir>/host-<device>-<date>[-<tag>][-N].{md,json}, and a cProfile of fusedopt AdamW on the
largest set beside them (-profile.txt); bench/report.py's result_paths: no tag for the default
run, else 'quick' or the options that differ from the defaults, -2, -3, ... rather than over
another run's files; --out-dir defaults to bench/results/ beside this script. Shapes come from
bench/shapes.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: fusedopt/_dispatch.py reads it

import argparse  # noqa: E402  (after the environment variable above)
import cProfile  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import pkgutil  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

import fusedopt  # noqa: E402
import measure  # noqa: E402  (bench/ is on sys.path when run as `python bench/host.py`)
import report  # noqa: E402
import run  # noqa: E402  (OPTIMIZERS, MAX_NORM: the same hyperparameters as the step benchmark)
import shapes  # noqa: E402

OPTIMIZERS = ("adamw", "sgd")
GRADS = ("fresh", "persistent")
TARGET_US_PER_TENSOR = 0.5  # issue 9, item 15: steady-state host cost per tensor
FUSEDOPT, FUSEDOPT_1 = "fusedopt triton, kernels stubbed", "fusedopt triton, 1-elt tensors"
TORCH_FUSED, TORCH_FOREACH = "torch fused + clip (CPU dispatch)", "torch foreach + clip (CPU dispatch)"
TORCH_CLIP = "torch clip_grad_norm_ alone (CPU dispatch)"
# (quick) -> defaults. The 1-element fusedopt rows check that element count does not matter, and
# keep the quick run quick (GPT-2's real sizes mean 2 GB of params, grads and AdamW state to fill)
DEFAULTS = {
    True: dict(sets="gpt2-small,many-small", steps=10, warmup=2,
               impls=(FUSEDOPT_1, TORCH_FUSED)),
    False: dict(sets="gpt2-small,many-small", steps=200, warmup=10,
                impls=(FUSEDOPT, FUSEDOPT_1, TORCH_FUSED, TORCH_FOREACH, TORCH_CLIP)),
}


class NullKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` counts one launch in
    ``counts`` and does nothing else (tests/conftest.py's LaunchCounter, without the kernel)."""

    def __init__(self, name: str, counts: dict):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return _do_nothing


def _do_nothing(*args, **kwargs):
    return None


def stub_kernels(counts: dict) -> list[str]:
    """Replace every ``_*_kernel`` Triton function in fusedopt.kernels (STYLE.md names them so) by
    a NullKernel counting into ``counts``; returns what was replaced. A kernel left unstubbed would
    run in the interpreter (milliseconds a program) and swamp what is measured."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    import fusedopt.kernels as kernels
    replaced = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fusedopt.kernels.{info.name}")
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(obj, (triton.runtime.jit.JITFunction,
                                                             InterpretedFunction)):
                setattr(module, name, NullKernel(name, counts))
                replaced.append(f"{info.name}.{name}")
    missing = {"norm._norm_kernel", "update._update_kernel"} - set(replaced)
    if missing:
        raise RuntimeError(f"kernels not found to stub: {sorted(missing)}")
    return replaced


def flat_grads_note() -> str:
    """Whether fusedopt offers a flat-grad mode (scenario "flat"); this script has none to run yet."""
    names = sorted({n for cls in (fusedopt.AdamW, fusedopt.SGD) for n in dir(cls)
                    if "flat" in n.lower() and not n.startswith("__")})
    if not names:
        return "fusedopt offers no flat-grad mode (no 'flat' name on AdamW/SGD): scenario skipped"
    return (f"fusedopt now has {', '.join(names)}: bench/host.py has no scenario for it yet "
            "(add one to GRADS and make_case)")


def make_case(opt: str, impl: str, shape_list: list, grads: str):
    """(step, prepare, changed) for one row: ``prepare`` runs untimed before each step;
    ``changed`` counts the prepared steps whose grad addresses all differ from the last ones'."""
    torch_cls, our_cls, hyper = run.OPTIMIZERS[opt]
    ours = impl in (FUSEDOPT, FUSEDOPT_1)
    if impl != FUSEDOPT:
        shape_list = [(1,)] * len(shape_list)  # same tensor count, negligible arithmetic
    params = [torch.zeros(s, requires_grad=True) for s in shape_list]
    if ours:
        optimizer = our_cls(params, **hyper, max_grad_norm=run.MAX_NORM, backend="triton")
        step = optimizer.step
    else:
        flags = dict(fused=True) if impl == TORCH_FUSED else dict(foreach=True)
        optimizer = torch_cls(params, **hyper, **flags)

        def step():
            torch.nn.utils.clip_grad_norm_(params, run.MAX_NORM, foreach=True)
            if impl != TORCH_CLIP:
                optimizer.step()
    changed = [0, 0]

    def new_grads():
        # the old grads stay alive until the new ones exist, so that no address is handed back
        old = [p.grad for p in params]
        # fusedopt: left uninitialized, no stubbed kernel reads them; torch: 1 element each, ones
        # so that its math sees finite numbers
        fresh = [(torch.empty_like if ours else torch.ones_like)(p) for p in params]
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, fresh):
            p.grad = g
        changed[0] += all(o is None or g.data_ptr() != o.data_ptr() for g, o in zip(fresh, old))
        changed[1] += 1
        del old

    if grads == "fresh":
        prepare = new_grads
    else:
        new_grads()

        def prepare():
            optimizer.zero_grad(set_to_none=False)
    return step, prepare, changed


def measure_row(opt, impl, set_name, grads, args, counts) -> dict:
    shape_list = shapes.get(set_name)
    step, prepare, changed = make_case(opt, impl, shape_list, grads)
    times_us = [t * 1e3 for t in measure.time_steps(step, prepare, args.warmup, args.steps,
                                                     torch.device("cpu"))]
    launches = None
    if impl in (FUSEDOPT, FUSEDOPT_1):  # one more step, counted alone
        prepare()
        before = dict(counts)
        step()
        launches = {k: v - before.get(k, 0) for k, v in counts.items() if v != before.get(k, 0)}
    n = len(shape_list)
    median = statistics.median(times_us)
    q = statistics.quantiles(times_us, n=5, method="inclusive") if len(times_us) > 1 else [median] * 4
    elements = "real" if impl == FUSEDOPT else "1 each"
    row = dict(set=set_name, tensors=n, numel=shapes.numel(shape_list) if elements == "real" else n,
               elements=elements, optimizer="-" if impl == TORCH_CLIP else opt, grads=grads,
               impl=impl, median_us=median, p20_us=q[0], p80_us=q[-1], us_per_tensor=median / n,
               launches=launches,
               grad_addresses_changed=(f"{changed[0]}/{changed[1]} steps" if grads == "fresh"
                                       else None),
               times_us=times_us)
    del step, prepare
    if impl == FUSEDOPT:  # real sizes: free them now (a collection costs ~0.4 s with dynamo loaded)
        gc.collect()
    return row


def profile_text(set_name: str, args) -> str:
    """cProfile of fusedopt AdamW steps on ``set_name``, both grads scenarios: the top 15 entries
    by cumulative and by own time, in microseconds per step (what to read when optimizing the
    host path). cProfile's own cost inflates every figure (about 2x here): read the shares."""
    out = io.StringIO()
    steps = max(args.steps // 2, 5)
    n = len(shapes.get(set_name))
    for grads in GRADS:
        step, prepare, _ = make_case("adamw", FUSEDOPT, shapes.get(set_name), grads)
        for _ in range(args.warmup):
            prepare()
            step()
        profiler = cProfile.Profile()
        for _ in range(steps):
            prepare()  # not profiled
            profiler.enable()
            step()
            profiler.disable()
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (prim calls, calls, own, cum, callers)
        total = max(ct for _, _, _, ct, _ in stats.values())
        for sort, col in (("cumulative", 3), ("own", 2)):
            out.write(f"## fusedopt AdamW, {set_name} ({n} tensors), {grads} grads: {steps} steps "
                      f"under cProfile, {total / steps * 1e6:.0f} us a step; top 15 by {sort} time\n")
            out.write(f"{'calls/step':>10} {'own us/step':>12} {'cum us/step':>12}  function\n")
            top = sorted(stats.items(), key=lambda kv: kv[1][col], reverse=True)[:15]
            for (file, line, name), (_, calls, own, cum, _) in top:
                where = f"{pathlib.Path(file).name}:{line}({name})" if line else name
                out.write(f"{calls / steps:>10.0f} {own / steps * 1e6:>12.1f} "
                          f"{cum / steps * 1e6:>12.1f}  {where}\n")
            out.write("\n")
        del step, prepare
        gc.collect()
    return out.getvalue()


def markdown(meta: dict, results: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        "# fusedopt host overhead: one clipped step with the GPU work taken away", "",
        f"- device: {meta['device']}",
        f"- torch {v['torch']}, triton {v['triton']}, Python {v['python']}, fusedopt "
        f"{meta['fusedopt']}, commit {meta['commit']}",
        f"- date: {meta['date']}; {meta['warmup']} warm-up + {meta['steps']} timed steps per row; "
        "wall time of opt.step() (+ clip_grad_norm_ for torch)",
        f"- max_grad_norm {meta['max_grad_norm']}; AdamW lr 1e-3, weight_decay 0.01; SGD lr 1e-3, "
        "momentum 0.9 (bench/run.py's OPTIMIZERS)",
        f"- stubbed kernels: {', '.join(meta['stubbed_kernels'])}; {meta['flat_grads']}",
        f"- CPUs busy with other work at start / end: {meta['busy_cpus']}",
        "", "fusedopt rows run the real fusedopt step with backend='triton' on CPU tensors, every "
        "kernel launch replaced by a no-op (launches: counted per step); table copies are no-ops on "
        "CPU (`.to('cpu')` of a CPU tensor), Triton's own launch path is not run. torch rows run "
        "torch's CPU dispatch path on 1-element tensors, not its CUDA path (whose foreach and fused "
        "ops cover many tensors per launch). fresh: new grads before each step (untimed), at new "
        "addresses; persistent: zero_grad(set_to_none=False) between steps (untimed). On CPU that "
        "zeroing writes the grads in host memory (0.5 GB for GPT-2 at real sizes) and evicts the "
        "host caches before the timed step, which a GPU's zeroing in device memory does not: the "
        "1-element fusedopt rows show the same step with the caches as a GPU run leaves them. "
        f"Target for fusedopt: <= {TARGET_US_PER_TENSOR} us/tensor.", "",
        "| set (tensors) | elements | optimizer | grads | implementation | median us/step "
        "| p20-p80 | us/tensor | launches/step |",
        "|---|---|---|---|---|---:|---|---:|---|",
    ]
    for r in results:
        launches = "-" if r["launches"] is None else " + ".join(
            f"{v} {k}" for k, v in sorted(r["launches"].items())) or "0"
        lines.append(
            f"| {r['set']} ({r['tensors']}) | {r['elements']} | {r['optimizer']} | {r['grads']} | "
            f"{r['impl']} | {r['median_us']:.1f} | {r['p20_us']:.1f}-{r['p80_us']:.1f} | "
            f"{r['us_per_tensor']:.3f} | {launches} |")
    lines += ["", "## fusedopt against the target and the torch recipe", ""]
    for r in results:
        if r["impl"] not in (FUSEDOPT, FUSEDOPT_1):
            continue
        same = [q for q in results if q["impl"] == TORCH_FUSED and all(
            q[k] == r[k] for k in ("set", "optimizer", "grads"))]
        vs_torch = (f"; torch fused + clip on CPU: {same[0]['us_per_tensor']:.2f} us/tensor"
                    if same else "")
        lines.append(f"- {r['set']} {r['optimizer']} {r['grads']} grads, {r['elements']} elements: "
                     f"**{r['us_per_tensor']:.3f} us/tensor** "
                     f"({r['us_per_tensor'] / TARGET_US_PER_TENSOR:.1f}x the target){vs_torch}")
    lines.append("")
    if meta.get("profile"):
        lines.append(f"cProfile of fusedopt AdamW steps: {meta['profile']}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, fewer rows")
    parser.add_argument("--sets", help=f"comma list from bench/shapes.py: {', '.join(shapes.NAMES)}")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma list of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps first (>= 1: state and tables "
                        "are made then)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile file")
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="where the files go (default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.quick].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    report.split_names(parser, args, {"sets": shapes.NAMES, "optimizers": OPTIMIZERS})
    defaults = {k: v for k, v in DEFAULTS[args.quick].items() if k != "impls"}  # impls: no option
    defaults = dict(sets=defaults.pop("sets"), optimizers=",".join(OPTIMIZERS), **defaults,
                    no_profile=False)
    args.tag = report.run_tag("quick" if args.quick else "", report.changed_args(args, defaults))
    return args


def main(argv=None):
    args = parse_args(argv)
    counts: dict = {}
    cpu = torch.device("cpu")
    meta = dict(device=measure.device_name(cpu), versions=measure.versions(),
                fusedopt=fusedopt.__version__, commit=measure.commit(), steps=args.steps,
                warmup=args.warmup, max_grad_norm=run.MAX_NORM, quick=args.quick,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                stubbed_kernels=stub_kernels(counts), flat_grads=flat_grads_note(),
                target_us_per_tensor=TARGET_US_PER_TENSOR)
    busy_start = measure.busy_cpus()
    measure.warn_if_busy(busy_start, "at start")
    results = []
    rows = [(s, o, g, i) for s in args.sets for o in args.optimizers for g in GRADS
            for i in args.impls if not (i == TORCH_CLIP and o != args.optimizers[0])]
    for k, (set_name, opt, grads, impl) in enumerate(rows, 1):
        r = measure_row(opt, impl, set_name, grads, args, counts)
        results.append(r)
        print(f"[{k}/{len(rows)}] {set_name} {opt} {grads} {impl}: {r['median_us']:.1f} us/step, "
              f"{r['us_per_tensor']:.3f} us/tensor", file=sys.stderr, flush=True)
    busy_end = measure.busy_cpus()
    measure.warn_if_busy(busy_end, "at the end")
    meta["busy_cpus"] = ("-" if busy_start is None or busy_end is None
                         else f"{busy_start:.2f} / {busy_end:.2f}")

    paths = report.result_paths(args.out_dir, "host", meta["device"], args.tag,
                                ("md", "json", "-profile.txt"))
    files = [paths["md"], paths["json"]]
    if not args.no_profile:
        largest = max(args.sets, key=lambda s: len(shapes.get(s)))
        files.append(paths["-profile.txt"])
        files[2].write_text(profile_text(largest, args))
        meta["profile"] = files[2].name
    text = markdown(meta, results)
    files[0].write_text(text)
    report.write_json(files[1], meta, results)
    print(text)
    print(f"wrote {', '.join(map(str, files))}")


if __name__ == "__main__":
    main()
