"""Under FSDP2, how long is one clipped AdamW step (clip + update, on every rank's shards), and how
many collectives does it cost: torch.optim.AdamW + clip_grad_norm_ against fusedopt.AdamW?

    python bench/distributed.py                  # gpt-30m and gpt2-small, 2 gloo ranks on CPU
    python bench/distributed.py --quick          # the tiny model, 5 steps: a smoke run, ~5 s
    python bench/distributed.py --models gpt-30m --impls "torch fused,fusedopt (torch)"
    python bench/distributed.py --device cuda    # NCCL, one rank per GPU (needs >= 2 GPUs)

The model is bench/train.py's GPT with the LM head tied to the token embedding (GPT-2's layout;
gpt2-small has bench/shapes.py's 148 tensors and 124,439,808 parameters), wrapped with
``fully_shard`` per block and at the root on a 1-D mesh of all ranks. One forward and backward
give the gradients (FSDP2's own: reduce-scattered, each rank holding its shard); every step of
every implementation then starts from a copy of those same local gradients, restored untimed,
because both recipes rewrite .grad in place (clip_grad_norm_'s multiply; fusedopt's torch path
leaves the clipped gradient). Parameters and optimizer state are not restored: each step is a
real next step, and AdamW costs the same whatever the values (only its bias-correction scalars
change with the step count). The implementations take turns step by step (the order rotating),
so that load from other processes falls on all alike; all optimizers live at once, on the same
parameters.

Timed: from a barrier to the end of ``clip_grad_norm_(params, 1.0); opt.step()`` (torch) or of
``opt.step()`` (fusedopt, clip inside), CUDA synchronized on GPU. A step ends when its slowest
rank ends (the norm's all-reduce ties the ranks together), so each step counts as the max over
ranks; median and p10-p90 over the timed steps. Counted, in one more step of each: direct
``torch.distributed.all_reduce`` calls (fusedopt's) and every collective CommDebugMode sees
(DTensor's functional collectives, and direct c10d calls too). Checked: from the same parameters
and gradients, one first step of each implementation gives the same parameters as the first torch
recipe (torch.testing.assert_close's fp32 tolerance); its pre-clip norm is recorded beside.

The NCCL path (--device cuda, spawned ranks) is written but has not been run
(no multi-GPU machine yet); with one GPU, --device auto runs gloo on CPU and notes why.

On CPU each rank runs ``--threads`` intra-op threads (default: the CPUs / ranks, at least 1).
Writes Markdown (also printed) and JSON with every raw number to
<out-dir>/distributed-<device>-<date>[-<tag>][-N].{md,json} (bench/report.py's result_paths: no
tag for the default run, else 'quick' or the options that differ from the defaults; a same-day
run before it is kept, the new files get -2, -3, ...; --out-dir defaults to bench/results/ beside
this script). Progress goes to stderr.
"""
import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt
import measure  # bench/ is on sys.path when run as `python bench/distributed.py`
import report
import run
import shapes

# name -> bench/train.py's GPT(vocab, block, d_model, n_layer, n_head), head tied to the token
# embedding, and the one backward's batch (sequences x tokens). Median steps on the idle 2-core CI
# machine, 2 gloo ranks of 1 thread (bench/results/distributed-cpu-2026-11-29.md): gpt-30m 18-46 ms
# (fusedopt / torch fused / for-loop), gpt2-small 54-213 ms; ~1 min for the default run.
MODELS = {
    # train.py's CONFIG: 2 blocks of d_model 64, 28 tensors, 0.1M parameters; for --quick
    "tiny": dict(vocab=256, block=64, d_model=64, n_layer=2, n_head=4, batch=2, seq=64),
    # 8 blocks of d_model 512, vocab 8192: 100 tensors, 29.5M parameters
    "gpt-30m": dict(vocab=8192, block=256, d_model=512, n_layer=8, n_head=8, batch=2, seq=128),
    # GPT-2 small (124M): the tensors of bench/shapes.py's gpt2-small (checked when built)
    "gpt2-small": dict(vocab=50257, block=1024, d_model=768, n_layer=12, n_head=12, batch=2,
                       seq=128),
}
SHAPE_SETS = {"gpt2-small": "gpt2-small"}  # model -> the bench/shapes.py set it must match
OPT = "adamw"
TORCH_IMPLS = run.TORCH_IMPLS  # for-loop (torch's CPU default), foreach (its CUDA default), fused
OUR_IMPLS = run.OUR_IMPLS

DEFAULTS = {
    True: dict(models="tiny", steps=5, warmup=1),
    False: dict(models="gpt-30m,gpt2-small", steps=40, warmup=3),
}


