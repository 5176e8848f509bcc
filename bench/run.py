"""The main job: how much faster is one optimizer step (clip + update) with fusedopt than with the
best torch recipe, on this machine, and how close is it to what the memory system allows?

    python bench/run.py              # the full matrix for this device (GPU when there is one)
    python bench/run.py --quick      # 2m24s on 2 CPU cores (AMP rows included); GPU: not yet timed
    python bench/run.py --compile    # also torch.compile of the torch recipe (compiling is slow)
    python bench/run.py --shapes smoke --optimizers sgd --dtypes float32 --steps 3
    python bench/run.py --clip amp   # under a GradScaler: unscale_ + clip + step vs fusedopt's

Every implementation runs in the same process on fresh copies of the same tensors: torch.optim
for-loop, foreach and fused, each followed by clip_grad_norm_(foreach=True) when clipping, and
fusedopt with each backend that can run here. Writes Markdown (also printed), JSON with every
raw number, and a PNG chart to bench/results/<device>-<date>[-quick].*; progress goes to stderr.
Shape sets come from bench/shapes.py; measuring from bench/measure.py; output from report.py.
"""
import argparse
import datetime
import gc
import statistics
import sys

import torch

import fusedopt
import measure  # bench/ is on sys.path when run as `python bench/run.py`
import report
import shapes

MAX_NORM = 1.0  # clip_grad_norm_(params, 1.0): random grads have norms >> 1, so it clips
# --clip modes: off (update only), on (clip_grad_norm_ + update), amp (GradScaler: torch recipes
# unscale_ + clip_grad_norm_ + scaler.step; fusedopt: fusedopt.GradScaler.step, clip inside)
CLIP_MODES = ("off", "on", "amp")
AMP_SCALE = 2.0 ** 16  # GradScaler's default init_scale; the random grads count as scaled by it

