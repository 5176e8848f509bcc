"""Compile every kernel variant for NVIDIA targets without a GPU, as the runtime would build it, and
report its machine code facts. Used by tests/test_compile.py; handy by hand when tuning a kernel:
``python tests/compile_kernels.py`` prints one JSON object (see ``main``).

The runtime does not compile a kernel from its signature alone: its binder specializes on the
launch's arguments (``tt.divisibility=16`` on 16-byte-aligned pointers) and the options (num_warps,
enable_fp_fusion) come from the launch. So the binaries checked here come from real launches:
1. one optimizer configuration per variant (``STEPS``) takes two steps on CPU tensors with
   backend="triton" while ``JITFunction.run`` only records its arguments: fusedopt builds its
   tables, slices and scalars as on a GPU, and nothing runs. Torch aligns CPU allocations to 64
   bytes and CUDA ones to 512, so a whole tensor is 16-byte aligned on both; the other addresses
   are fusedopt's own slices (say, a grad-table slice at an odd int64 offset), the same on both;
2. each recorded launch goes through triton's own ``JITFunction.warmup`` against a stand-in
   driver that only names the GPUTarget: triton's binder, option parsing and compile, unchanged.

Run it without TRITON_INTERPRET (the interpreter replaces the JIT functions this needs); it sets
TRITON_INTERPRET=1 itself while recording, as fusedopt allows backend="triton" on CPU tensors only
then.
"""
import glob
import importlib
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("compile_kernels.py: run it without TRITON_INTERPRET=1 (the interpreter "
                     "replaces the JIT functions it compiles)")

import fusedopt  # noqa: E402  (after the check: importing the kernels under it is the mistake)
import fusedopt.kernels  # noqa: E402
from fusedopt.kernels import _common  # noqa: E402

# Every kernel module now, before TRITON_INTERPRET is set: imported under it, triton.jit would
# make interpreter functions, which neither record nor compile.
for _module in pkgutil.iter_modules(fusedopt.kernels.__path__, "fusedopt.kernels."):
    importlib.import_module(_module.name)

ARCHS = (80, 90)
SIZES = dict(BLOCK=_common.BLOCK_SIZE, NUM_PARTIALS=_common.NUM_PARTIALS)
L2, INF, NONE = _common.NORM_L2, _common.NORM_INF, _common.NORM_NONE
NO_GUARD = dict(UNSCALE=False, FOUND_IN=False, DETECT=False)
AMP_FUSED = dict(UNSCALE=True, FOUND_IN=False, DETECT=True)  # fusedopt.GradScaler
AMP_TORCH = dict(UNSCALE=True, FOUND_IN=True, DETECT=False)  # torch.amp.GradScaler


def sgd(dtype, norm, value, momentum, nesterov, maximize, lr_ptr, guard=NO_GUARD):
    return dict(DTYPE=dtype, NORM=norm, VALUE_CLIP=value, **guard, LR_FROM_PTR=lr_ptr, **SIZES,
                HAS_MOMENTUM=momentum, NESTEROV=nesterov, MAXIMIZE=maximize)


def adam(dtype, norm, value, amsgrad, maximize, decoupled, lr_ptr, guard=NO_GUARD):
    return dict(DTYPE=dtype, NORM=norm, VALUE_CLIP=value, **guard, LR_FROM_PTR=lr_ptr, **SIZES,
                AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled)


def norm(dtype, kind, value, has_step, row, unscale=False, detect=False):
    return dict(DTYPE=dtype, ROW=row, NORM=kind, VALUE_CLIP=value, UNSCALE=unscale, DETECT=detect,
                HAS_STEP=has_step, **SIZES)


# variant -> the constexprs its name says (checked against what its configuration launches)
VARIANTS = {
    "norm-fp32-l2-value-step": norm(tl.float32, L2, True, True, 2),
    "norm-bf16-inf": norm(tl.bfloat16, INF, False, False, 1),
    "norm-fp32-steps-only": norm(tl.float32, NONE, False, True, 2),
    "norm-fp32-l2-amp-detect": norm(tl.float32, L2, False, True, 2, unscale=True, detect=True),
    "norm-fp16-detect-only": norm(tl.float16, NONE, False, False, 1, detect=True),
    "sgd-fp32-all-flags": sgd(tl.float32, L2, True, True, True, True, True),
    "sgd-fp32-plain": sgd(tl.float32, NONE, False, False, False, False, False),
    "sgd-bf16-momentum-inf": sgd(tl.bfloat16, INF, False, True, False, False, False),
    "adam-fp32-all-flags": adam(tl.float32, L2, True, True, True, True, True),
    "adam-fp32-plain": adam(tl.float32, NONE, False, False, False, False, False),
    "adamw-bf16-clip": adam(tl.bfloat16, L2, False, False, False, True, False),
    "adam-fp16-amsgrad": adam(tl.float16, INF, True, True, False, False, False),
    "adamw-fp32-clip-amp-fused": adam(tl.float32, L2, False, False, False, True, False, AMP_FUSED),
    "adam-bf16-amp-torch": adam(tl.bfloat16, NONE, False, False, False, False, True, AMP_TORCH),
    "sgd-fp32-momentum-clip-amp-fused": sgd(tl.float32, L2, False, True, False, False, False,
                                            AMP_FUSED),
    # every guard a step can combine: under a GradScaler the nonfinite policy yields to the
    # scaler's own found_inf (fusedopt/nonfinite.StepGuard.for_step), so DETECT stays off
    "sgd-fp16-all-guards": sgd(tl.float16, INF, True, True, True, True, True, AMP_TORCH),
}