# -- one rank ----------------------------------------------------------------------------------

def build(name: str, mesh, device, seed: int = 0):
    """The sharded model: the same initial weights on every rank, then fully_shard per block and
    at the root (the root holds tok, pos, ln_f and the tied head)."""
    from torch.distributed.fsdp import fully_shard
    from train import GPT
    cfg = MODELS[name]
    torch.manual_seed(seed)
    model = GPT(cfg["vocab"], cfg["block"], cfg["d_model"], cfg["n_layer"], cfg["n_head"])
    model.head.weight = model.tok.weight  # tied, as GPT-2
    if name in SHAPE_SETS:
        want = sorted(shapes.numel([s]) for s in shapes.get(SHAPE_SETS[name]))
        got = sorted(p.numel() for p in model.parameters())
        assert got == want, f"{name}: its tensors differ from bench/shapes.py's {SHAPE_SETS[name]}"
    model.to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_step(impl: str, params: list, backend_of: dict):
    """(optimizer, step, pre-clip norm getter) of ``impl`` over ``params``."""
    hyper = run.OPTIMIZERS[OPT][2]
    if impl in OUR_IMPLS:
        opt = fusedopt.AdamW(params, **hyper, max_grad_norm=run.MAX_NORM, backend=backend_of[impl])
        return opt, opt.step, lambda: opt.grad_norm
    flags = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True),
             "torch fused": dict(fused=True)}[impl]
    opt = torch.optim.AdamW(params, **hyper, **flags)
    norm = {}

    def step():  # the recipe as written in training loops: the clip's defaults, then the step
        norm["n"] = torch.nn.utils.clip_grad_norm_(params, run.MAX_NORM)
        opt.step()
    return opt, step, lambda: norm["n"]


def _max_abs_diff(a: list, b: list, device) -> torch.Tensor:
    """max |a - b| over two lists of tensors, in float64 (0 when all are empty)."""
    diff = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(a, b):
        if x.numel():
            diff = torch.maximum(diff, (x.double() - y.double()).abs().max())
    return diff


class CollectiveCounter:
    """Inside the block: ``all_reduce``, direct torch.distributed.all_reduce calls; ``comm``,
    every collective CommDebugMode saw, by op name (direct c10d calls included)."""

    def __enter__(self):
        from torch.distributed.tensor.debug import CommDebugMode
        self.all_reduce, self._real = 0, dist.all_reduce

        def counting(*a, **kw):
            self.all_reduce += 1
            return self._real(*a, **kw)
        dist.all_reduce = counting
        self._mode = CommDebugMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        dist.all_reduce = self._real
        self.comm = {str(op): n for op, n in self._mode.get_comm_counts().items()}
        return False


