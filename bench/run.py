"""The main job: how much faster is one optimizer step (clip + update) with fusedopt than with the
best torch recipe, on this machine, and how close is it to what the memory system allows?

    python bench/run.py              # the full matrix for this device (GPU when there is one):
                                     # 216 rows, 3 min 55 s on 2 idle CPU cores at 199f20e
    python bench/run.py --quick      # 96 rows, 75 s there (AMP rows included); GPU: not yet timed
    python bench/run.py --compile    # also torch.compile of the torch recipe (compiling is slow)
    python bench/run.py --shapes smoke --optimizers sgd --dtypes float32 --steps 3
    python bench/run.py --clip amp   # under a GradScaler: unscale_ + clip + step vs fusedopt's
    python bench/run.py --optimizers family   # adagrad,rmsprop,nadam,radam,adamax,lion
    python bench/run.py --memory     # the memory-lean options (MEMORY) against torch's recipes
    python bench/run.py --memory bf16+sr,fp16+master --shapes resnet50 --optimizers adamw

Every implementation runs in the same process on fresh copies of the same tensors: torch.optim
for-loop, foreach and fused (where the torch class offers each), each followed by
clip_grad_norm_(foreach=True) when clipping, and fusedopt with each backend that can run here.
Lion has no torch.optim class: its torch recipes are lion_ below (lion-pytorch's step, for-loop
and foreach). Writes Markdown (also printed), JSON with every raw number, and a PNG chart to
<out-dir>/<device>-<date>[-<tag>][-N].{md,json,png} (report.result_paths: the tag says what kind
of run it was, none for the default full run: 'quick', or the options that differ from the
defaults, 'smoke-sgd-fp32-steps3'; -2, -3, ... where the name is taken, so that no run
overwrites another's files); --out-dir defaults to bench/results/ beside this script, wherever it
is run from. Progress goes to stderr, a line per row with the time left.

``--memory [NAMES]`` (all of MEMORY when no names) times instead fusedopt's memory-lean options
(``stochastic_rounding``, ``master_weights``, ``state_dtype``: fusedopt/_elementwise.py), each
against torch's best recipe for the same param dtype: torch.optim in that dtype + clip_grad_norm_,
or, for master weights, an fp32 master copy kept by hand (MASTER_IMPLS: make_master_step). Per
row: the step time, the bytes a step moves per parameter (memory_bytes_per_element; fusedopt's
torch path counted from the step itself) and the optimizer state per parameter, summed over the
tensors in ``opt.state`` after the timed steps (plus the master recipe's fp32 copy and its fp32
grads, which live outside it). Clip on by default (off allowed; amp is not offered there).
Writes <out-dir>/memory-<device>-<date>[-<tag>][-N].{md,json}, never over an earlier run.
Shape sets come from bench/shapes.py; measuring from bench/measure.py; output from report.py.
"""
import argparse
import datetime
import gc
import inspect
import statistics
import time

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


# -- Lion's torch recipe ---------------------------------------------------------------------------

def lion_(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, foreach):
    """One Lion step in place, the torch recipe that stands in for the missing torch.optim.Lion.

    for-loop: lion-pytorch's ``update_fn`` op for op (lucidrains/lion-pytorch,
    lion_pytorch/lion_pytorch.py), the step most Lion users run:
    ``p.mul_(1 - lr wd); u = m.clone().mul_(beta1).add(g, alpha=1 - beta1).sign_();
    p.add_(u, alpha=-lr); m.mul_(beta2).add_(g, alpha=1 - beta2)``.
    foreach: the same arithmetic as torch._foreach_* ops over all tensors at once (no clone: the
    first mul writes the new tensor), as torch.optim's foreach implementations are written.
    """
    if not foreach:
        for p, g, m in zip(params, grads, exp_avgs):
            p.mul_(1.0 - lr * weight_decay)
            update = m.clone().mul_(beta1).add(g, alpha=1.0 - beta1).sign_()
            p.add_(update, alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    update = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(update, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


class _Recipe(torch.optim.Optimizer):
    """A functional step (lion_, lamb_) as a torch.optim.Optimizer, so that GradScaler,
    torch.compile and the recipes below take it as any torch.optim class: ``_step_group(group,
    params with a grad, foreach)`` per group; ``foreach=None`` picks foreach for CUDA tensors and
    the for-loop otherwise, as torch.optim."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            self._step_group(group, params, foreach)
        return loss


class TorchLion(_Recipe):
    """lion_ as an optimizer (_Recipe): lion-pytorch's defaults and state key ``exp_avg``."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      foreach=foreach))

    def _step_group(self, group, params, foreach):
        for p in params:
            if "exp_avg" not in self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
        lion_(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
              lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
              weight_decay=group["weight_decay"], foreach=foreach)


# -- LAMB's torch recipe ---------------------------------------------------------------------------

def lamb_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
          foreach):
    """One LAMB step in place, the torch recipe that stands in for the missing torch.optim.LAMB:
    NVIDIA Apex's FusedLAMB math (apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu) with
    its defaults (bias correction, adam_w_mode, grad averaging), written with torch ops, its own
    clip left to clip_grad_norm_. ``step`` counts this step (1 on the first).

    m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2;
    u = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay p;
    p -= lr r u with r = ||p|| / ||u|| per tensor (1 where either norm is 0, or without decay).
    for-loop: one tensor at a time; foreach: the same ops as torch._foreach_* over all tensors.
    The trust ratios stay 0-dim device tensors (no host read), applied by an addcmul_.
    """
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avgs, bc1)
        torch._foreach_div_(update, denom)
        del denom
        if weight_decay != 0:
            torch._foreach_add_(update, params, alpha=weight_decay)
        scales = _lamb_scales(torch._foreach_norm(params), torch._foreach_norm(update),
                              lr, weight_decay)
        torch._foreach_addcmul_(params, update, scales)
        return
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        update = (m / bc1).div_((v / bc2).sqrt_().add_(eps))
        if weight_decay != 0:
            update.add_(p, alpha=weight_decay)
        (scale,) = _lamb_scales([p.norm()], [update.norm()], lr, weight_decay)
        p.addcmul_(update, scale)