class Step(NamedTuple):
    """One optimizer configuration and the variants its launches are."""
    update: str | None  # the variant of its update launches (None: not one of VARIANTS)
    norm: str | None    # the variant of its norm-pass launches
    optimizer: str      # a fusedopt class
    dtype: torch.dtype
    kwargs: dict        # constructor arguments; lr=LR means a Tensor lr (read through a pointer)
    scaler: str | None = None  # "fusedopt" (fusedopt.GradScaler) or "torch" (torch.amp.GradScaler)


LR = "tensor"
CLIP, VALUE = dict(max_grad_norm=1.0), dict(max_grad_value=0.5)
CLIP_INF = dict(max_grad_norm=1.0, norm_type=math.inf)
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
STEPS = [
    Step("adam-fp32-all-flags", "norm-fp32-l2-value-step", "Adam", FP32,
         dict(amsgrad=True, maximize=True, decoupled_weight_decay=True, lr=LR, **CLIP, **VALUE)),
    Step("adam-fp32-plain", "norm-fp32-steps-only", "Adam", FP32, {}),
    Step("sgd-bf16-momentum-inf", "norm-bf16-inf", "SGD", BF16, dict(momentum=0.9, **CLIP_INF)),
    Step("adamw-fp32-clip-amp-fused", "norm-fp32-l2-amp-detect", "AdamW", FP32, CLIP, "fusedopt"),
    Step(None, "norm-fp16-detect-only", "SGD", FP16, dict(nonfinite="skip")),
    Step("sgd-fp32-all-flags", None, "SGD", FP32,
         dict(momentum=0.9, nesterov=True, maximize=True, lr=LR, **CLIP, **VALUE)),
    Step("sgd-fp32-plain", None, "SGD", FP32, {}),
    Step("adamw-bf16-clip", None, "AdamW", BF16, CLIP),
    Step("adam-fp16-amsgrad", None, "Adam", FP16, dict(amsgrad=True, **CLIP_INF, **VALUE)),
    Step("adam-bf16-amp-torch", None, "Adam", BF16, dict(lr=LR), "torch"),
    Step("sgd-fp32-momentum-clip-amp-fused", None, "SGD", FP32, dict(momentum=0.9, **CLIP),
         "fusedopt"),
    Step("sgd-fp16-all-guards", None, "SGD", FP16,
         dict(momentum=0.9, nesterov=True, maximize=True, lr=LR, nonfinite="skip", **CLIP_INF,
              **VALUE), "torch"),
]
# Two param groups, the first with an odd number of tensors: were the second group's grad
# addresses an int64 slice right after the first's, 8 bytes past a 16-byte boundary, the runtime
# would build that launch without divisibility on grad_ptrs_ptr, a second binary of the variant,
# and it would be checked here too (fusedopt at 35cb299 did so; padding each group's segment to an
# even index keeps every slice aligned).
GROUP_SIZES = ((1027, 3, 64), (2048, 5))


class Launch(NamedTuple):
    kernel: JITFunction
    args: tuple
    kwargs: dict
    step: Step


def record_launches() -> list[Launch]:
    """Every kernel launch of two steps of each configuration in STEPS, recorded, not run."""
    calls, launches = [], []

    def record(kernel, *args, grid, warmup, **kwargs):
        calls.append((kernel, args, kwargs))

    run = JITFunction.run
    JITFunction.run, os.environ["TRITON_INTERPRET"] = record, "1"
    try:
        for step in STEPS:
            _take_steps(step)
            launches += [Launch(*call, step) for call in calls]
            calls.clear()
    finally:
        JITFunction.run = run
        del os.environ["TRITON_INTERPRET"]
    return launches