def bench_model(name, args, mesh, device, log) -> dict:
    from fusedopt._distributed import local
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = MODELS[name]
    model = build(name, mesh, device)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch, as in training
    idx = torch.randint(cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=gen).to(device)
    model(idx[:, :-1], idx[:, 1:]).backward()
    params = list(model.parameters())
    local_p, local_g = [local(p) for p in params], [local(p.grad) for p in params]
    master_p, master_g = [t.clone() for t in local_p], [t.clone() for t in local_g]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = dict(model=name, config=cfg, tensors=len(params), numel=sum(p.numel() for p in params),
               local_numel_per_rank=None, failed=[], rows=[])
    counts = [None] * world
    dist.all_gather_object(counts, sum(t.numel() for t in local_p))
    out["local_numel_per_rank"] = counts

    impls = list(args.impls)
    backend_of = {"fusedopt (torch)": "torch", "fusedopt (triton)": None}

    # first step of each from the same params and grads: the sanity check against the first
    steps, ref, ref_first = {}, None, None
    for impl in impls:
        torch._foreach_copy_(local_p, master_p)
        torch._foreach_copy_(local_g, master_g)
        try:  # torch's fused AdamW on DTensors, say: a refusal is a result, not a crash
            opt, step, norm = make_step(impl, params, backend_of)
            step()
            sync()
            error = None
        except Exception as e:  # noqa: BLE001  (reported below and in the files)
            error = f"{type(e).__name__}: {e}"
        errors = [None] * world
        dist.all_gather_object(errors, error)
        if any(errors):
            out["failed"].append(dict(impl=impl, error=next(e for e in errors if e)))
            log(f"{name}: {impl} failed on FSDP2's DTensors: {out['failed'][-1]['error']}")
            continue
        steps[impl] = (opt, step)
        n = norm()
        row = dict(impl=impl, reference_impl=ref, grad_norm=float(n.full_tensor() if hasattr(
            n, "full_tensor") else n))
        if ref_first is None:
            ref = row["reference_impl"] = impl
            ref_first = [t.clone() for t in local_p]
            row["first_step_max_abs_update"] = _max_abs_diff(ref_first, master_p, device).item()
        diff = _max_abs_diff(local_p, ref_first, device)
        try:
            torch.testing.assert_close(local_p, ref_first)
            far = torch.zeros((), dtype=torch.float64, device=device)
        except AssertionError:
            far = torch.ones((), dtype=torch.float64, device=device)
        flags = torch.stack([diff, far])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the worst rank's
        row.update(first_step_max_abs_diff=flags[0].item(), first_step_close=flags[1].item() == 0)
        out["rows"].append(row)
    del ref_first

    # timed steps, the implementations in turn
    impls = list(steps)
    if not impls:
        return out
    times = {impl: [] for impl in impls}
    for i in range(args.warmup + args.steps):
        k = i % len(impls)
        for impl in impls[k:] + impls[:k]:
            torch._foreach_copy_(local_g, master_g)
            sync()
            dist.barrier()
            start = time.perf_counter()
            steps[impl][1]()
            sync()
            if i >= args.warmup:
                times[impl].append((time.perf_counter() - start) * 1e3)
        if (i + 1) % 10 == 0 or i + 1 == args.warmup + args.steps:
            log(f"{name}: {i + 1}/{args.warmup + args.steps} steps of each (warm-up included)")

    for row in out["rows"]:
        impl = row["impl"]
        torch._foreach_copy_(local_g, master_g)
        sync()
        dist.barrier()
        with CollectiveCounter() as c:
            steps[impl][1]()
            sync()
        per_rank = [None] * world
        dist.all_gather_object(per_rank, dict(times=times[impl], all_reduce=c.all_reduce,
                                              comm=c.comm))
        row.update(times_ms_per_rank=[r["times"] for r in per_rank],
                   all_reduce_calls=per_rank[0]["all_reduce"], comm_counts=per_rank[0]["comm"],
                   counts_same_on_every_rank=all(r["all_reduce"] == per_rank[0]["all_reduce"]
                                                 and r["comm"] == per_rank[0]["comm"]
                                                 for r in per_rank))
    del steps
    return out


