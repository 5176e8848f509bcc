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
   driver that only names the GPUTarget: triton's binder, option parsing and compile, unchanged;
3. the facts are read from what that compile made: its PTX, and its cubin through Triton's
   bundled cuobjdump. Not from a second ptxas run on the PTX: Triton picks the ptxas per arch and
   passes its own flags (triton 3.9 adds --regAllocOptLevel=2, under which the fp32 Adam update
   with every flag had an 8-byte stack frame on sm_90 that a plain ``ptxas -v`` of its PTX did
   not show).

Every elementwise optimizer launches the one update skeleton (kernels/update.py) with its rule as
a constexpr (``RULE``: a JITFunction of ``_common.RULES``); the report names a rule by its key
there, so that a variant's declared constexprs are plain strings.

Run it without TRITON_INTERPRET (the interpreter replaces the JIT functions this needs); it sets
TRITON_INTERPRET=1 itself while recording, as fusedopt allows backend="triton" on CPU tensors only
then.
"""
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
SKIP = dict(UNSCALE=False, FOUND_IN=False, DETECT=True)      # nonfinite="skip", no scaler


class Rule(NamedTuple):
    """What an optimizer class declares of its update (fusedopt/optim/*.py), written out again
    here, so that a launch that does not follow its class's declaration fails the name check:
    ``_RULE``, ``_STEP_RULE``, ``_HAS_STEP``, whether it has a ``_SCALAR_STATE``, and what its
    ``_flags`` F0..F2 mean (unused ones are False)."""
    rule: str
    step_rule: str | None
    has_step: bool
    scalar_state: bool
    flags: tuple


DECLARED = {  # Adam's is AdamW's too
    "sgd": Rule("sgd_rule", None, False, False, ("momentum", "nesterov", "maximize")),
    "adam": Rule("adam_rule", "adam_step", True, False, ("amsgrad", "maximize", "decoupled")),
    "adagrad": Rule("adagrad_rule", "adagrad_step", True, False, ("maximize",)),
    "rmsprop": Rule("rmsprop_rule", None, True, False, ("centered", "momentum", "maximize")),
    "nadam": Rule("nadam_rule", "nadam_step", True, True, ("decoupled", "maximize")),
    "radam": Rule("radam_rule", "radam_step", True, False, ("decoupled", "maximize")),
    "adamax": Rule("adamax_rule", "adamax_step", True, False, ("maximize",)),
    "lion": Rule("lion_rule", None, False, False, ("maximize",)),
}


def update(rule, dtype, norm, states, *, value=False, lr_ptr=False, guard=NO_GUARD,
           state_dtype=None, master=0, sr=False, **flags):
    """The constexprs of an update launch of ``rule`` (a key of DECLARED); ``states``: the bits
    of the state columns used; ``flags``: the rule's flags by name, the rest False. The
    memory-lean layout: the state columns' dtype (default the param's), the master column
    (kernels/update.py's MASTER_*) and stochastic rounding, which keeps a step counter."""
    r = DECLARED[rule]
    if set(flags) - set(r.flags):
        raise ValueError(f"{rule} has no flags {sorted(set(flags) - set(r.flags))}")
    f = [flags.get(name, False) for name in r.flags] + [False] * (3 - len(r.flags))
    # without a step rule the skeleton gets the rule itself in STEP_RULE, never called
    return dict(RULE=r.rule, STEP_RULE=r.step_rule or r.rule, STATES=states,
                HAS_STEP=r.has_step or sr, STEP_SCALARS=r.step_rule is not None,
                SCALAR_STATE=r.scalar_state, F0=f[0], F1=f[1], F2=f[2], DTYPE=dtype,
                STATE_DTYPE=state_dtype or dtype, MASTER=master, SR=sr, NORM=norm,
                VALUE_CLIP=value, **guard, LR_FROM_PTR=lr_ptr, **SIZES)


def norm(dtype, kind, value, has_step, row, unscale=False, detect=False, snapshot=False):
    return dict(DTYPE=dtype, ROW=row, NORM=kind, VALUE_CLIP=value, UNSCALE=unscale, DETECT=detect,
                HAS_STEP=has_step, SNAPSHOT=snapshot, **SIZES)


F32, B16, F16 = tl.float32, tl.bfloat16, tl.float16
# variant -> the constexprs its name says (checked against what its configuration launches). Norm
# pass ROW: numel (1), + the step counter's address (2), + NAdam's mu_product and snapshot (4).
VARIANTS = {
    "norm-fp32-l2-value-step": norm(F32, L2, True, True, 2),
    "norm-bf16-inf": norm(B16, INF, False, False, 1),
    "norm-fp32-steps-only": norm(F32, NONE, False, True, 2),
    "norm-fp32-l2-amp-detect": norm(F32, L2, False, True, 2, unscale=True, detect=True),
    "norm-fp16-detect-only": norm(F16, NONE, False, False, 1, detect=True),
    "norm-fp32-l2": norm(F32, L2, False, False, 1),
    "norm-fp32-l2-step-snapshot": norm(F32, L2, False, True, 4, snapshot=True),
    "norm-fp32-steps-snapshot": norm(F32, NONE, False, True, 4, snapshot=True),
    "norm-bf16-l2-amp-step-snapshot": norm(B16, L2, False, True, 4, unscale=True, snapshot=True),
    "sgd-fp32-all-flags": update("sgd", F32, L2, 1, value=True, lr_ptr=True, momentum=True,
                                 nesterov=True, maximize=True),
    "sgd-fp32-plain": update("sgd", F32, NONE, 0),
    "sgd-bf16-momentum-inf": update("sgd", B16, INF, 1, momentum=True),
    "adam-fp32-all-flags": update("adam", F32, L2, 7, value=True, lr_ptr=True, amsgrad=True,
                                  maximize=True, decoupled=True),
    "adam-fp32-plain": update("adam", F32, NONE, 3),
    "adamw-bf16-clip": update("adam", B16, L2, 3, decoupled=True),
    "adam-fp16-amsgrad": update("adam", F16, INF, 7, value=True, amsgrad=True),
    "adamw-fp32-clip-amp-fused": update("adam", F32, L2, 3, guard=AMP_FUSED, decoupled=True),
    "adam-bf16-amp-torch": update("adam", B16, NONE, 3, lr_ptr=True, guard=AMP_TORCH),
    "sgd-fp32-momentum-clip-amp-fused": update("sgd", F32, L2, 1, guard=AMP_FUSED, momentum=True),
    # every guard a step can combine: under a GradScaler the nonfinite policy yields to the
    # scaler's own found_inf (fusedopt/nonfinite.StepGuard.for_step), so DETECT stays off
    "sgd-fp16-all-guards": update("sgd", F16, INF, 1, value=True, lr_ptr=True, guard=AMP_TORCH,
                                  momentum=True, nesterov=True, maximize=True),
    "adagrad-fp32-clip-maximize": update("adagrad", F32, L2, 1, maximize=True),
    "adagrad-fp16-value-amp-torch": update("adagrad", F16, NONE, 1, value=True, guard=AMP_TORCH),
    # centered with momentum: all three state columns (square_avg, momentum_buffer, grad_avg)
    "rmsprop-fp32-centered-momentum-clip": update("rmsprop", F32, L2, 7, lr_ptr=True,
                                                  centered=True, momentum=True),
    "rmsprop-bf16-centered-momentum-inf-skip": update("rmsprop", B16, INF, 7, guard=SKIP,
                                                      centered=True, momentum=True),
    "nadam-fp32-clip": update("nadam", F32, L2, 3),
    "nadam-fp32-plain": update("nadam", F32, NONE, 3),
    "nadam-bf16-decoupled-clip-amp-torch": update("nadam", B16, L2, 3, guard=AMP_TORCH,
                                                  decoupled=True),
    "radam-fp32-decoupled-all-flags": update("radam", F32, L2, 3, value=True, lr_ptr=True,
                                             decoupled=True, maximize=True),
    "radam-fp16-decoupled-clip": update("radam", F16, L2, 3, decoupled=True),
    "adamax-fp32-inf-value": update("adamax", F32, INF, 3, value=True),
    "adamax-bf16-clip-amp-fused": update("adamax", B16, L2, 3, guard=AMP_FUSED),
    "lion-fp32-clip-maximize": update("lion", F32, L2, 1, lr_ptr=True, maximize=True),
    "lion-fp32-plain": update("lion", F32, NONE, 1),
    "lion-bf16-clip-amp-torch": update("lion", B16, L2, 1, guard=AMP_TORCH),
    # memory-lean (fusedopt/_elementwise.py): stochastic rounding, bf16 remainders (MASTER 1),
    # fp16 fp32 copies (MASTER 2), state columns in another dtype than the param
    "adamw-bf16-sr-clip": update("adam", B16, L2, 3, sr=True, decoupled=True),
    "adamw-bf16-remainder-clip-amp-fused": update("adam", B16, L2, 3, guard=AMP_FUSED, master=1,
                                                  decoupled=True),
    "adamw-fp16-copy-bf16-states-sr": update("adam", F16, L2, 3, state_dtype=B16, master=2,
                                             sr=True, decoupled=True),
    "adam-fp32-bf16-states-sr-amsgrad": update("adam", F32, NONE, 7, state_dtype=B16, sr=True,
                                               amsgrad=True),
    "sgd-bf16-momentum-sr-clip": update("sgd", B16, L2, 1, sr=True, momentum=True),
    "norm-bf16-l2-step": norm(B16, L2, False, True, 2),
    "rmsprop-fp32-bf16-states-centered-momentum-sr": update("rmsprop", F32, L2, 7,
                                                            state_dtype=B16, sr=True,
                                                            centered=True, momentum=True),
    "lion-bf16-remainder-fp32-states": update("lion", B16, NONE, 1, state_dtype=F32, master=1),
}


class Step(NamedTuple):
    """One optimizer configuration and the variants its launches are."""
    update: str | None  # the variant of its update launches (None: not one of VARIANTS)
    norm: str | None    # the variant of its norm-pass launches (None: not one, or none launched)
    optimizer: str      # a fusedopt class
    dtype: torch.dtype
    kwargs: dict        # constructor arguments; lr=LR means a Tensor lr (read through a pointer)
    scaler: str | None = None  # "fusedopt" (fusedopt.GradScaler) or "torch" (torch.amp.GradScaler)


LR = "tensor"
CLIP, VALUE = dict(max_grad_norm=1.0), dict(max_grad_value=0.5)
CLIP_INF = dict(max_grad_norm=1.0, norm_type=math.inf)
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
CENTERED = dict(centered=True, momentum=0.9)
DECOUPLED = dict(decoupled_weight_decay=True, weight_decay=0.01)
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
    Step("adagrad-fp32-clip-maximize", None, "Adagrad", FP32,
         dict(maximize=True, lr_decay=0.01, weight_decay=0.01, **CLIP)),
    Step("adagrad-fp16-value-amp-torch", None, "Adagrad", FP16, VALUE, "torch"),
    Step("rmsprop-fp32-centered-momentum-clip", None, "RMSprop", FP32,
         dict(lr=LR, **CENTERED, **CLIP)),
    Step("rmsprop-bf16-centered-momentum-inf-skip", None, "RMSprop", BF16,
         dict(nonfinite="skip", **CENTERED, **CLIP_INF)),
    # NAdam's norm pass also snapshots each tensor's mu_product (SNAPSHOT), with or without a clip
    Step("nadam-fp32-clip", "norm-fp32-l2-step-snapshot", "NAdam", FP32, CLIP),
    Step("nadam-fp32-plain", "norm-fp32-steps-snapshot", "NAdam", FP32, {}),
    Step("nadam-bf16-decoupled-clip-amp-torch", "norm-bf16-l2-amp-step-snapshot", "NAdam", BF16,
         dict(**DECOUPLED, **CLIP), "torch"),
    Step("radam-fp32-decoupled-all-flags", None, "RAdam", FP32,
         dict(maximize=True, lr=LR, **DECOUPLED, **CLIP, **VALUE)),
    Step("radam-fp16-decoupled-clip", None, "RAdam", FP16, dict(**DECOUPLED, **CLIP)),
    Step("adamax-fp32-inf-value", None, "Adamax", FP32, dict(**CLIP_INF, **VALUE)),
    Step("adamax-bf16-clip-amp-fused", None, "Adamax", BF16, CLIP, "fusedopt"),
    # no step counter: the norm pass runs only to clip (or detect), and Lion without either is
    # its update launches alone (tests/test_compile.py counts them)
    Step("lion-fp32-clip-maximize", "norm-fp32-l2", "Lion", FP32,
         dict(maximize=True, lr=LR, weight_decay=0.1, **CLIP)),
    Step("lion-fp32-plain", None, "Lion", FP32, {}),
    Step("lion-bf16-clip-amp-torch", None, "Lion", BF16, CLIP, "torch"),
    Step("adamw-bf16-sr-clip", None, "AdamW", BF16, dict(stochastic_rounding=True, **CLIP)),
    Step("adamw-bf16-remainder-clip-amp-fused", None, "AdamW", BF16,
         dict(master_weights=True, **CLIP), "fusedopt"),
    Step("adamw-fp16-copy-bf16-states-sr", None, "AdamW", FP16,
         dict(master_weights=True, stochastic_rounding=True, state_dtype=BF16, **CLIP)),
    Step("adam-fp32-bf16-states-sr-amsgrad", None, "Adam", FP32,
         dict(amsgrad=True, stochastic_rounding=True, state_dtype=BF16)),
    # SGD keeps a step counter for the rounding's bits: its norm pass advances it
    Step("sgd-bf16-momentum-sr-clip", "norm-bf16-l2-step", "SGD", BF16,
         dict(momentum=0.9, stochastic_rounding=True, **CLIP)),
    Step("rmsprop-fp32-bf16-states-centered-momentum-sr", None, "RMSprop", FP32,
         dict(stochastic_rounding=True, state_dtype=BF16, **CENTERED, **CLIP)),
    Step("lion-bf16-remainder-fp32-states", None, "Lion", BF16,
         dict(master_weights=True, state_dtype=FP32)),
]
# Two param groups, the first with an odd number of tensors: were the second group's grad
# addresses an int64 slice right after the first's, 8 bytes past a 16-byte boundary, the runtime
# would build that launch without divisibility on grad_ptrs_ptr, a second binary of the variant,
# and it would be checked here too (fusedopt at 35cb299 did so; padding each group's segment to an
# even index keeps every slice aligned).
GROUP_SIZES = ((1027, 3, 64), (2048, 5))
N_STEPS = 2


class Launch(NamedTuple):
    kernel: JITFunction
    args: tuple
    kwargs: dict
    step: Step


def record_launches() -> list[Launch]:
    """Every kernel launch of N_STEPS steps of each configuration in STEPS, recorded, not run."""
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
    for _ in range(N_STEPS):
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


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_report(cubin: bytes) -> dict:
    """Registers, stack frame and local memory per thread of the binary Triton built, from its
    bundled cuobjdump (``-res-usage``: 7 ms a cubin; ``-sass``, to count LDL/STL, took 0.3-1.3 s).
    These kernels keep no arrays in local memory, so a stack frame is a register spill: ptxas -v
    said "8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads" where this reads
    STACK:8."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK/LOCAL: {usage[-300:]}")
    registers, stack, local = map(int, found.groups())
    return {"registers": registers, "stack_bytes": stack, "local_bytes": local}


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
        **cubin_report(compiled.asm["cubin"]),
    }


def _constexpr(value) -> str:
    """A constexpr as the variants declare it: a rule by its name in _common.RULES."""
    if isinstance(value, JITFunction):
        names = [name for name, fn in _common.RULES.items() if fn is value]
        return names[0] if names else f"{value.fn.__name__} (not in _common.RULES)"
    return str(value)


def specialization(kernel: JITFunction, src) -> dict:
    """The constexprs and which pointer arguments the binder marked 16-byte divisible."""
    names = kernel.arg_names
    pointers = [(i, n) for i, n in enumerate(names) if str(src.signature[n]).startswith("*")]
    divisible = [n for i, n in pointers if ["tt.divisibility", 16] in src.attrs.get((i,), [])]
    return {"constexprs": {names[k[0]]: _constexpr(v) for k, v in sorted(src.constants.items())},
            "divisible": divisible,
            "not_divisible": [n for _, n in pointers if n not in divisible]}


def compile_report(archs) -> dict:
    """The report (``main``) of the launches' builds for ``archs``, in this process."""
    launches = record_launches()
    variants = {name: {"expected": {k: str(v) for k, v in sorted(expected.items())}, "builds": {}}
                for name, expected in VARIANTS.items()}
    report = {"triton": triton.__version__, "variants": variants, "launches": [],
              "configurations": [{"update": s.update, "norm": s.norm, "optimizer": s.optimizer,
                                  "kernels": [launch.kernel.fn.__name__ for launch in launches
                                              if launch.step is s]} for s in STEPS],
              "steps": N_STEPS, "param_groups": len(GROUP_SIZES)}
    for launch in launches:
        kind = "norm" if launch.kernel.fn.__name__ == "_norm_kernel" else "update"
        options = {k: v for k, v in launch.kwargs.items() if k not in launch.kernel.arg_names}
        report["launches"].append({"kernel": launch.kernel.fn.__name__, "options": sorted(options),
                                   "variant": getattr(launch.step, kind)})
    for arch in archs:
        driver.set_active(_TargetOnly(arch))  # for the rest of this process: it launches nothing
        for launch, seen in zip(launches, report["launches"]):
            if seen["variant"] is None:
                continue  # a launch no variant names (say, fp16 Adam's norm pass): not compiled
            # warmup is the run path of a launch (binder, options, compile) without the launch;
            # the kernel's cache keeps one binary per specialization and options, as at run time
            compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
            build = specialization(launch.kernel, compiled.src)
            build["options"] = {k: launch.kwargs[k] for k in seen["options"]}
            build = variants[seen["variant"]]["builds"].setdefault(_key(build),
                                                                   dict(build, launches=0))
            build["launches"] += arch == archs[0]
            if f"sm_{arch}" not in build:  # a build's later launches: the same binary
                build[f"sm_{arch}"] = machine_code(compiled)
    for v in variants.values():
        v["builds"] = list(v["builds"].values())
    return report


def _key(build: dict) -> str:
    """What makes a build a distinct binary (of one arch)."""
    return json.dumps({k: build[k] for k in ("constexprs", "divisible", "not_divisible",
                                             "options")}, sort_keys=True)


def _merge(report: dict, other: dict) -> None:
    """Adds another process's arch facts to ``report``'s builds (the same launches, so the same
    builds: a build only one arch has is added as it is, and the tests find the arch missing)."""
    for name, variant in other["variants"].items():
        builds = report["variants"][name]["builds"]
        for build in variant["builds"]:
            mine = [b for b in builds if _key(b) == _key(build)]
            if mine:
                mine[0].update({k: v for k, v in build.items() if k.startswith("sm_")})
            else:
                builds.append(build)


def main(argv) -> None:
    """``python tests/compile_kernels.py [ARCH ...]`` (default: ARCHS) prints {"triton": version,
    "variants": {variant: {"expected": constexprs, "builds": [one per distinct binary:
    {"constexprs", "divisible", "not_divisible", "options", "launches", "sm_80": facts, ...}]}},
    "launches": [{"kernel", "variant", "options": the option names the launch passed}],
    "configurations": [{"update", "norm", "optimizer", "kernels": the kernel of each launch of its
    N_STEPS steps, in order}], "steps": N_STEPS, "param_groups": len(GROUP_SIZES)}.

    One process per arch: a compile keeps one core busy, and CI has 2. With a cold Triton cache
    (triton 3.9, 34 variants) one process for both archs took 19 s of CPU; one per arch 11.6 s
    (sm_80) and 12.8 s (sm_90), 3.3 s of each the imports and the recording, done again.
    """
    archs = [int(a) for a in argv] or list(ARCHS)
    if len(archs) == 1:
        report = compile_report(archs)
    else:
        children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(a)],
                                     stdout=subprocess.PIPE, text=True) for a in archs[1:]]
        report = compile_report(archs[:1])
        for arch, child in zip(archs[1:], children):
            out, _ = child.communicate()
            if child.returncode != 0:
                raise SystemExit(f"compile_kernels.py: the sm_{arch} process failed "
                                 f"(exit {child.returncode}; its stderr is above)")
            _merge(report, json.loads(out))
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
