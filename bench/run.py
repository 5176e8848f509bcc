"""Time one whole optimizer step (global-norm clip + update) of fusedopt against torch's recipes.

The one question: how much faster is ``fusedopt.X(..., max_grad_norm=1.0).step()`` than the best
of torch's ``clip_grad_norm_(params, 1.0)`` + ``torch.optim.X.step()``, per shape set?

    python bench/run.py                                   # gpt2-small and many-small, SGD and AdamW
    python bench/run.py --shapes smoke --steps 3 --warmup 1
    python bench/run.py --optimizers sgd,adam,adamw --dtype bfloat16 --json out.json

Markdown on stdout, one progress line per measurement on stderr. Shapes come from bench/shapes.py.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

import fusedopt
import shapes  # bench/shapes.py: run as `python bench/run.py`, the script's folder is on sys.path

MAX_NORM = 1.0  # clip_grad_norm_(params, 1.0), norm type 2; random grads have a norm >> 1: clip active

# name -> (torch class, fusedopt class, hyperparameters shared by every implementation)
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, fusedopt.SGD, dict(lr=1e-3, momentum=0.9)),
    "adam": (torch.optim.Adam, fusedopt.Adam, dict(lr=1e-3)),
    "adamw": (torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}
TORCH_IMPLS = ("torch for-loop", "torch foreach", "torch fused")
OUR_IMPLS = ("fusedopt (torch)", "fusedopt (triton)")


def impls_for(device: torch.device) -> tuple[str, ...]:
    """Every implementation that can run on ``device``: the Triton kernels only on CUDA."""
    from fusedopt._dispatch import triton_unavailable_reason
    triton_ok = device.type == "cuda" and triton_unavailable_reason({device}) is None
    return TORCH_IMPLS + OUR_IMPLS[:2 if triton_ok else 1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bytes_per_element(opt: str, impl: str, elt_size: int) -> int:
    """Bytes one step moves per parameter element: whole-tensor reads + writes, x ``elt_size``.

    Counted from the kernels each implementation runs (torch 2.13: torch/optim/{sgd,adam}.py,
    torch/nn/utils/clip_grad.py); step counters and norms are a few bytes in all and not counted.
    A kernel reading one tensor twice (addcmul_(g, g)) counts it once.

    Clip. torch, every recipe: the norm reads g (1), then mul_ by the clip coefficient reads and
    writes g (2) = 3; clip_grad_norm_ always multiplies (no host branch). fusedopt, both backends:
    the norm reads g (1). Torch backend: the multiply is folded into the update as ``grad_scale``,
    and torch's fused op then also writes the clipped g back (checked on CPU: .grad changes only
    when grad_scale is passed). Triton backend: the kernel scales g in registers, never writes it.

    Update, steady state (momentum buffers / moments exist):
      SGD momentum   fused      p, g, buf -> p, buf                                       5
                     foreach,   buf.mul_ 2, buf.add_(g) 3, p.add_(buf) 3                  8
                     for-loop
                     fo. torch  p, g, buf -> p, buf, g                                    6
                     fo. triton p, g, buf -> p, buf                                       5
      Adam / AdamW   fused      p, g, m, v -> p, m, v                                     7
                     foreach,   AdamW only: p.mul_(1 - lr wd) 2; m.lerp_(g) 3,
                     for-loop   v.mul_ 2, v.addcmul_(g, g) 3, d = sqrt(v) 2, d.div_ 2,
                                d.add_(eps) 2, p.addcdiv_(m, d) 4                  18 / AdamW 20
                     fo. torch  p, g, m, v -> p, m, v, g                                  8
                     fo. triton p, g, m, v -> p, m, v                                     7
    Totals (clip + update): SGD 11 / 8 / 7 / 6, Adam 21 / 10 / 9 / 8, AdamW 23 / 10 / 9 / 8 for
    foreach-or-for-loop / fused / fusedopt torch / fusedopt triton: fp32 AdamW is 92 / 40 / 36 /
    32 bytes per element (DESIGN.md's budget: 40 -> 32).
    """
    clip = 1 if impl in OUR_IMPLS else 3
    if opt == "sgd":
        update = {"torch fused": 5, "fusedopt (torch)": 6, "fusedopt (triton)": 5}.get(impl, 8)
    else:
        update = {"torch fused": 7, "fusedopt (torch)": 8, "fusedopt (triton)": 7}.get(
            impl, 20 if opt == "adamw" else 18)
    return (clip + update) * elt_size


def make_step(opt: str, impl: str, params: list[torch.Tensor]):
    """One step of ``impl``, clip included, over ``params`` (their .grad set): a no-argument callable."""
    torch_cls, fused_cls, hyper = OPTIMIZERS[opt]
    if impl in OUR_IMPLS:
        backend = impl.split("(")[1].rstrip(")")
        return fused_cls(params, **hyper, max_grad_norm=MAX_NORM, backend=backend).step
    flags = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True),
             "torch fused": dict(fused=True)}[impl]
    optimizer = torch_cls(params, **hyper, **flags)
    foreach_clip = impl != "torch for-loop"

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=foreach_clip)
        optimizer.step()
    return step


def time_impl(opt, impl, master_params, master_grads, warmup, steps, device) -> list[float]:
    """ms per step for ``steps`` steps after ``warmup``, on fresh copies of the params and grads."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [m.clone().requires_grad_() for m in master_params]
    for p, g in zip(params, master_grads):
        p.grad = g.clone()
    grads = [p.grad for p in params]
    step = make_step(opt, impl, params)
    times = []
    for i in range(warmup + steps):
        # clipping rewrote .grad: restore it, outside the timed region
        torch._foreach_copy_(grads, master_grads)
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    del step, params, grads  # the optimizer state goes with the step; gpt2-small AdamW is 2 GB
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} torch threads"