def rank_main(rank, world, store, args, result_path):
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            **kwargs)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world,))

        def log(msg):
            if rank == 0:
                print(msg, file=sys.stderr, flush=True)
        models = [bench_model(name, args, mesh, device, log) for name in args.models]
        if rank == 0:
            pathlib.Path(result_path).write_text(json.dumps(dict(
                models=models, device=measure.device_name(device), process_group=backend,
                threads_per_rank=torch.get_num_threads() if device.type == "cpu" else None)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- the report --------------------------------------------------------------------------------

def summarize(models: list[dict]) -> list[dict]:
    """Flat result rows: per step the max over ranks, then median and p10-p90; speedup against
    the fastest torch recipe of the same model, as a ratio of medians and paired: the median over
    rounds of (its step / this step) in the same round, which load from other processes moves
    less (within a round the implementations ran back to back)."""
    results = []
    for m in models:
        rows = []
        for r in m["rows"]:
            per_step = [max(ts) for ts in zip(*r["times_ms_per_rank"])]
            median = statistics.median(per_step)
            deciles = (statistics.quantiles(per_step, n=10, method="inclusive")
                       if len(per_step) > 1 else [median] * 9)
            rows.append(dict(
                model=m["model"], tensors=m["tensors"], numel=m["numel"],
                local_numel_per_rank=m["local_numel_per_rank"], impl=r["impl"],
                median_ms=median, p10_ms=deciles[0], p90_ms=deciles[-1],
                median_ms_per_rank=[statistics.median(ts) for ts in r["times_ms_per_rank"]],
                **{k: v for k, v in r.items() if k != "impl"}, max_over_ranks_ms=per_step))
        torch_rows = [q for q in rows if q["impl"] in TORCH_IMPLS]
        best = min(torch_rows, key=lambda q: q["median_ms"]) if torch_rows else None
        for q in rows:
            q.update(best_torch_impl=best and best["impl"],
                     speedup_vs_best_torch=best and best["median_ms"] / q["median_ms"],
                     paired_speedup_vs_best_torch=best and statistics.median(
                         b / t for b, t in zip(best["max_over_ranks_ms"], q["max_over_ranks_ms"])))
        results += rows
    return results


def _comm(counts: dict) -> str:
    return " + ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "0"


def markdown(meta: dict, models: list[dict], results: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        "# fusedopt distributed step: clip + AdamW under FSDP2 (fully_shard)", "",
        f"- device: {meta['device']}; {meta['world_size']} ranks, process group "
        f"{meta['process_group']}" + (f", {meta['threads_per_rank']} torch thread(s) per rank"
                                      if meta["threads_per_rank"] else ""),
        f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, Python {v['python']}, "
        f"fusedopt {meta['fusedopt']}, commit {meta['commit']}",
        f"- date: {meta['date']}; {meta['warmup']} warm-up + {meta['steps']} timed steps per row, "
        "implementations in turn; AdamW lr 1e-3, weight_decay 0.01, max_grad_norm "
        f"{meta['max_grad_norm']}; fp32",
        f"- CPUs busy with other work at start / end: {meta['busy_cpus']}",
    ] + [f"- note: {n}" for n in meta["notes"]] + [
        "", "What is timed: clip + step only, from the same FSDP2 gradients (one backward, "
        "restored untimed before every step, as both recipes rewrite .grad); parameters and "
        "optimizer state go on from step to step (AdamW's cost does not depend on their values); "
        "the implementations take turns, all on the same sharded parameters, a barrier before "
        "each step; a step lasts as long as its slowest rank.", "",
        "ms of clip + step, per step the slowest rank; median (p10-p90); per-rank medians; "
        "speedup: fastest torch median / this median; all_reduce: direct "
        "torch.distributed.all_reduce calls per step; CommDebugMode: every collective it sees per "
        "step (DTensor's and direct c10d calls); pre-clip norm: clip_grad_norm_'s return, "
        "fusedopt's grad_norm (clipped when > max_grad_norm); first step: max |param - first "
        "row's| after one step from the same params and grads, over ranks (the first row: its max "
        "|update|), and whether torch.testing.assert_close holds on every rank.", "",
        "| model (tensors, params) | implementation | median ms | p10-p90 | per rank | speedup "
        "| all_reduce | CommDebugMode | pre-clip norm | first step |",
        "|---|---|---:|---|---|---:|---:|---|---:|---|",
    ]
    for r in results:
        first = (f"reference (max update {r['first_step_max_abs_update']:.2g})"
                 if r["impl"] == r["reference_impl"] else f"{r['first_step_max_abs_diff']:.2g}, "
                 + ("close" if r["first_step_close"] else "**NOT close**"))
        lines.append(
            f"| {r['model']} ({r['tensors']} t, {r['numel'] / 1e6:.1f}M) | {r['impl']} | "
            f"{r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | "
            f"{' / '.join(f'{x:.2f}' for x in r['median_ms_per_rank'])} | "
            f"{report._fmt(r['speedup_vs_best_torch'], '.2f')}{'x' if r['best_torch_impl'] else ''}"
            f" | {r['all_reduce_calls']} | "
            f"{_comm(r['comm_counts'])} | {r['grad_norm']:.4g} | {first} |")
    lines += ["", "## fusedopt against the fastest torch recipe", ""]
    for r in results:
        if r["impl"] in OUR_IMPLS and r["best_torch_impl"]:
            best = next(q for q in results if q["model"] == r["model"]
                        and q["impl"] == r["best_torch_impl"])
            lines.append(f"- {r['model']}, {r['impl']}: **{r['speedup_vs_best_torch']:.2f}x** "
                         f"({r['best_torch_impl']} + clip_grad_norm_ {best['median_ms']:.2f} ms "
                         f"-> {r['median_ms']:.2f} ms); paired by round: "
                         f"**{r['paired_speedup_vs_best_torch']:.2f}x**")
    lines += ["", "## Checks", ""]
    for m in models:
        rows = [r for r in results if r["model"] == m["model"]]
        if any(r["impl"] == "torch fused" for r in rows):
            lines.append(f"- {m['model']}: torch.optim.AdamW(fused=True) steps FSDP2's DTensors "
                         f"on {meta['device_type']}")
        for f in m["failed"]:
            lines.append(f"- {m['model']}: {f['impl']} failed on FSDP2's DTensors: {f['error']}")
        far = [r["impl"] for r in rows if not r["first_step_close"]]
        lines.append(f"- {m['model']}: after one step from the same params and grads, "
                     + (f"**NOT close** to {rows[0]['reference_impl']}: {', '.join(far)}" if far
                        else f"every implementation is close to {rows[0]['reference_impl']} "
                        f"(max |diff| {max(r['first_step_max_abs_diff'] for r in rows):.2g})"))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: NCCL with one rank per GPU when there are >= 2, else gloo "
                        "on CPU")
    parser.add_argument("--world-size", type=int, help="ranks (CPU default 2; CUDA: the GPUs)")
    parser.add_argument("--threads", type=int, help="torch threads per rank on CPU "
                        "(default: the CPUs / ranks, at least 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (see DEFAULTS)")
    parser.add_argument("--models", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--impls", help="comma list of " + ", ".join(TORCH_IMPLS + OUR_IMPLS)
                        + " (default: all that run on the device)")
    parser.add_argument("--steps", type=int, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, help="untimed steps first (>= 1)")
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="where the files go (default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    args.notes = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "auto":
        args.device = "cuda" if gpus >= 2 else "cpu"
        if gpus == 1:
            args.notes.append("one GPU only: NCCL needs one rank per GPU, so the NCCL run is "
                              "skipped and the ranks run gloo on CPU")
    if args.device == "cuda" and gpus < 2:
        parser.error(f"--device cuda needs >= 2 GPUs (one NCCL rank each); found {gpus}")
    if args.world_size is None:
        args.world_size = gpus if args.device == "cuda" else 2
    if args.world_size < 1 or (args.device == "cuda" and args.world_size > gpus):
        parser.error(f"--world-size {args.world_size}: need 1 <= ranks"
                     + (f" <= {gpus} GPUs" if args.device == "cuda" else ""))
    defaults = dict(DEFAULTS[args.quick],
                    impls=",".join(TORCH_IMPLS + OUR_IMPLS[:2 if args.device == "cuda" else 1]),
                    world_size=gpus if args.device == "cuda" else 2,
                    threads=max(1, (os.cpu_count() or 1) // args.world_size))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    report.split_names(parser, args, {"models": MODELS, "impls": TORCH_IMPLS + OUR_IMPLS})
    args.tag = report.run_tag("quick" if args.quick else "",
                              report.changed_args(args, defaults))
    if args.device == "cpu" and "fusedopt (triton)" in args.impls:
        parser.error("fusedopt (triton) needs CUDA tensors")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch.distributed.fsdp  # noqa: F401  (imported once here, before forked ranks need it)
    import torch.distributed.tensor.debug  # noqa: F401
    import train  # noqa: F401
    meta = dict(versions=measure.versions(), fusedopt=fusedopt.__version__, commit=measure.commit(),
                world_size=args.world_size, steps=args.steps, warmup=args.warmup,
                max_grad_norm=run.MAX_NORM, quick=args.quick, models=args.models,
                impls=args.impls, date=datetime.datetime.now().isoformat(timespec="seconds"))
    busy_start = measure.busy_cpus() if args.device == "cpu" else None
    measure.warn_if_busy(busy_start, "at start")
    with tempfile.TemporaryDirectory() as tmp:
        result = pathlib.Path(tmp) / "result.json"
        # CPU: forked ranks inherit the imports (4-5 s a rank on the 2-core machine with spawn);
        # CUDA: spawned, as a CUDA context must not cross a fork
        mp.start_processes(rank_main, args=(args.world_size, os.path.join(tmp, "store"), args,
                                            str(result)), nprocs=args.world_size, join=True,
                           start_method="spawn" if args.device == "cuda" else "fork")
        ranks = json.loads(result.read_text())
    busy_end = measure.busy_cpus() if args.device == "cpu" else None
    measure.warn_if_busy(busy_end, "at the end")
    meta.update(device=ranks["device"], device_type=args.device,
                process_group=ranks["process_group"], threads_per_rank=ranks["threads_per_rank"],
                busy_cpus=("-" if busy_start is None or busy_end is None
                           else f"{busy_start:.2f} / {busy_end:.2f}"),
                notes=args.notes, fusedopt_backend_of={"fusedopt (torch)": "torch",
                                                       "fusedopt (triton)": "triton (default)"})
    if args.device == "cpu":
        meta["notes"].append("torch's own default on CPU is the for-loop AdamW (foreach=None); "
                             "on CUDA it is foreach")
    results = summarize(ranks["models"])
    files = report.result_paths(args.out_dir, "distributed", meta["device"], args.tag,
                                ("md", "json"))
    text = markdown(meta, ranks["models"], results)
    files["md"].write_text(text)
    with open(files["json"], "w") as f:  # report.write_json's layout, plus the per-model facts
        json.dump({"meta": meta, "models": [{k: v for k, v in m.items() if k != "rows"}
                                            for m in ranks["models"]], "results": results},
                  f, indent=1)
    print(text)
    print(f"wrote {files['md']}, {files['json']}")


if __name__ == "__main__":
    main()