def _lamb_scales(p_norms, u_norms, lr, weight_decay):
    """-lr * trust ratio per tensor, as 0-dim tensors."""
    if weight_decay == 0:  # Apex: no trust ratio for params without decay (use_nvlamb=False)
        return [torch.full_like(n, -lr) for n in p_norms]
    p_norm, u_norm = torch.stack(p_norms), torch.stack(u_norms)
    ratio = torch.where((p_norm != 0) & (u_norm != 0), p_norm / u_norm, 1.0)
    return list((-lr * ratio).unbind())


class TorchLAMB(_Recipe):
    """lamb_ as an optimizer (_Recipe): Apex's defaults; state ``exp_avg``, ``exp_avg_sq`` and,
    as Apex, one step count per param group."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *,
                 foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach))

    def _step_group(self, group, params, foreach):
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        group["step"] = group.get("step", 0) + 1
        lamb_(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
              [self.state[p]["exp_avg_sq"] for p in params], step=group["step"],
              lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
              eps=group["eps"], weight_decay=group["weight_decay"], foreach=foreach)


# name -> (torch class, fusedopt class, hyperparameters shared by every implementation). Settings
# as they are commonly run, and every state tensor in use: RMSprop with momentum and centered
# (3 states), Lion with its decoupled weight decay (lion-pytorch multiplies p even at 0).
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, fusedopt.SGD, dict(lr=1e-3, momentum=0.9)),
    "adam": (torch.optim.Adam, fusedopt.Adam, dict(lr=1e-3)),
    "adamw": (torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "adagrad": (torch.optim.Adagrad, fusedopt.Adagrad, dict(lr=1e-2)),
    "rmsprop": (torch.optim.RMSprop, fusedopt.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True)),
    "nadam": (torch.optim.NAdam, fusedopt.NAdam, dict(lr=1e-3)),
    "radam": (torch.optim.RAdam, fusedopt.RAdam, dict(lr=1e-3)),
    "adamax": (torch.optim.Adamax, fusedopt.Adamax, dict(lr=1e-3)),
    "lion": (TorchLion, fusedopt.Lion, dict(lr=1e-4, weight_decay=0.1)),
    "lamb": (TorchLAMB, fusedopt.LAMB, dict(lr=1e-3, weight_decay=0.01)),
    "adafactor": (torch.optim.Adafactor, fusedopt.Adafactor, dict(lr=1e-2)),
}
# beyond SGD and Adam(W). Muon is not here: its step is Newton-Schulz GEMMs (15,000-23,000 FLOP
# per element at width 768), not a pass over memory, on 2-D tensors only; bench/muon.py times it.
FAMILY = ("adagrad", "rmsprop", "nadam", "radam", "adamax", "lion", "lamb", "adafactor")
# State tensors of p's size per parameter, with OPTIMIZERS' settings (memory, and the bytes a fused
# update moves: p read + written, g read, each state read + written)
STATE_COPIES = {"sgd": 1, "adam": 2, "adamw": 2, "adagrad": 1, "rmsprop": 3, "nadam": 2,
                "radam": 2, "adamax": 2, "lion": 1, "lamb": 2, "adafactor": 1}
# Bytes counted from the step itself (measure.ByteCount, one more step after the timed ones), not
# from bytes_per_element's tables: LAMB's passes (fusedopt/optim/lamb.py) differ by dtype and
# skip mode, Adafactor's by tensor shape (factored or not, stacked or not, 1x1 conv kernels).
COUNTED = ("lamb", "adafactor")
# RAdam's first 5 steps skip the adaptive term (rho_t <= 5 with beta2 = 0.999), a different
# branch in torch's for-loop: untimed, so that every timed step is the steady state
MIN_WARMUP = {"radam": 5}
TORCH_IMPLS = ("torch for-loop", "torch foreach", "torch fused")
COMPILED = "torch.compile(foreach)"
OUR_IMPLS = ("fusedopt (torch)", "fusedopt (triton)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# (device type, quick) -> the matrix run by default. The family (FAMILY) is in the full GPU run
# only: there each row takes milliseconds, and it times the one Triton update kernel against
# torch's foreach (LAMB and Adafactor: fusedopt's torch path, on every device). On CPU fusedopt
# runs the elementwise family's rules op by op (fusedopt/_elementwise.py: 2-5x the bytes of
# torch's foreach, 0.6-2.8 s a step on GPT-2 small). Measured on the 2-core CI machine
# (bench/results/family-cpu-2026-11-29.md), the family would add ~23 min to the full CPU run and
# 30 s to 2 min per optimizer to --quick (RAdam's 5 warm-up steps; Adafactor's torch recipes
# take 0.8-1.2 s a step on ResNet-50's conv kernels); `--optimizers family` runs it.
DEFAULTS = {
    ("cpu", True): dict(shapes="gpt2-small,resnet50,many-small", optimizers="sgd,adamw",
                        dtypes="float32,bfloat16", clip="on,amp", steps=5, warmup=1),
    ("cpu", False): dict(shapes="gpt2-small,resnet50,many-small", optimizers="sgd,adam,adamw",
                         dtypes="float32,bfloat16", clip="on,off,amp", steps=10, warmup=3),
    ("cuda", True): dict(shapes="gpt2-small,llama-1b,resnet50,many-small", optimizers="sgd,adamw",
                         dtypes="float32,bfloat16", clip="on,amp", steps=20, warmup=3),
    ("cuda", False): dict(shapes="gpt2-small,llama-1b,resnet50,many-small",
                          optimizers="sgd,adam,adamw,family", dtypes="float32,bfloat16",
                          clip="on,off,amp", steps=50, warmup=5),
}


def impls_for(opt: str, device: torch.device, compile_: bool) -> tuple[str, ...]:
    """Every implementation of ``opt`` that can run on ``device``: torch's fused one where its
    class takes ``fused=`` (torch 2.13: SGD, Adam, AdamW, Adagrad; RMSprop, NAdam, RAdam, Adamax
    and Adafactor take foreach only, and the stand-ins for Lion and LAMB are for-loop and
    foreach), the Triton kernels only on CUDA and for optimizers that have them."""
    from fusedopt._dispatch import triton_unavailable_reason
    torch_cls, our_cls, _ = OPTIMIZERS[opt]
    triton_ok = (device.type == "cuda" and triton_unavailable_reason({device}) is None
                 and not getattr(our_cls, "_NO_KERNELS", None))  # LAMB, Adafactor: torch path
    takes_fused = "fused" in inspect.signature(torch_cls).parameters
    return (TORCH_IMPLS[:3 if takes_fused else 2] + ((COMPILED,) if compile_ else ())
            + OUR_IMPLS[:2 if triton_ok else 1])


# Update pass of the torch recipes, steady state: elements read + written per parameter element,
# op by op (bytes_per_element's docstring), for (for-loop, foreach). The fused ones move the least
# a step can: fused_elements().
TORCH_UPDATE_ELEMENTS = {"sgd": (8, 8), "adam": (18, 18), "adamw": (20, 20), "adagrad": (11, 13),
                         "rmsprop": (24, 24), "nadam": (22, 22), "radam": (28, 22),
                         "adamax": (16, 16), "lion": (19, 17)}
# fusedopt's torch path for the family runs its rule (fusedopt/rules.py) one tensor at a time in
# fp32, each operator a whole-tensor pass: bytes of those passes, per element, fp32 temporaries
# and 1-byte masks (bytes_per_element's docstring). SGD and Adam(W) take torch's fused ops instead.
# fp32 / fp64 CPU steps that cannot skip: fusedopt's torch path runs torch.optim's own code
# (fusedopt/_elementwise.ElementwiseStep._torch_step), for-loop (False) or foreach (True)
TORCH_STEP_FOREACH = {"rmsprop": False, "nadam": False, "radam": True, "adamax": False}
# Since f828fe1 the rule's sqrt goes through fp64 to round correctly (fusedopt/_torch_lang.sqrt:
# x.double() 4 + 8, sqrt 8 + 8, .float() 8 + 4 = 40 where an fp32 sqrt moved 8): +32 for each of
# Adagrad, RMSprop, NAdam and RAdam, whose rules take one sqrt
RULE_FP32_BYTES = {"adagrad": 120, "rmsprop": 212, "nadam": 212, "radam": 200, "adamax": 120,
                   "lion": 92}


def fused_elements(opt: str) -> int:
    """The least a step can move: p read + written, g read, each state read + written."""
    return 3 + 2 * STATE_COPIES[opt]


def bytes_per_element(opt: str, impl: str, elt_size: int, clip: str,
                      device_type: str = "cuda") -> int:
    """Bytes one step moves per parameter element on ``device_type``: whole-tensor reads + writes.
    Not for COUNTED optimizers, whose steps are counted as they run.

    Counted from the kernels each implementation runs (torch 2.13: torch/optim/*.py,
    torch/nn/utils/clip_grad.py; fusedopt/_elementwise.py rule_torch_); step counters and norms
    are a few bytes in all and not counted. A kernel reading one tensor twice (addcmul_(g, g))
    counts it once. tests/test_bench_bytes.py checks every torch-run row against a count of the
    aten ops one step really dispatches.

    Clip. torch, every recipe: the norm reads g (1), then mul_ by the clip coefficient reads and
    writes g (2) = 3; clip_grad_norm_ always multiplies (no host branch). fusedopt, both backends:
    the norm reads g (1). Torch backend: the multiply is folded into the update as ``grad_scale``,
    and torch's fused op then also writes the clipped g back (checked on CPU: .grad changes only
    when grad_scale is passed); the rule path divides g into an fp32 temporary (read 4 B + write
    4 B) and copies it back to g (4 + elt). Triton backend: the kernel scales g in registers,
    never writes it.

    Update, steady state, in elements of the param dtype (torch's ops run in it):
      fused (torch fused, fusedopt triton, and the fusedopt torch path of SGD / Adam / AdamW,
      which calls torch's fused ops): p, g, each state read; p, each state written: 3 + 2 x
      STATE_COPIES (SGD momentum 5, Adam(W) / NAdam / RAdam / Adamax 7, Adagrad / Lion 5,
      RMSprop centered + momentum 9); the torch path writes g too when it clips (+1), except
      bf16 SGD on CPU, where fusedopt takes torch's foreach SGD (fusedopt/optim/sgd.py: the fused
      CPU op is wrong there) after dividing g by the clip (2): 8 + 2.
      for-loop / foreach (TORCH_UPDATE_ELEMENTS), OPTIMIZERS' settings (x = new tensor):
        SGD momentum   buf.mul_ 2, buf.add_(g) 3, p.add_(buf) 3                              8 / 8
        Adam           m.lerp_(g) 3, v.mul_ 2, v.addcmul_(g, g) 3, x = sqrt(v) 2, x.div_ 2,
                       x.add_(eps) 2, p.addcdiv_(m, x) 4; AdamW + p.mul_(1 - lr wd) 2  18 / AdamW 20
        Adagrad        s.addcmul_(g, g) 3, x = sqrt(s) 2, x.add_(eps) 2, p.addcdiv_(g, x) 4;
                       foreach also forms x = -clr g first (2)                               11 / 13
        RMSprop        v.mul_ 2, v.addcmul_(g, g) 3, gavg.lerp_(g) 3, x = v.addcmul(gavg,
          (centered,   gavg) 3, x.sqrt_ 2, x.add_(eps) 2, buf.mul_ 2, buf.addcdiv_(g, x) 4,
          momentum)    p.add_(buf) 3                                                         24 / 24
        NAdam          m.lerp_ 3, v.mul_ 2, v.addcmul_ 3, x = v / bc2 2, x.sqrt_ 2, x.add_ 2,
                       p.addcdiv_(g, x) 4, p.addcdiv_(m, x) 4                                22 / 22
        RAdam          m.lerp_ 3, v.mul_ 2, v.addcmul_ 3; for-loop: x = m / bc1 2, x * lr 2,
          (rectified,  y = sqrt(v) 2, y.add_ 2, bc2^0.5 / y 2 (reciprocal) + 2, product 3,
          step >= 6)   * rect 2, p.add_ 3 = 28; foreach: y = sqrt(v) 2, y.add_ 2, y.div_ 2,
                       reciprocal_ 2, add_ 2, p.addcmul_(m, y) 4 = 22                       28 / 22
        Adamax         m.lerp_ 3, u.mul_ 2, x = abs(g) 2, x.add_(eps) 2, u = max(u, x) 3,
                       p.addcdiv_(m, u) 4                                                    16 / 16
        Lion           for-loop (lion-pytorch): p.mul_ 2, x = m.clone() 2, x.mul_ 2, x =
                       x.add(g) 3, x.sign_ 2, p.add_(x) 3, m.mul_ 2, m.add_(g) 3 = 19;
                       foreach: the same but x = m * beta1 (no clone) = 17                   19 / 17
      fusedopt torch path of the family (rule_torch_, one tensor, or a 2**18-element piece of
      one, at a time, fp32): the rule's operators, RULE_FP32_BYTES bytes (Lion: p * (1 - lr wd)
      8, beta1 m 8, (1 - beta1) g 8, + 12, sign 8, beta2 m 8, (1 - beta2) g 8, + 12, lr sign 8,
      p - 12 = 92), then p and each state copied back (4 B read + elt written each); in bf16
      each of p, g and the states is first converted to fp32 (elt read + 4 B written). The
      pieces keep those temporaries in cache, so these bytes overstate what reaches DRAM. On CPU
      Adagrad's torch path is torch's fused Adagrad instead (fused row), and fp32/fp64 RMSprop,
      NAdam, RAdam and Adamax steps that cannot skip run torch's own for-loop or foreach
      (TORCH_STEP_FOREACH) after dividing g by the clip (read + write g).
    Totals with clip, fp32: SGD 11 / 8 / 7 / 6, Adam 21 / 10 / 9 / 8, AdamW 23 / 10 / 9 / 8 for
    foreach-or-for-loop / fused / fusedopt torch / fusedopt triton: fp32 AdamW is 92 / 40 / 36 /
    32 bytes per element (DESIGN.md's budget: 40 -> 32). torch.compile is counted as the fused
    recipe: what Inductor really fuses is not known here, so its GB/s is a lower bound.

    AMP (clip "amp"). torch recipes: scaler.unscale_ reads and writes g (2) before the clip; the
    scaler's step adds no pass for a non-fused optimizer (it reads found_inf on the host) and, for
    fused=True, none either (unscale_ already recorded found_inf). fusedopt with fusedopt.GradScaler:
    Triton: the norm pass also unscales and finds infs, nothing more (fp32 AdamW: 32 bytes vs 48
    for fused + unscale_ + clip); torch path: GradScaler's own unscale-and-check op (2), and on
    the rule path each new p and state value goes through torch.where(found_inf, old, new)
    (fp32: read 8 B, write 4 B; bf16: old converted to fp32 first, + 6 B).
    """
    if opt in COUNTED:
        raise ValueError(f"{opt}: bytes counted at run time (COUNTED), no formula")
    ours = impl in OUR_IMPLS
    clip_elems = (1 if ours else 3) if clip != "off" else 0
    if clip == "amp" and impl != "fusedopt (triton)":
        clip_elems += 2
    if impl == "fusedopt (torch)" and opt in TORCH_STEP_FOREACH and device_type == "cpu" \
            and elt_size in (4, 8) and clip != "amp":  # torch's own step after g / coef (2)
        update = TORCH_UPDATE_ELEMENTS[opt][TORCH_STEP_FOREACH[opt]]
        return (clip_elems + update + (2 if clip != "off" else 0)) * elt_size
    if impl == "fusedopt (torch)" and opt in RULE_FP32_BYTES \
            and not (opt == "adagrad" and device_type == "cpu"):
        states = STATE_COPIES[opt]
        moved = RULE_FP32_BYTES[opt] + (1 + states) * (4 + elt_size)  # rule + copies back
        if elt_size != 4:
            moved += (2 + states) * (elt_size + 4)  # p, g and the states converted to fp32
        if clip != "off":
            moved += 8 + 4 + elt_size  # g / grad_scale into an fp32 temporary, copied back to g
        if clip == "amp":  # each new value through torch.where(found_inf, old, new)
            moved += (1 + states) * (12 + (elt_size + 4 if elt_size != 4 else 0))
        return clip_elems * elt_size + moved
    if impl in ("torch for-loop", "torch foreach"):
        update = TORCH_UPDATE_ELEMENTS[opt][impl == "torch foreach"]
    elif impl == "fusedopt (torch)" and opt == "sgd" and elt_size == 2 and device_type == "cpu":
        update = TORCH_UPDATE_ELEMENTS[opt][1] + (2 if clip != "off" else 0)  # foreach, g / coef
    else:
        update = fused_elements(opt)
        if impl == "fusedopt (torch)" and clip != "off":
            update += 1  # the clipped g written back
    return (clip_elems + update) * elt_size


# -- --memory: fusedopt's memory-lean options against torch's recipes ------------------------------

# name -> (param dtype, fusedopt options, the torch recipe it is measured against: "plain",
# torch.optim in the param dtype, or "fp32 master", make_master_step's fp32 copy kept by hand).
# state_dtype None is the param's dtype (torch's layout), so "bf16+sr" is bf16 params *and* bf16
# moments, both rounded stochastically (state_dtype=torch.bfloat16 changes nothing for bf16
# params); "bf16+sr+fp32-states" rounds the params only.
MEMORY = {
    "bf16": (torch.bfloat16, {}, "plain"),
    "bf16+sr": (torch.bfloat16, dict(stochastic_rounding=True), "plain"),
    "bf16+sr+fp32-states": (torch.bfloat16, dict(stochastic_rounding=True,
                                                 state_dtype=torch.float32), "plain"),
    "bf16+master": (torch.bfloat16, dict(master_weights=True), "fp32 master"),
    "bf16+master+fp32-states": (torch.bfloat16, dict(master_weights=True,
                                                     state_dtype=torch.float32), "fp32 master"),
    "fp16+master": (torch.float16, dict(master_weights=True), "fp32 master"),
    "fp16+master+fp32-states": (torch.float16, dict(master_weights=True,
                                                    state_dtype=torch.float32), "fp32 master"),
    "fp32+bf16-states": (torch.float32, dict(state_dtype=torch.bfloat16), "plain"),
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# the hand-kept fp32 master recipe, one per torch implementation of the inner optimizer
MASTER_IMPLS = {f"{impl} + fp32 master": impl for impl in TORCH_IMPLS}
# On the CPU the options run fusedopt's torch-path rule, whose remainders and random bits are
# int64 tensor arithmetic: 1.3-3.0 s a step on GPT-2 small in bf16 (torch's fused AdamW: 57 ms),
# and the whole --memory run (AdamW and SGD, the three CPU shape sets) took 5 min on the 2-core CI
# machine (bench/results/memory-cpu-2026-11-29.md), so it is a mode of its own, not in DEFAULTS.
MEMORY_DEFAULTS = {
    ("cpu", True): dict(shapes="resnet50", optimizers="adamw", clip="on", steps=3, warmup=1),
    ("cpu", False): dict(shapes="gpt2-small,resnet50,many-small", optimizers="adamw,sgd",
                         clip="on", steps=5, warmup=2),
    ("cuda", True): dict(shapes="gpt2-small", optimizers="adamw", clip="on", steps=20, warmup=3),
    ("cuda", False): dict(shapes="gpt2-small,llama-1b,resnet50,many-small",
                          optimizers="adamw,sgd", clip="on", steps=50, warmup=5),
}


def memory_impls_for(opt: str, memory: str, device: torch.device) -> tuple[str, ...]:
    """The torch recipes ``memory`` is measured against (impls_for's torch.optim ones, in the
    param dtype or inside the fp32 master recipe), then fusedopt's backends that run here."""
    torch_impls = [i for i in impls_for(opt, device, False) if i in TORCH_IMPLS]
    ours = tuple(i for i in impls_for(opt, device, False) if i in OUR_IMPLS)
    if MEMORY[memory][2] == "fp32 master":
        return tuple(f"{i} + fp32 master" for i in torch_impls) + ours
    return tuple(torch_impls) + ours


def memory_triton_bytes(opt: str, memory: str, clip: str) -> int:
    """Bytes per parameter one Triton step moves (kernels/update.py's _block), by hand: the norm
    pass reads g (clip on); the update reads g, reads p (not with an fp16 param's fp32 copy: it
    reads the copy instead), writes p, reads and writes every state column in the state dtype and
    the master column (a bf16 param's int16 remainder 2 + 2, an fp16 param's fp32 copy 4 + 4).
    Random bits for stochastic rounding are hashed in registers and move nothing.

    The torch path moves much more (it is counted, measure.ByteCount): its rule runs op by op on
    fp32 temporaries (bytes_per_element's docstring), and its remainders and random bits are int64
    tensor arithmetic (fusedopt/rounding.py), a few hundred bytes per element and stored column.
    """
    dtype, options, _ = MEMORY[memory]
    elt = torch.empty((), dtype=dtype).element_size()
    state_elt = torch.empty((), dtype=options.get("state_dtype") or dtype).element_size()
    master = {torch.bfloat16: 2, torch.float16: 4}.get(dtype, 0) if options.get(
        "master_weights") else 0
    p_read = 0 if master == 4 else elt
    return ((elt if clip != "off" else 0) + elt + p_read + elt
            + 2 * STATE_COPIES[opt] * state_elt + 2 * master)


def memory_bytes_per_element(opt: str, memory: str, impl: str, clip: str,
                             device_type: str = "cuda") -> int:
    """Bytes one step of ``impl`` moves per parameter in the ``memory`` configuration (MEMORY),
    whole-tensor reads + writes as bytes_per_element counts them; tests/test_bench_bytes.py checks
    the torch recipes' against a count of the aten ops a step dispatches.

    torch.optim in the param dtype: bytes_per_element's row for that dtype.
    fp32 master (make_master_step): the model's grads copied into the fp32 grads (elt read + 4
    written), then clip_grad_norm_ and torch.optim on fp32 tensors (bytes_per_element's fp32 row:
    AdamW fused 40, foreach 92 with the clip), then the fp32 masters copied into the model's params
    (4 read + elt written): bf16 AdamW fused 40 + 6 + 6 = 52.
    fusedopt (triton): memory_triton_bytes. fusedopt (torch): counted as the step runs (ValueError
    here), since its rounding arithmetic is int64 tensor ops that change with fusedopt/rounding.py.
    """
    dtype = MEMORY[memory][0]
    elt = torch.empty((), dtype=dtype).element_size()
    if impl == "fusedopt (triton)":
        return memory_triton_bytes(opt, memory, clip)
    if impl in MASTER_IMPLS:
        return 2 * (elt + 4) + bytes_per_element(opt, MASTER_IMPLS[impl], 4, clip, device_type)
    if impl in TORCH_IMPLS:
        return bytes_per_element(opt, impl, elt, clip, device_type)
    raise ValueError(f"{memory} {impl}: the torch path's bytes are counted at run time")


def make_master_step(torch_cls, hyper: dict, flags: dict, params: list[torch.Tensor], clip: str):
    """torch's mixed-precision recipe with an fp32 master copy kept by hand (Apex amp O2's master
    params, Megatron's fp32 main params), for bf16 or fp16 ``params`` with grads: each step copies
    the model's grads into the fp32 grads of fp32 masters made from the params once, clips those
    (clip_grad_norm_, foreach), steps the masters with ``torch_cls(**hyper, **flags)`` (fp32
    state), and copies the masters into the model's params (rounded to nearest). The fp32 grads
    are kept between steps (one buffer, no allocation per step; +4 bytes a param, as Apex's).
    Returns the step; its ``optimizer`` and ``held`` (masters and their grads) attributes are what
    state_bytes counts."""
    with torch.no_grad():
        masters = [p.detach().to(torch.float32, copy=True) for p in params]
    for m in masters:
        m.grad = torch.zeros_like(m)
    master_grads = [m.grad for m in masters]
    optimizer = torch_cls(masters, **hyper, **flags)

    @torch.no_grad()
    def step():
        torch._foreach_copy_(master_grads, [p.grad for p in params])
        if clip != "off":
            torch.nn.utils.clip_grad_norm_(masters, MAX_NORM, foreach=True)
        optimizer.step()
        torch._foreach_copy_(params, masters)
    step.optimizer, step.held = optimizer, masters + master_grads
    return step


def state_bytes(step) -> tuple[int, int]:
    """(bytes of every tensor in the step's ``optimizer.state``, bytes of the tensors it keeps
    outside it: the master recipe's fp32 copy and grads)."""
    inside = sum(v.nbytes for st in step.optimizer.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor))
    return inside, sum(t.nbytes for t in getattr(step, "held", ()))


def make_step(opt: str, impl: str, params: list[torch.Tensor], clip: str,
              memory: str | None = None):
    """One step of ``impl`` over ``params`` (their .grad set) in ``clip`` mode (CLIP_MODES). With
    ``memory`` (one of MEMORY's names): fusedopt takes that configuration's options, MASTER_IMPLS
    run make_master_step, and the step carries its optimizer as ``step.optimizer`` (state_bytes)."""
    torch_cls, our_cls, hyper = OPTIMIZERS[opt]
    device = params[0].device
    if impl in OUR_IMPLS:
        backend = impl.split("(")[1].rstrip(")")
        optimizer = our_cls(params, **hyper, max_grad_norm=None if clip == "off" else MAX_NORM,
                            backend=backend, **(MEMORY[memory][1] if memory else {}))
        if clip != "amp":
            if memory is None:
                return optimizer.step

            def our_step():
                optimizer.step()
            our_step.optimizer = optimizer
            return our_step
        scaler = _scaler(fusedopt.GradScaler, device)

        def amp_step():
            scaler.step(optimizer)
            scaler.update()
        return amp_step
    if impl in MASTER_IMPLS:
        flags = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True),
                 "torch fused": dict(fused=True)}[MASTER_IMPLS[impl]]
        return make_master_step(torch_cls, hyper, flags, params, clip)
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
    step.optimizer = optimizer
    return torch.compile(step) if impl == COMPILED else step


def _scaler(cls, device):
    """A GradScaler at AMP_SCALE that never grows during a run (the grads stay as they are)."""
    scaler = cls(device.type, init_scale=AMP_SCALE, growth_interval=1 << 30)
    scaler.scale(torch.ones((), device=device))  # makes its scale tensor, as a first loss would
    return scaler


def measure_impl(opt, impl, masters, clip, args, device, memory=None) -> dict:
    """Step time, host time and launches of one implementation on fresh copies of ``masters``;
    with ``memory`` (MEMORY's names) also the optimizer state (state_bytes) after the timed steps,
    and for fusedopt's torch path the bytes of one more step, counted."""
    master_params, master_grads = masters
    params = [m.clone().requires_grad_() for m in master_params]
    for p, g in zip(params, master_grads):
        p.grad = g.clone()
    grads = [p.grad for p in params]

    def restore():  # the torch path's clip rewrote .grad: every step sees the same gradients
        torch._foreach_copy_(grads, master_grads)
    step = make_step(opt, impl, params, clip, memory)
    warmup = max(args.warmup, MIN_WARMUP.get(opt, 1))
    times = measure.time_steps(step, restore, warmup, args.steps, device)
    out = dict(times_ms=times, host_ms=measure.host_ms(step, restore, device),
               launches=measure.launches_per_step(step, restore, device))
    if opt in COUNTED or (memory is not None and impl == "fusedopt (torch)"):
        out["bytes_per_step"] = measure.bytes_per_step(step, restore)
    if memory is not None:
        out["state_bytes"], out["held_bytes"] = state_bytes(step)
    del step, restore, params, p  # the optimizer state goes with the step; grads with restore
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fits_in_memory(numel: int, elt: int, opt: str, device: torch.device,
                   need: int | None = None) -> bool:
    """Masters (params + grads), one working copy (params + grads) and the optimizer state, or
    ``need`` bytes."""
    if need is None:
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
    parser.add_argument("--quick", action="store_true",
                        help="the short matrix (see DEFAULTS, MEMORY_DEFAULTS)")
    parser.add_argument("--shapes", help=f"comma list from bench/shapes.py: {', '.join(shapes.NAMES)}")
    parser.add_argument("--optimizers", help=f"comma list of {', '.join(OPTIMIZERS)}, or "
                        f"'family' for {','.join(FAMILY)}")
    parser.add_argument("--dtypes", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--clip", help="comma list of off, on, amp (a GradScaler step with clip)")
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps first (>= 1: state is made then)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd recipes")
    parser.add_argument("--memory", nargs="?", const="all", metavar="NAMES",
                        help="time the memory-lean configurations instead, against torch's "
                             f"recipes: a comma list of {', '.join(MEMORY)} (all when no names); "
                             "they name their dtypes (no --dtypes); clip off or on")
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="where the files go (default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    device_type = "cuda" if torch.device(args.device).type == "cuda" else "cpu"
    memory = args.memory is not None
    for key, value in (MEMORY_DEFAULTS if memory else DEFAULTS)[(device_type, args.quick)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.optimizers = ",".join(",".join(FAMILY) if name == "family" else name
                               for name in args.optimizers.split(","))
    known = {"shapes": shapes.NAMES, "optimizers": OPTIMIZERS, "dtypes": DTYPES,
             "clip": CLIP_MODES}
    if memory:
        if args.dtypes is not None or args.compile:
            parser.error("--memory: its configurations name their dtypes, and time no "
                         "torch.compile (no --dtypes, no --compile)")
        if args.memory == "all":
            args.memory = ",".join(MEMORY)
        del known["dtypes"]
        known.update(memory=MEMORY, clip=("off", "on"),
                     optimizers=[o for o in OPTIMIZERS if o not in COUNTED])
    report.split_names(parser, args, known)
    args.tag = run_tag(args, device_type, memory)
    return args


def run_tag(args, device_type: str, memory: bool) -> str:
    """The tag in the run's file names (report.run_tag): '' for the default full run, 'quick',
    and the options given that differ from the mode's defaults; 'family' stands for FAMILY."""
    defaults = dict((MEMORY_DEFAULTS if memory else DEFAULTS)[(device_type, args.quick)])
    defaults["optimizers"] = ",".join(",".join(FAMILY) if name == "family" else name
                                      for name in defaults["optimizers"].split(","))
    if memory:
        defaults = dict(memory=",".join(MEMORY), **defaults)
    changed = report.changed_args(args, defaults)
    if "optimizers" in changed and set(FAMILY) <= set(changed["optimizers"]):
        changed["optimizers"] = [o for o in changed["optimizers"] if o not in FAMILY] + ["family"]
    if args.compile:
        changed["compile"] = True
    return report.run_tag("quick" if args.quick else "", changed)



def seeded_masters(shape_list, dtype, device):
    """The params and grads every implementation of a shape set starts from (copied per row),
    from one seeded generator, so that every row steps the same numbers."""
    gen = torch.Generator(device=device).manual_seed(0)
    return ([torch.randn(s, generator=gen, device=device).to(dtype) for s in shape_list],
            [torch.randn(s, generator=gen, device=device).to(dtype) for s in shape_list])


def _close_meta(meta, device, busy_start, skipped, progress) -> None:
    """The run's end in its metadata: how busy the CPUs were at start and end (a warning when
    they were), what was skipped, and the wall time of the rows (wall_s: from the first row's
    start to the last row's end, start-up and the copy bandwidth not counted)."""
    meta["wall_s"] = round(time.perf_counter() - progress.start, 1)
    if device.type == "cpu":
        busy_end = measure.busy_cpus()
        measure.warn_if_busy(busy_end, "at the end")
        meta["busy_cpus"] = (None if busy_start is None or busy_end is None
                             else f"{busy_start:.2f} / {busy_end:.2f}")
    meta["skipped"] = skipped

# A row's cost in the progress lines' time left (report.Progress): its shape set's elements plus
# this many per tensor. Fitted to the default CPU run at 199f20e (2-core EPYC, idle: a row took
# 2.0 s on gpt2-small, 0.47 s on resnet50, 0.68 s on many-small's 2000 tensors); counting rows
# alike, the time left read 3x the truth while gpt2-small's rows ran, weighed so, 1.1-1.5x.
ROW_TENSOR_WORK = 20_000


def row_work(set_name: str) -> int:
    shape_list = shapes.get(set_name)
    return shapes.numel(shape_list) + ROW_TENSOR_WORK * len(shape_list)


def memory_rows(opt: str, configs, dtype, device) -> list[tuple[str, str]]:
    """(configuration, implementation) of each row --memory times for ``opt`` among the
    ``configs`` in param dtype ``dtype``, in order: the torch recipes of one (dtype, recipe)
    once, on the first configuration that names them."""
    rows, torch_done = [], set()
    for name in configs:
        if MEMORY[name][0] != dtype:
            continue
        for impl in memory_impls_for(opt, name, device):
            if impl not in OUR_IMPLS:
                if impl in torch_done:
                    continue
                torch_done.add(impl)
            rows.append((name, impl))
    return rows


def main_memory(args, device, meta) -> None:
    """--memory: each configuration of args.memory (MEMORY) with fusedopt, and the torch recipes
    it is measured against, on every shape set and optimizer; the torch recipes of one (param
    dtype, recipe) are timed once and shared by the configurations that name them."""
    meta["memory"] = {name: dict(dtype=DTYPE_NAMES[MEMORY[name][0]], recipe=MEMORY[name][2],
                                 options={k: str(v) for k, v in MEMORY[name][1].items()})
                      for name in args.memory}
    busy_start = measure.busy_cpus() if device.type == "cpu" else None
    measure.warn_if_busy(busy_start, "at start")
    results, skipped = [], []
    per_set = len(args.clip) * sum(
        len(memory_rows(opt, args.memory, dtype, device)) for opt in args.optimizers
        for dtype in dict.fromkeys(MEMORY[name][0] for name in args.memory))
    progress = report.Progress(len(args.shapes) * per_set,
                               sum(row_work(s) for s in args.shapes) * per_set)
    for set_name in args.shapes:
        shape_list = shapes.get(set_name)
        n = shapes.numel(shape_list)
        for dtype in dict.fromkeys(MEMORY[name][0] for name in args.memory):
            configs = [name for name in args.memory if MEMORY[name][0] == dtype]
            elt = torch.empty((), dtype=dtype).element_size()
            # masters and a working copy (params + grads), and the fp32 master recipe's copy,
            # grads and fp32 states, the most any row here keeps
            opts = [o for o in args.optimizers
                    if fits_in_memory(n, 1, o, device, n * (4 * elt + 8 + 4 * STATE_COPIES[o]))]
            skipped += [f"{set_name} {DTYPE_NAMES[dtype]} {o}: needs more memory than is free"
                        for o in args.optimizers if o not in opts]
            rows = len(args.clip) * sum(len(memory_rows(o, args.memory, dtype, device))
                                        for o in args.optimizers if o not in opts)
            progress.skip(rows, rows * row_work(set_name))
            if not opts:
                continue
            masters = seeded_masters(shape_list, dtype, device)
            for clip in args.clip:
                for opt in opts:
                    for name, impl in memory_rows(opt, configs, dtype, device):
                        ours = impl in OUR_IMPLS
                        row_start = time.perf_counter()
                        m = measure_impl(opt, impl, masters, clip, args, device, name)
                        times = m.pop("times_ms")
                        median = statistics.median(times)
                        deciles = (statistics.quantiles(times, n=10, method="inclusive")
                                   if len(times) > 1 else [median] * 9)
                        counted = m.pop("bytes_per_step", None)
                        moved = (counted / n if counted is not None else
                                 memory_bytes_per_element(opt, name, impl, clip, device.type))
                        gbs = moved * n / (median * 1e-3) / 1e9
                        results.append(dict(
                            shapes=set_name, tensors=len(shape_list), numel=n,
                            dtype=DTYPE_NAMES[dtype], clip=clip, optimizer=opt,
                            memory=name if ours else None, recipe=MEMORY[name][2],
                            impl=impl, median_ms=median, p10_ms=deciles[0],
                            p90_ms=deciles[-1], bytes_per_element=moved,
                            bytes_counted=counted is not None,
                            triton_bytes_per_element=memory_triton_bytes(opt, name, clip),
                            gb_per_s=gbs, pct_of_copy=100 * gbs / meta["copy_gbs"],
                            state_bytes_per_param=m.pop("state_bytes") / n,
                            held_bytes_per_param=m.pop("held_bytes") / n,
                            times_ms=times, row_s=time.perf_counter() - row_start, **m))
                        progress.row(
                            f"{set_name} clip {clip} {opt} "
                            f"{name if ours else DTYPE_NAMES[dtype] + ' ' + MEMORY[name][2]}"
                            f" {impl}: {median:.3f} ms", work=row_work(set_name))
            del masters
            gc.collect()
    _close_meta(meta, device, busy_start, skipped, progress)
    torch_rows = [r for r in results if r["memory"] is None]
    for r in results:
        if r["memory"] is None:
            continue
        same = [q for q in torch_rows if all(q[k] == r[k] for k in (
            "shapes", "dtype", "clip", "optimizer", "recipe"))]
        best = min(same, key=lambda q: q["median_ms"])
        r.update(best_torch_impl=best["impl"], best_torch_ms=best["median_ms"],
                 speedup_vs_best_torch=best["median_ms"] / r["median_ms"],
                 best_torch_bytes_per_element=best["bytes_per_element"],
                 best_torch_state_bytes_per_param=(best["state_bytes_per_param"]
                                                   + best["held_bytes_per_param"]))
    files = report.result_paths(args.out_dir, "memory", meta["device"], args.tag, ("md", "json"))
    text = report.memory_markdown(meta, results) + "".join(f"\nskipped: {s}\n" for s in skipped)
    files["md"].write_text(text)
    report.write_json(files["json"], meta, results)
    print(text)
    print(f"wrote {files['md']}, {files['json']}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = dict(device=measure.device_name(device), device_type=device.type,
                versions=measure.versions(), fusedopt=fusedopt.__version__, steps=args.steps,
                warmup=args.warmup, max_grad_norm=MAX_NORM, quick=args.quick,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                copy_gbs=measure.copy_bandwidth_gbs(device, 1024 if device.type == "cuda" else 256))
    meta["commit"] = measure.commit()
    meta["hyperparameters"] = {o: OPTIMIZERS[o][2] for o in args.optimizers}
    meta["min_warmup"] = {o: w for o, w in MIN_WARMUP.items()
                          if o in args.optimizers and w > args.warmup}
    if args.memory is not None:
        return main_memory(args, device, meta)
    busy_start = measure.busy_cpus() if device.type == "cpu" else None
    measure.warn_if_busy(busy_start, "at start")
    impls = {opt: impls_for(opt, device, args.compile) for opt in args.optimizers}
    results, skipped = [], []
    per_set = len(args.dtypes) * len(args.clip) * sum(map(len, impls.values()))
    progress = report.Progress(len(args.shapes) * per_set,
                               sum(row_work(s) for s in args.shapes) * per_set)
    for set_name in args.shapes:
        shape_list = shapes.get(set_name)
        n = shapes.numel(shape_list)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            elt = torch.empty((), dtype=dtype).element_size()
            fitting = [o for o in args.optimizers if fits_in_memory(n, elt, o, device)]
            for opt in args.optimizers:
                if opt not in fitting:
                    skipped.append(f"{set_name} {dtype_name} {opt}: needs more memory than is free")
                    rows = len(args.clip) * len(impls[opt])
                    progress.skip(rows, rows * row_work(set_name))
            if not fitting:
                continue
            masters = seeded_masters(shape_list, dtype, device)
            for clip in args.clip:
                for opt in fitting:
                    for impl in impls[opt]:
                        what = f"{set_name} {dtype_name} clip {clip} {opt} {impl}"
                        row_start = time.perf_counter()
                        try:
                            m = measure_impl(opt, impl, masters, clip, args, device)
                        except (RuntimeError, NotImplementedError) as e:
                            if impl in OUR_IMPLS:
                                raise
                            # a recipe torch does not offer here (say fused Adagrad on a device
                            # without its kernel): said in the report, the run goes on
                            skipped.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
                            progress.row(f"{what}: skipped ({type(e).__name__})",
                                         work=row_work(set_name))
                            continue
                        times = m.pop("times_ms")
                        median = statistics.median(times)
                        deciles = (statistics.quantiles(times, n=10, method="inclusive")
                                   if len(times) > 1 else [median] * 9)
                        counted = m.pop("bytes_per_step", None)
                        moved = (counted / n if counted is not None
                                 else bytes_per_element(opt, impl, elt, clip, device.type))
                        gbs = moved * n / (median * 1e-3) / 1e9
                        results.append(dict(
                            shapes=set_name, tensors=len(shape_list), numel=n, dtype=dtype_name,
                            clip=clip, optimizer=opt, impl=impl, median_ms=median,
                            p10_ms=deciles[0], p90_ms=deciles[-1], bytes_per_element=moved,
                            bytes_counted=counted is not None,
                            gb_per_s=gbs, pct_of_copy=100 * gbs / meta["copy_gbs"],
                            times_ms=times, row_s=time.perf_counter() - row_start, **m))
                        progress.row(f"{what}: {median:.3f} ms", work=row_work(set_name))
            del masters
            gc.collect()
    _close_meta(meta, device, busy_start, skipped, progress)
    for r in results:  # speedup against the fastest torch recipe of the same workload
        same = [q for q in results if q["impl"] in TORCH_IMPLS + (COMPILED,) and all(
            q[k] == r[k] for k in ("shapes", "dtype", "clip", "optimizer"))]
        best = min(same, key=lambda q: q["median_ms"])
        r.update(best_torch_impl=best["impl"], best_torch_ms=best["median_ms"],
                 speedup_vs_best_torch=best["median_ms"] / r["median_ms"])

    files = report.result_paths(args.out_dir, "", meta["device"], args.tag, ("md", "json", "png"))
    text = report.markdown(meta, results) + "".join(f"\nskipped: {s}\n" for s in skipped)
    files["md"].write_text(text)
    report.write_json(files["json"], meta, results)
    charted = report.chart(files["png"], meta, results)
    print(text)
    print(f"wrote {files['md']}, {files['json']}"
          + (f", {files['png']}" if charted else " (no chart: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