def busy_cpus(seconds: float = 0.5) -> float | None:
    """How many CPUs other processes keep busy, sampled from /proc/stat while this one sleeps.

    On CPU a neighbour matters a lot: torch's fused CPU ops open an OpenMP parallel region even
    for tiny tensors, and each waits for a busy core (seen on 2 cores with a pytest run beside:
    the smoke step took 8-32 ms, in multiples of 4 ms, instead of 0.3 ms).
    """
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        # all CPUs' busy seconds, wall seconds x CPUs, and this process's own CPU seconds (its
        # OpenMP workers may still be spinning after the last parallel region)
        hz = os.sysconf("SC_CLK_TCK")
        return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, time.process_time()
    try:
        busy0, total0, own0 = sample()
        time.sleep(seconds)
        busy1, total1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return max(0.0, cpus * ((busy1 - busy0) - (own1 - own0)) / max(total1 - total0, 1e-9))


def warn_if_busy(busy: float | None, when: str) -> None:
    if busy is not None and busy > 0.25:
        print(f"warning: other processes kept {busy:.1f} CPUs busy {when}; the timings may show it",
              file=sys.stderr)


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gpt2-small,many-small",
                        help=f"comma list of shape sets from bench/shapes.py: {', '.join(shapes.NAMES)}")
    parser.add_argument("--optimizers", default="sgd,adamw",
                        help=f"comma list of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (>= 1: the first step allocates the state)")
    parser.add_argument("--json", metavar="PATH", help="also write every per-step time here")
    args = parser.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.optimizers = args.optimizers.split(",")
    for name in args.shapes:
        if name not in shapes.NAMES:
            parser.error(f"unknown shape set {name!r}; known: {', '.join(shapes.NAMES)}")
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    return args


