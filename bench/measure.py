"""How bench/run.py measures: step time, host time, launches, bytes moved, copy bandwidth, and the
machine.

Each function answers one question about one step callable; run.py decides what to step.
"""
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def time_steps(step, restore, warmup: int, steps: int, device: torch.device) -> list[float]:
    """ms per step, ``steps`` times after ``warmup``; ``restore`` runs untimed before each step.

    CUDA: events around each step, and a 256 MB write between steps so that no step finds its
    tensors in L2 (50 MB on an H100: the many-small set's 33 MB of grads would fit), as
    triton.testing.do_bench does. CPU: wall time, the step being synchronous.
    """
    if device.type == "cuda":
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
        events = []
        for i in range(warmup + steps):
            restore()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            if i >= warmup:
                events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for i in range(warmup + steps):
        restore()
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def host_ms(step, restore, device: torch.device, repeats: int = 5) -> float | None:
    """On CUDA, the host time of one step: until step() returns, the GPU idle at the start.
    None on CPU, where host time is the step time."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(repeats):
        restore()
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def launches_per_step(step, restore, device: torch.device) -> dict | None:
    """Kernels and copies one step puts on the GPU, counted by the torch profiler (Triton kernels
    included). None on CPU, where there are no launches."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    restore()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = copies = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if event.name.startswith(("Memcpy", "Memset")):
                copies += 1
            else:
                kernels += 1
    return {"kernels": kernels, "copies": copies}


class ByteCount(TorchDispatchMode):
    """Bytes that the aten ops dispatched inside it read and write, over tensors of at least
    ``min_numel`` elements (2: all but 0-dim scalars such as step counters and norms).

    Per op: every tensor argument is read once (a kernel reading one tensor twice, addcmul_(g, g),
    counts it once), except what the op only overwrites (copy_'s destination, out=); the
    arguments its schema marks mutable, and new outputs, are written. Views and allocations
    (empty_like) move nothing. torch's fused optimizers mark ``grads`` mutable but write them only
    when given ``grad_scale`` (checked on CPU). This counts whole-tensor passes as the ops are
    written; what a kernel keeps in cache, or a GPU in L2, is not seen."""

    _WRITE_ONLY = {"copy_", "_foreach_copy_", "fill_", "zero_", "_foreach_zero_"}
    _NO_DATA = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}

    def __init__(self, min_numel: int = 2):
        super().__init__()
        self.min_numel, self.bytes, self.ops = min_numel, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._opname
        if func.is_view or name in self._NO_DATA or name in ("detach", "alias"):
            return out
        arguments = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in arguments[len(args):]]
        by_name = {a.name: v for a, v in zip(arguments, values)}
        reads, writes, inputs = {}, {}, set()
        for arg, value in zip(arguments, values):
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            inputs.update(t.data_ptr() for t in tensors)
            written = arg.alias_info is not None and arg.alias_info.is_write
            if (written and arg.name == "grads" and name.startswith("_fused_")
                    and by_name.get("grad_scale") is None):
                written = False
            only_written = written and (arg.name == "out" or
                                        arg.name == "self" and name in self._WRITE_ONLY)
            for t in tensors:
                if t.numel() >= self.min_numel:
                    if not only_written:
                        reads[t.data_ptr()] = t.nbytes
                    if written:
                        writes[t.data_ptr()] = t.nbytes
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.min_numel
                    and t.data_ptr() not in inputs):
                writes[t.data_ptr()] = t.nbytes
        moved = sum(reads.values()) + sum(writes.values())
        if moved:
            self.bytes += moved
            self.ops.append(f"{func}: {moved} B")
        return out


def bytes_per_step(step, restore, min_numel: int = 2) -> int:
    """Bytes one step moves, counted by ByteCount (run it after the timed steps: the state is then
    made, and the count is of a steady-state step)."""
    restore()
    with ByteCount(min_numel) as count:
        step()
    return count.bytes


def copy_bandwidth_gbs(device: torch.device, mbytes: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, GB/s counting read + write: the practical ceiling for a
    memory-bound step, measured in the same run on the same device."""
    n = mbytes * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), lambda: None, 2, repeats, device)
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


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


def commit() -> str:
    """HEAD's short hash, and whether fusedopt/ or kernels/ differ from it (what was measured)."""
    import pathlib
    import subprocess
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "fusedopt", "kernels"], capture_output=True, text=True,
                               cwd=root).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes in fusedopt/ or kernels/" if dirty
                                  else "")


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def cpu_sample() -> tuple | None:
    """/proc/stat now: all CPUs' busy seconds, wall seconds x CPUs, and this process's own CPU
    seconds (its OpenMP workers may still be spinning after the last parallel region); None where
    /proc/stat cannot be read. Two samples give others_busy."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")  # ticks[3], ticks[4]: idle, iowait
        return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, time.process_time()
    except (OSError, ValueError, IndexError):
        return None


def others_busy(start: tuple | None, end: tuple | None) -> float | None:
    """How many CPUs other processes kept busy, on average, between two cpu_sample()s."""
    if start is None or end is None:
        return None
    (busy0, total0, own0), (busy1, total1, own1) = start, end
    cpus = os.cpu_count() or 1
    return max(0.0, cpus * ((busy1 - busy0) - (own1 - own0)) / max(total1 - total0, 1e-9))


def busy_cpus(seconds: float = 0.5) -> float | None:
    """How many CPUs other processes keep busy, sampled from /proc/stat while this one sleeps.

    On CPU a neighbour matters a lot: torch's fused CPU ops open an OpenMP parallel region even
    for tiny tensors, and each waits for a busy core (seen on 2 cores with a pytest run beside:
    the smoke step took 8-32 ms, in multiples of 4 ms, instead of 0.3 ms).
    """
    start = cpu_sample()
    time.sleep(seconds)
    return others_busy(start, cpu_sample())


def warn_if_busy(busy: float | None, when: str) -> None:
    if busy is not None and busy > 0.25:
        print(f"warning: other processes kept {busy:.1f} CPUs busy {when}; the timings may show it",
              file=sys.stderr)