# name -> (torch class, fusedopt class, hyperparameters shared by every implementation)
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, fusedopt.SGD, dict(lr=1e-3, momentum=0.9)),
    "adam": (torch.optim.Adam, fusedopt.Adam, dict(lr=1e-3)),
    "adamw": (torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-3, weight_decay=0.01)),
}
STATE_COPIES = {"sgd": 1, "adam": 2, "adamw": 2}
TORCH_IMPLS = ("torch for-loop", "torch foreach", "torch fused")
COMPILED = "torch.compile(foreach)"
OUR_IMPLS = ("fusedopt (torch)", "fusedopt (triton)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# (device type, quick) -> the matrix run by default
DEFAULTS = {
    ("cpu", True): dict(shapes="gpt2-small,resnet50,many-small", optimizers="sgd,adamw",
                        dtypes="float32,bfloat16", clip="on,amp", steps=5, warmup=1),
    ("cpu", False): dict(shapes="gpt2-small,resnet50,many-small", optimizers="sgd,adam,adamw",
                         dtypes="float32,bfloat16", clip="on,off,amp", steps=10, warmup=3),
    ("cuda", True): dict(shapes="gpt2-small,llama-1b,resnet50,many-small", optimizers="sgd,adamw",
                         dtypes="float32,bfloat16", clip="on,amp", steps=20, warmup=3),
    ("cuda", False): dict(shapes="gpt2-small,llama-1b,resnet50,many-small",
                          optimizers="sgd,adam,adamw", dtypes="float32,bfloat16",
                          clip="on,off,amp", steps=50, warmup=5),
}


def impls_for(device: torch.device, compile_: bool) -> tuple[str, ...]:
    """Every implementation that can run on ``device``: the Triton kernels only on CUDA."""
    from fusedopt._dispatch import triton_unavailable_reason
    triton_ok = device.type == "cuda" and triton_unavailable_reason({device}) is None
    return TORCH_IMPLS + ((COMPILED,) if compile_ else ()) + OUR_IMPLS[:2 if triton_ok else 1]


def bytes_per_element(opt: str, impl: str, elt_size: int, clip: str) -> int:
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
                     fo. torch  p, g, buf -> p, buf, g (g only with grad_scale)       5 / 6
                     fo. triton p, g, buf -> p, buf                                       5
      Adam / AdamW   fused      p, g, m, v -> p, m, v                                     7
                     foreach,   AdamW only: p.mul_(1 - lr wd) 2; m.lerp_(g) 3,
                     for-loop   v.mul_ 2, v.addcmul_(g, g) 3, d = sqrt(v) 2, d.div_ 2,
                                d.add_(eps) 2, p.addcdiv_(m, d) 4                  18 / AdamW 20
                     fo. torch  p, g, m, v -> p, m, v, g (g only with grad_scale)     7 / 8
                     fo. triton p, g, m, v -> p, m, v                                     7
    Totals with clip: SGD 11 / 8 / 7 / 6, Adam 21 / 10 / 9 / 8, AdamW 23 / 10 / 9 / 8 for
    foreach-or-for-loop / fused / fusedopt torch / fusedopt triton: fp32 AdamW is 92 / 40 / 36 /
    32 bytes per element (DESIGN.md's budget: 40 -> 32). torch.compile is counted as the fused
    recipe: what Inductor really fuses is not known here, so its GB/s is a lower bound.

    AMP (clip "amp"). torch recipes: scaler.unscale_ reads and writes g (2) before the clip; the
    scaler's step adds no pass for a non-fused optimizer (it reads found_inf on the host) and, for
    fused=True, none either (unscale_ already recorded found_inf). fusedopt with fusedopt.GradScaler:
    Triton: the norm pass also unscales and finds infs, nothing more (fp32 AdamW: 32 bytes vs 48
    for fused + unscale_ + clip); torch path: GradScaler's own unscale-and-check op (2).
    """
    ours = impl in OUR_IMPLS
    clip_elems = (1 if ours else 3) if clip != "off" else 0
    if clip == "amp" and impl != "fusedopt (triton)":
        clip_elems += 2
    fused_like = impl in ("torch fused", COMPILED) or ours
    if opt == "sgd":
        update = 5 if fused_like else 8
    else:
        update = 7 if fused_like else (20 if opt == "adamw" else 18)
    if impl == "fusedopt (torch)" and clip != "off":
        update += 1  # the clipped g written back
    return (clip_elems + update) * elt_size


def make_step(opt: str, impl: str, params: list[torch.Tensor], clip: str):
    """One step of ``impl`` over ``params`` (their .grad set) in ``clip`` mode (CLIP_MODES)."""
    torch_cls, our_cls, hyper = OPTIMIZERS[opt]
    device = params[0].device
    if impl in OUR_IMPLS:
        backend = impl.split("(")[1].rstrip(")")
        optimizer = our_cls(params, **hyper, max_grad_norm=None if clip == "off" else MAX_NORM,
                            backend=backend)
        if clip != "amp":
            return optimizer.step
        scaler = _scaler(fusedopt.GradScaler, device)

        def amp_step():
            scaler.step(optimizer)
            scaler.update()
        return amp_step
    flags = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True),
             "torch fused": dict(fused=True), COMPILED: dict(foreach=True)}[impl]
    optimizer = torch_cls(params, **hyper, **flags)
    scaler = _scaler(torch.amp.GradScaler, device) if clip == "amp" else None

    def step():
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip != "off":
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return torch.compile(step) if impl == COMPILED else step


def _scaler(cls, device):
    """A GradScaler at AMP_SCALE that never grows during a run (the grads stay as they are)."""
    scaler = cls(device.type, init_scale=AMP_SCALE, growth_interval=1 << 30)
    scaler.scale(torch.ones((), device=device))  # makes its scale tensor, as a first loss would
    return scaler


def measure_impl(opt, impl, masters, clip, args, device) -> dict:
    """Step time, host time and launches of one implementation on fresh copies of ``masters``."""
    master_params, master_grads = masters
    params = [m.clone().requires_grad_() for m in master_params]
    for p, g in zip(params, master_grads):
        p.grad = g.clone()
    grads = [p.grad for p in params]

    def restore():  # the torch path's clip rewrote .grad: every step sees the same gradients
        torch._foreach_copy_(grads, master_grads)
    step = make_step(opt, impl, params, clip)
    times = measure.time_steps(step, restore, args.warmup, args.steps, device)
    out = dict(times_ms=times, host_ms=measure.host_ms(step, restore, device),
               launches=measure.launches_per_step(step, restore, device))
    del step, restore, params, p  # the optimizer state goes with the step; grads with restore
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fits_in_memory(numel: int, elt: int, opt: str, device: torch.device) -> bool:
    """Masters (params + grads), one working copy (params + grads) and the optimizer state."""
    need = numel * elt * (4 + STATE_COPIES[opt])
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import os
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.8 * free


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the short matrix (see DEFAULTS)")
    parser.add_argument("--shapes", help=f"comma list from bench/shapes.py: {', '.join(shapes.NAMES)}")
    parser.add_argument("--optimizers", help=f"comma list of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--dtypes", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--clip", help="comma list of off, on, amp (a GradScaler step with clip)")
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps first (>= 1: state is made then)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd recipes")
    parser.add_argument("--out-dir", default="bench/results", help="where the files go")
    args = parser.parse_args(argv)
    device_type = torch.device(args.device).type
    for key, value in DEFAULTS[("cuda" if device_type == "cuda" else "cpu", args.quick)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    report.split_names(parser, args, {"shapes": shapes.NAMES, "optimizers": OPTIMIZERS,
                                      "dtypes": DTYPES, "clip": CLIP_MODES})
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = dict(device=measure.device_name(device), device_type=device.type,
                versions=measure.versions(), fusedopt=fusedopt.__version__, steps=args.steps,
                warmup=args.warmup, max_grad_norm=MAX_NORM, quick=args.quick,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                copy_gbs=measure.copy_bandwidth_gbs(device, 1024 if device.type == "cuda" else 256))
    busy_start = measure.busy_cpus() if device.type == "cpu" else None
    measure.warn_if_busy(busy_start, "at start")
    impls = impls_for(device, args.compile)
    results, skipped = [], []
    total = len(args.shapes) * len(args.dtypes) * len(args.clip) * len(args.optimizers) * len(impls)
    done = 0
    for set_name in args.shapes:
        shape_list = shapes.get(set_name)
        n = shapes.numel(shape_list)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            elt = torch.empty((), dtype=dtype).element_size()
            if not fits_in_memory(n, elt, "adamw", device):
                skipped.append(f"{set_name} {dtype_name}: needs more memory than is free")
                done += len(args.clip) * len(args.optimizers) * len(impls)
                continue
            gen = torch.Generator(device=device).manual_seed(0)
            masters = ([torch.randn(s, generator=gen, device=device).to(dtype) for s in shape_list],
                       [torch.randn(s, generator=gen, device=device).to(dtype) for s in shape_list])
            for clip in args.clip:
                for opt in args.optimizers:
                    for impl in impls:
                        done += 1
                        m = measure_impl(opt, impl, masters, clip, args, device)
                        times = m.pop("times_ms")
                        median = statistics.median(times)
                        deciles = (statistics.quantiles(times, n=10, method="inclusive")
                                   if len(times) > 1 else [median] * 9)
                        moved = bytes_per_element(opt, impl, elt, clip)
                        gbs = moved * n / (median * 1e-3) / 1e9
                        results.append(dict(
                            shapes=set_name, tensors=len(shape_list), numel=n, dtype=dtype_name,
                            clip=clip, optimizer=opt, impl=impl, median_ms=median,
                            p10_ms=deciles[0], p90_ms=deciles[-1], bytes_per_element=moved,
                            gb_per_s=gbs, pct_of_copy=100 * gbs / meta["copy_gbs"],
                            times_ms=times, **m))
                        print(f"[{done}/{total}] {set_name} {dtype_name} clip "
                              f"{clip} {opt} {impl}: {median:.3f} ms",
                              file=sys.stderr, flush=True)
            del masters
            gc.collect()
    if device.type == "cpu":
        busy_end = measure.busy_cpus()
        measure.warn_if_busy(busy_end, "at the end")
        meta["busy_cpus"] = (None if busy_start is None or busy_end is None
                             else f"{busy_start:.2f} / {busy_end:.2f}")
    meta["skipped"] = skipped
    for r in results:  # speedup against the fastest torch recipe of the same workload
        same = [q for q in results if q["impl"] in TORCH_IMPLS + (COMPILED,) and all(
            q[k] == r[k] for k in ("shapes", "dtype", "clip", "optimizer"))]
        best = min(same, key=lambda q: q["median_ms"])
        r.update(best_torch_impl=best["impl"], best_torch_ms=best["median_ms"],
                 speedup_vs_best_torch=best["median_ms"] / r["median_ms"])

    files = report.paths(args.out_dir, meta, args.quick)
    text = report.markdown(meta, results) + "".join(f"\nskipped: {s}\n" for s in skipped)
    files["md"].write_text(text)
    report.write_json(files["json"], meta, results)
    charted = report.chart(files["png"], meta, results)
    print(text)
    print(f"wrote {files['md']}, {files['json']}"
          + (f", {files['png']}" if charted else " (no chart: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