def print_report(meta: dict, results: list[dict]) -> None:
    """The markdown report: header, one row per measurement, then the headline ratios."""
    busy = " / ".join("unknown" if b is None else f"{b:.2f}"
                      for b in (meta["busy_cpus_at_start"], meta["busy_cpus_at_end"]))
    print(f"# fusedopt step benchmark: clip_grad_norm_({MAX_NORM}) + update\n")
    print(f"- device: {meta['device']}\n- torch {meta['torch']}, triton {meta['triton']}, "
          f"fusedopt {meta['fusedopt']}\n- dtype {meta['dtype']}, {meta['warmup']} warm-up + "
          f"{meta['steps']} timed steps, wall time per step\n- date: {meta['date']}, CPUs busy "
          f"with other work at start / end: {busy}\n")
    print("| shapes | optimizer | impl | median ms | min ms | max ms | vs best torch | B/elem | GB/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shapes']} ({r['tensors']} tensors, {r['numel'] / 1e6:.1f}M) | {r['optimizer']} | "
              f"{r['impl']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['max_ms']:.3f} | "
              f"{r['speedup_vs_best_torch']:.2f}x | {r['bytes_per_element']} | {r['gb_per_s']:.1f} |")
    print("\nvs best torch = (fastest torch median) / (this median); > 1 is faster. B/elem: bytes "
          "each impl moves per element (bytes_per_element in bench/run.py); GB/s = B/elem * elements "
          "/ median.\n")
    print("## fusedopt vs the best torch baseline\n")
    by_key = {(r["shapes"], r["optimizer"], r["impl"]): r for r in results}
    for r in results:
        if r["impl"] in OUR_IMPLS:
            best = by_key[(r["shapes"], r["optimizer"], r["best_torch_impl"])]
            print(f"- {r['shapes']}, {r['optimizer']}, {r['impl']}: **{r['speedup_vs_best_torch']:.2f}x** "
                  f"({best['impl']} {best['median_ms']:.3f} ms -> {r['median_ms']:.3f} ms)")


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    elt_size = torch.empty((), dtype=dtype).element_size()
    meta = {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
        "fusedopt": fusedopt.__version__, "dtype": args.dtype, "steps": args.steps,
        "warmup": args.warmup, "max_grad_norm": MAX_NORM,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "busy_cpus_at_start": busy_cpus(),
    }
    warn_if_busy(meta["busy_cpus_at_start"], "at start")
    results = []
    impls = impls_for(device)
    total = len(args.shapes) * len(args.optimizers) * len(impls)
    for set_name in args.shapes:
        shape_list = shapes.get(set_name)
        n = shapes.numel(shape_list)
        gen = torch.Generator(device=device).manual_seed(0)
        master_params = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shape_list]
        master_grads = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shape_list]
        for opt in args.optimizers:
            for impl in impls:
                times = time_impl(opt, impl, master_params, master_grads, args.warmup, args.steps, device)
                median, moved = statistics.median(times), bytes_per_element(opt, impl, elt_size)
                results.append(dict(shapes=set_name, tensors=len(shape_list), numel=n, optimizer=opt,
                                    impl=impl, median_ms=median, min_ms=min(times), max_ms=max(times),
                                    bytes_per_element=moved, gb_per_s=moved * n / (median * 1e-3) / 1e9,
                                    times_ms=times))
                print(f"[{len(results)}/{total}] {set_name} {opt} {impl}: median {median:.3f} ms "
                      f"(min {min(times):.3f}, max {max(times):.3f})", file=sys.stderr, flush=True)
        del master_params, master_grads
        gc.collect()

    meta["busy_cpus_at_end"] = busy_cpus()
    warn_if_busy(meta["busy_cpus_at_end"], "at the end")

    for r in results:  # speedup vs the fastest torch recipe for the same (shapes, optimizer)
        best = min((q for q in results if q["impl"] in TORCH_IMPLS
                    and (q["shapes"], q["optimizer"]) == (r["shapes"], r["optimizer"])),
                   key=lambda q: q["median_ms"])
        r["best_torch_impl"], r["speedup_vs_best_torch"] = best["impl"], best["median_ms"] / r["median_ms"]
    print_report(meta, results)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