def _take_steps(step: Step) -> None:
    torch.manual_seed(0)
    groups = [[torch.randn(n, dtype=step.dtype, requires_grad=True) for n in sizes]
              for sizes in GROUP_SIZES]
    kwargs = dict(step.kwargs, backend="triton")
    if kwargs.get("lr") == LR:
        kwargs["lr"] = torch.tensor(0.01)
    opt = getattr(fusedopt, step.optimizer)([{"params": ps} for ps in groups], **kwargs)
    scaler = {"fusedopt": fusedopt.GradScaler, "torch": torch.amp.GradScaler}.get(step.scaler)
    scaler = scaler and scaler("cpu", init_scale=1024.0)
    for _ in range(2):
        opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for ps in groups for p in ps)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


class _TargetOnly:
    """Stands in for the GPU driver in JITFunction.run: names the target, so that the binder and
    the compile are those of a device of this arch. Warmup never launches, so nothing else is
    asked of it. The device id is the arch: one binder and kernel cache per arch."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device):
        return None

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from the first of Triton's bundled ptxas binaries that accepts
    the PTX's version (triton 3.9: `ptxas` is CUDA 12.9 and refuses PTX 9.4; `ptxas-blackwell`
    takes it)."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    binaries = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                             "bin", "ptxas*")))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        errors = []
        for ptxas in binaries:
            run = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                out = run.stdout + run.stderr
                spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
                registers = int(re.search(r"Used (\d+) registers", out).group(1))
                return {"registers": registers, "spill_bytes": spills,
                        "ptxas": os.path.basename(ptxas)}
            errors.append(f"{os.path.basename(ptxas)}: {run.stderr.strip()[-200:]}")
    raise RuntimeError("no bundled ptxas accepted the PTX: " + " | ".join(errors))


def machine_code(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {
        "cubin_bytes": len(compiled.asm["cubin"]),
        "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
        # max.NaN.f32 keeps a NaN operand (torch.maximum); plain max.f32 returns the other one
        "nan_max": len(re.findall(r"\bmax\.NaN\.f32\b", ptx)),
        "enable_fp_fusion": compiled.metadata.enable_fp_fusion,
        "num_warps": compiled.metadata.num_warps,
        **ptxas_report(ptx),
    }


def specialization(kernel: JITFunction, src) -> dict:
    """The constexprs and which pointer arguments the binder marked 16-byte divisible."""
    names = kernel.arg_names
    pointers = [(i, n) for i, n in enumerate(names) if str(src.signature[n]).startswith("*")]
    divisible = [n for i, n in pointers if ["tt.divisibility", 16] in src.attrs.get((i,), [])]
    return {"constexprs": {names[k[0]]: str(v) for k, v in sorted(src.constants.items())},
            "divisible": divisible,
            "not_divisible": [n for _, n in pointers if n not in divisible]}


def main() -> None:
    """Prints {"variants": {variant: {"expected": constexprs, "builds": [one per distinct binary:
    {"constexprs", "divisible", "not_divisible", "options", "launches", "sm_80": facts, ...}]}},
    "launches": [{"kernel", "variant", "options": the option names the launch passed}]}."""
    launches = record_launches()
    variants = {name: {"expected": {k: str(v) for k, v in sorted(expected.items())}, "builds": {}}
                for name, expected in VARIANTS.items()}
    report = {"variants": variants, "launches": []}
    for launch in launches:
        kind = "norm" if launch.kernel.fn.__name__ == "_norm_kernel" else "update"
        options = {k: v for k, v in launch.kwargs.items() if k not in launch.kernel.arg_names}
        report["launches"].append({"kernel": launch.kernel.fn.__name__, "options": sorted(options),
                                   "variant": getattr(launch.step, kind)})
    for arch in ARCHS:
        driver.set_active(_TargetOnly(arch))  # for the rest of this process: it launches nothing
        for launch, seen in zip(launches, report["launches"]):
            if seen["variant"] is None:
                continue  # a launch no variant names (say, fp16 Adam's norm pass): not compiled
            # warmup is the run path of a launch (binder, options, compile) without the launch;
            # the kernel's cache keeps one binary per specialization and options, as at run time
            compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
            build = specialization(launch.kernel, compiled.src)
            build["options"] = {k: launch.kwargs[k] for k in seen["options"]}
            key = json.dumps(build, sort_keys=True)
            build = variants[seen["variant"]]["builds"].setdefault(key, dict(build, launches=0))
            build["launches"] += arch == ARCHS[0]
            if f"sm_{arch}" not in build:  # a build's later launches: the same binary
                build[f"sm_{arch}"] = machine_code(compiled)
    for v in variants.values():
        v["builds"] = list(v["builds"].values())
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
