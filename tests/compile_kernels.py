"""Compile every kernel variant for NVIDIA targets without a GPU, and report its machine code facts.

Run as a script (``python tests/compile_kernels.py``) in a process without TRITON_INTERPRET, since
the interpreter replaces the JIT functions that triton.compile needs. Prints one JSON object:
{variant: {arch: {"v4_loads", "v4_stores", "registers", "spill_bytes", "ptxas"}}}.
Used by tests/test_compile.py; also handy by hand when tuning a kernel.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedopt.kernels import _common
from fusedopt.kernels.adam import _adam_kernel
from fusedopt.kernels.norm import _norm_kernel
from fusedopt.kernels.sgd import _sgd_kernel

TABLES = {"table_ptr": "*i64", "grad_ptrs_ptr": "*i64", "block_tensor_ptr": "*i32",
          "block_index_ptr": "*i32"}
NORM_SIG = {**TABLES, "partials_ptr": "*fp32", "flags_ptr": "*fp32", "inv_scale_ptr": "*fp32",
            "n_blocks": "i32", "max_value": "fp32"}
UPDATE_SIG = {**TABLES, "partials_ptr": "*fp32", "out_ptr": "*fp32", "lr_ptr": "*fp32",
              "inv_scale_ptr": "*fp32", "found_ptr": "*fp32", "n_blocks": "i32",
              "n_partials": "i32", "write_out": "i32", "lr": "fp32"}
SGD_SIG = {**UPDATE_SIG, "momentum": "fp32", "one_minus_dampening": "fp32", "weight_decay": "fp32",
           "max_norm": "fp32", "max_value": "fp32"}
ADAM_SIG = {**UPDATE_SIG, "beta2": "fp32", "one_minus_beta1": "fp32", "one_minus_beta2": "fp32",
            "ln_beta1": "fp32", "ln_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32",
            "max_norm": "fp32", "max_value": "fp32"}
SIZES = dict(BLOCK=_common.BLOCK_SIZE, NUM_PARTIALS=_common.NUM_PARTIALS)
L2, INF = _common.NORM_L2, _common.NORM_INF
NO_GUARD = dict(UNSCALE=False, FOUND_IN=False, DETECT=False)
AMP_FUSED = dict(UNSCALE=True, FOUND_IN=False, DETECT=True)  # fusedopt.GradScaler
AMP_TORCH = dict(UNSCALE=True, FOUND_IN=True, DETECT=False)  # torch.amp.GradScaler


def sgd(dtype, norm, value, momentum, nesterov, maximize, lr_ptr, guard=NO_GUARD):
    return (_sgd_kernel, SGD_SIG, dict(DTYPE=dtype, NORM=norm, VALUE_CLIP=value, HAS_MOMENTUM=momentum,
                                       NESTEROV=nesterov, MAXIMIZE=maximize, LR_FROM_PTR=lr_ptr,
                                       **guard, **SIZES))


def adam(dtype, norm, value, amsgrad, maximize, decoupled, lr_ptr, guard=NO_GUARD):
    return (_adam_kernel, ADAM_SIG, dict(DTYPE=dtype, NORM=norm, VALUE_CLIP=value, AMSGRAD=amsgrad,
                                         MAXIMIZE=maximize, DECOUPLED=decoupled, LR_FROM_PTR=lr_ptr,
                                         **guard, **SIZES))


def norm(dtype, kind, value, has_step, row, unscale=False, detect=False):
    return (_norm_kernel, NORM_SIG, dict(DTYPE=dtype, ROW=row, NORM=kind, VALUE_CLIP=value,
                                         HAS_STEP=has_step, UNSCALE=unscale, DETECT=detect, **SIZES))


VARIANTS = {
    "norm-fp32-l2-value-step": norm(tl.float32, L2, True, True, 2),
    "norm-bf16-inf": norm(tl.bfloat16, INF, False, False, 1),
    "norm-fp32-steps-only": norm(tl.float32, _common.NORM_NONE, False, True, 2),
    "norm-fp32-l2-amp-detect": norm(tl.float32, L2, False, True, 2, unscale=True, detect=True),
    "norm-fp16-detect-only": norm(tl.float16, _common.NORM_NONE, False, False, 1, detect=True),
    "sgd-fp32-all-flags": sgd(tl.float32, L2, True, True, True, True, True),
    "sgd-fp32-plain": sgd(tl.float32, _common.NORM_NONE, False, False, False, False, False),
    "sgd-bf16-momentum-inf": sgd(tl.bfloat16, INF, False, True, False, False, False),
    "adam-fp32-all-flags": adam(tl.float32, L2, True, True, True, True, True),
    "adam-fp32-plain": adam(tl.float32, _common.NORM_NONE, False, False, False, False, False),
    "adamw-bf16-clip": adam(tl.bfloat16, L2, False, False, False, True, False),
    "adam-fp16-amsgrad": adam(tl.float16, INF, True, True, False, False, False),
    "adamw-fp32-clip-amp-fused": adam(tl.float32, L2, False, False, False, True, False, AMP_FUSED),
    "adam-bf16-amp-torch": adam(tl.bfloat16, _common.NORM_NONE, False, False, False, False, True,
                                AMP_TORCH),
    "sgd-fp32-momentum-clip-amp-fused": sgd(tl.float32, L2, False, True, False, False, False,
                                            AMP_FUSED),
    "sgd-fp16-all-guards": sgd(tl.float16, INF, True, True, True, True, True,
                               dict(UNSCALE=True, FOUND_IN=True, DETECT=True)),
}
ARCHS = (80, 90)


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


def main() -> None:
    report = {}
    for name, (kernel, signature, constexprs) in VARIANTS.items():
        report[name] = {}
        for arch in ARCHS:
            sig = dict(signature, **{k: "constexpr" for k in constexprs})
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            ptx = compiled.asm["ptx"]
            report[name][f"sm_{arch}"] = {
                "cubin_bytes": len(compiled.asm["cubin"]),
                "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
                **ptxas_report(ptx),
            }
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
