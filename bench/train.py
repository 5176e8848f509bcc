"""Train a small GPT twice, with torch's clip + AdamW and with fusedopt.AdamW, and compare.

The one question: does ``fusedopt.AdamW(..., max_grad_norm=1.0)`` train a real model as
``clip_grad_norm_(params, 1.0)`` + ``torch.optim.AdamW`` does (same loss curve, same final
weights, to rounding), and how long is a whole training step (forward + backward + step) with each?
``--optimizer`` asks the same of any fusedopt optimizer but Muon against its torch recipe
(bench/run.py's OPTIMIZERS: the torch.optim namesake, lion-pytorch's step for Lion, Apex's
FusedLAMB math for LAMB), with SETTINGS' values.

    python bench/train.py                        # 600 steps: ~40 s on 2 idle CPU cores
    python bench/train.py --quick                # 50 steps: a smoke run, ~10 s
    python bench/train.py --optimizer lion       # fusedopt.Lion against lion-pytorch's step
    python bench/train.py --steps 2000 --device cuda --out-dir /tmp/train
    python bench/train.py --memory               # fp32 vs bf16 and the memory-lean options, ~2 min
    python bench/train.py --memory --quick       # 8 steps each: a smoke run, ~10 s

The model is a decoder-only transformer (~110k parameters) trained on characters of a corpus that
the script generates from its seed (a word-level Markov chain), so nothing is downloaded. Both runs
start from one state_dict and see the same batches; they alternate step by step, so that load from
other processes falls on both alike. Writes a PNG of the two loss curves and a JSON of every number
to ``<out-dir>/train-[<optimizer>-]<device>-<date>[-<tag>][-N].{png,json}`` (no optimizer in the
name for the default, AdamW; the tag, none for the default run, says what kind of run it was:
'quick', or the options that differ from the defaults, 'steps2000'; -2, -3, ... rather than over
another run's files: bench/report.py's result_paths; ``--out-dir`` defaults to bench/results/
beside this script) and prints a summary. Exits non-zero when the loss curves differ by more than
LOSS_RTOL.

``--memory`` asks another question: what do bf16 params, and fusedopt's memory-lean options
(``stochastic_rounding``, ``master_weights``, ``state_dtype``: fusedopt/_elementwise.py), do to
training against fp32? The same model, from one initial state (rounded to nearest into bf16) and
on the same batches, is trained with ``fusedopt.AdamW(max_grad_norm=1.0)`` once per configuration
(MEMORY_RUNS; ``--configs`` to choose among ``fp32`` and bench/run.py's MEMORY): the runs take
turns step by step, in an order rotated every step. A bf16 run's params are bf16 (its forward and
backward run in bf16, no autocast); the loss is taken in fp32 from its logits. AdamW at
MEMORY_SETTINGS' lr, smaller than the check's: round to nearest loses every update below half a
bf16 gap (2**-9 to 2**-8 of the weight: all of the weight decay, every Adam step of a LayerNorm
weight near 1, and late in the cosine many of the others; see MEMORY_SETTINGS), and that is what
the options are for. Writes the loss curves overlaid (PNG) and every number (JSON) to
``<out-dir>/train-memory-<device>-<date>[-<tag>][-N].{png,json}`` (a same-day run is kept)
and prints a table per configuration: final loss (the mean over the last tenth of the steps), its
gap to fp32's over those steps and the mean |loss - fp32's loss| over all steps, bytes per
parameter of the optimizer state (every tensor in opt.state) and of param + state, and the median
ms of a whole training step and of the optimizer step alone. Exits non-zero only when a loss is
not finite. The default 1000 steps take ~2 min on 2 idle CPU cores (median steps: fp32 11 ms,
bf16 15, the options 22-25: on the CPU they run fusedopt's torch-path rule op by op, a 7-11 ms
optimizer step where the fused AdamW op takes 1), 8 min while other work kept both cores busy;
``--quick`` 8 steps, ~10 s.
"""
import argparse
import datetime
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedopt
from fusedopt._dispatch import choose_backend

import measure  # bench/ is on sys.path when run as `python bench/train.py`
import report
from run import MEMORY, OPTIMIZERS, TorchLAMB, TorchLion  # the step benchmark's tables, stand-ins

MAX_NORM = 1.0
# Largest allowed max_i |loss_a[i] - loss_b[i]| / |loss_a[i]|. The runs differ by float rounding
# only (the clip multiplies .grad in one and divides inside the fused op in the other; the update
# orders its arithmetic differently), but training amplifies any difference exponentially. On the
# 2-core CI machine (seed 0, 600 steps) at a constant lr 3e-3, fusedopt vs torch, torch's for-loop
# vs its fused AdamW, and one weight moved by one ulp all drifted alike: past 1e-4 at step 349, to
# ~0.1 at the end. The cosine decay (SETTINGS' lr_min) damps it: the same three then stayed
# within 5.9e-6, 5.2e-6 and 1.3e-5. A longer run can cross the limit with no bug: compare with such
# a control.
LOSS_RTOL = 1e-4
CONFIG = dict(block=64, d_model=64, n_layer=2, n_head=4, batch=16, corpus_chars=200_000, words=48,
              successors=4)
DEFAULT_OPTIMIZER = "adamw"
# --optimizer -> its hyperparameters here, the same for both runs; lr falls from lr to lr_min (not
# an optimizer argument) on a half cosine over the run (GPT practice; and see LOSS_RTOL). AdamW's
# are the check's own. The others (lr_min = lr / 10) were picked from a few tried so that the
# torch recipe against itself with one weight moved by one ulp stays within LOSS_RTOL over the 600
# default steps, so that a failed check means more than rounding (2-core CI machine, seed 0:
# SGD 9e-7, Adagrad 2.4e-6, RMSprop 1.2e-6, NAdam 9e-7, RAdam 2e-7, Adamax 7.8e-7, Adam 5.4e-6,
# LAMB 5.2e-7, Adafactor 5e-7; at SGD lr 0.3, Adagrad 0.03, RMSprop 3e-4, NAdam 2e-3 the same
# control drifted 3e-3 to 0.17). LAMB's torch recipe is bench/run.py's Apex stand-in. Muon is not
# here: it takes 2-D matrices only, so training this model needs a second optimizer for the rest.
# Lion's sign() turns any rounding into a step of 2 lr: at lr 3e-4 the control drifted 6.8e-4, so
# its check holds only while fusedopt computes lion-pytorch's step bit for bit (it does on the CPU).
SETTINGS = {
    "adamw": dict(lr=3e-3, lr_min=3e-4, weight_decay=0.1),
    "adam": dict(lr=3e-3, lr_min=3e-4),
    "sgd": dict(lr=0.1, lr_min=0.01, momentum=0.9),
    "adagrad": dict(lr=1e-2, lr_min=1e-3),
    "rmsprop": dict(lr=1e-4, lr_min=1e-5, momentum=0.9, centered=True),
    "nadam": dict(lr=1e-3, lr_min=1e-4),
    "radam": dict(lr=3e-3, lr_min=3e-4),
    "adamax": dict(lr=6e-3, lr_min=6e-4),
    "lion": dict(lr=3e-4, lr_min=3e-5, weight_decay=1.0),
    "lamb": dict(lr=1e-2, lr_min=1e-3, weight_decay=0.01),
    "adafactor": dict(lr=3e-2, lr_min=3e-3),
}
# Median step on the 2-core CI machine (2 torch threads): 20-25 ms idle, so ~40 s for the default
# run and ~10 s for --quick, start-up included; 100-280 ms while another process kept both cores
# busy (torch's OpenMP threads then wait for each other).
DEFAULT_STEPS, QUICK_STEPS = 600, 50

# --memory (module docstring): the runs, "fp32" (fp32 params and states, the reference) and
# bench/run.py's MEMORY names, each (param dtype, fusedopt.AdamW options). "bf16+sr" is bf16
# params and bf16 moments (state_dtype None: the param's), both rounded stochastically.
MEMORY_RUNS = ("fp32", "bf16", "bf16+sr", "bf16+sr+fp32-states", "bf16+master",
               "bf16+master+fp32-states")
# lr 1e-3 -> 1e-4 (cosine), decay 0.1. Round to nearest loses an update below half the bf16 gap
# at w, |w| * 2**-9 to |w| * 2**-8: all of the decay (lr * decay = 1e-4 of |w| a step), and
# Adam's steps (at most ~lr) on weights above 256-512 lr: 0.26-0.51 at lr 1e-3, 0.026-0.051 at
# 1e-4, where the GPT-2 init's N(0, 0.02) weights sit; LayerNorm's weights at 1 never move.
# Measured (1000 steps, 2-core CI machine, seed 0), plain bf16's final loss behind fp32's: at peak
# lr 3e-3 (the check's) 0.002, at 1e-3 0.071, at 3e-4 0.587 (1.44 against 0.85: a stall); the
# options stayed within 0.002 of fp32 at 1e-3, about the spread of stochastic rounding over
# rounding seeds (-0.0004 to +0.0009), except bf16 moments rounded to nearest at 3e-4: "bf16+master"
# 0.013 behind (beta2 = 0.999 moves exp_avg_sq by 1e-3 of itself a step, below bf16's half gap)
MEMORY_SETTINGS = dict(lr=1e-3, lr_min=1e-4, weight_decay=0.1)
# 1000 steps: the fp32 run nears the corpus' floor (0.29), where plain bf16 stays 0.07 behind
# (bench/results/train-memory-cpu-2026-11-29.json); at 300 it was 0.12 behind, still falling
MEMORY_STEPS, MEMORY_QUICK_STEPS = 1000, 8
FINAL_FRACTION = 10  # the final loss: the mean over the last 1/FINAL_FRACTION of the steps


# -- data ---------------------------------------------------------------------------------------

def make_corpus(n_chars: int, n_words: int, n_successors: int, seed: int) -> str:
    """Text from a seeded word-level Markov chain: ``n_words`` made-up words of 2-7 letters, each
    followed by one of ``n_successors`` words with weights 2^k (for 4: 1.6 bits a word, ~0.2 nats a
    character). A model can learn the spelling of words, then which words follow which: the loss
    falls from ln(27) = 3.3 nats towards that floor (0.24 after the default 600 steps)."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                    for _ in range(n_words)})
    weights = [2 ** k for k in range(n_successors, 0, -1)]
    successors = {w: rng.sample(words, n_successors) for w in words}
    out, word, n = [], rng.choice(words), 0
    while n < n_chars:
        out.append(word)
        n += len(word) + 1
        word = rng.choices(successors[word], weights)[0]
    return " ".join(out)[:n_chars]


def batch_starts(n_tokens: int, block: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) window starts, drawn once: both runs index the same windows at each step."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n_tokens - block - 1, (steps, batch), generator=gen)


# -- model --------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, heads, T, head_dim)
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` blocks, final LayerNorm, untied head."""

    def __init__(self, vocab: int, block: int, d_model: int, n_layer: int, n_head: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(block, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for m in self.modules():  # GPT-2's init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``idx`` (B, T) against ``targets`` (B, T)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        logits = self.head(self.ln_f(self.blocks(x)))
        # the loss in fp32 (a bf16 model's logits are bf16; .float() is a no-op in fp32)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# -- the two runs -------------------------------------------------------------------------------

def cosine(opt, cfg):
    """lr from cfg["lr"] down to cfg["lr_min"] over the run, a half cosine."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["steps"], eta_min=cfg["lr_min"])


def run_names(optimizer: str) -> tuple[str, str]:
    """The two runs' names: (a) torch's recipe, (b) fusedopt's class."""
    torch_cls, our_cls, _ = OPTIMIZERS[optimizer]
    recipe = {TorchLion: "lion_ (lion-pytorch's step, bench/run.py)",
              TorchLAMB: "lamb_ (Apex FusedLAMB's math, bench/run.py)"}.get(
                  torch_cls, torch_cls.__name__)
    return f"torch clip_grad_norm_ + {recipe}", f"fusedopt.{our_cls.__name__}"


def torch_recipe(params, cfg):
    """Run (a): clip_grad_norm_ then the optimizer's torch recipe (AdamW: torch.optim.AdamW), both
    with torch's defaults (foreach=None: for-loop optimizer and foreach norm on CPU, foreach both
    on CUDA). Returns (step, grad-norm getter)."""
    opt = OPTIMIZERS[cfg["optimizer"]][0](params, **cfg["hyperparameters"])
    schedule, last = cosine(opt, cfg), {}

    def step():
        last["norm"] = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    return step, lambda: last["norm"]


def fusedopt_recipe(params, cfg):
    """Run (b): the fusedopt optimizer (AdamW: fusedopt.AdamW) with the clip inside step().
    Returns (step, grad-norm getter)."""
    opt = OPTIMIZERS[cfg["optimizer"]][1](params, **cfg["hyperparameters"],
                                          max_grad_norm=MAX_NORM)
    schedule = cosine(opt, cfg)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    return step, lambda: opt.grad_norm


def train(models, data, starts, cfg, device, warmup):
    """Train each model with its recipe on the same batches, alternating which goes first.

    Returns per run: losses (before each step's update), pre-clip grad norms, ms per step.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    offsets = torch.arange(cfg["block"] + 1, device=device)
    runs = []
    for name, recipe, model in zip(run_names(cfg["optimizer"]), (torch_recipe, fusedopt_recipe),
                                   models):
        step, grad_norm = recipe(list(model.parameters()), cfg)
        runs.append(dict(name=name, model=model, step=step, grad_norm=grad_norm,
                         losses=[], grad_norms=[], ms=[]))
    for i, row in enumerate(starts.to(device)):
        window = data[row[:, None] + offsets]  # (batch, block + 1), built outside the timed region
        x, y = window[:, :-1], window[:, 1:]
        # Swap the order every step: whichever runs second finds caches (and, on a loaded machine,
        # the CPU) in another state; alternating spreads that over both.
        for run in (runs if i % 2 == 0 else runs[::-1]):
            sync()
            start = time.perf_counter()
            loss = run["model"](x, y)
            loss.backward()
            run["step"]()
            sync()
            run["ms"].append((time.perf_counter() - start) * 1e3)
            run["losses"].append(loss.detach())
            run["grad_norms"].append(run["grad_norm"]().detach().clone())  # read after the clock
    for run in runs:
        run["losses"] = torch.stack(run["losses"]).tolist()
        run["grad_norms"] = torch.stack(run["grad_norms"]).tolist()
        run["median_ms"] = statistics.median(run["ms"][warmup:])
    return runs


@torch.no_grad()
def param_diffs(model_a: GPT, model_b: GPT, d_model: int) -> dict[str, float]:
    """max |a - b| per parameter tensor, each qkv.bias split into its key third and the rest.

    The key bias has zero gradient in exact arithmetic (softmax ignores a constant added to all of
    a query's scores), so its .grad is rounding noise, which Adam's m / sqrt(v) scales up to
    lr-sized steps in directions that rounding decides: any two AdamW implementations walk it apart
    by ~lr while no output changes (torch's own for-loop and fused AdamW: 1.5e-3 apart after 100
    steps at lr 3e-3, every other tensor within 3e-7). Kept apart so that it hides nothing else.
    """
    diffs = {}
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        d = (p - q).abs()
        if name.endswith("qkv.bias"):
            diffs[name + "[key]"] = d[d_model:2 * d_model].max().item()
            d, name = torch.cat([d[:d_model], d[2 * d_model:]]), name + "[query,value]"
        diffs[name] = d.max().item()
    return diffs


# -- --memory: the memory-lean options against fp32 ---------------------------------------------

def memory_run(name: str) -> tuple[torch.dtype, dict]:
    """(param dtype, fusedopt.AdamW options) of a --memory run (MEMORY_RUNS)."""
    return (torch.float32, {}) if name == "fp32" else MEMORY[name][:2]


def optimizer_state_bytes(opt) -> int:
    """Bytes of every tensor in ``opt.state`` (moments, remainders or copies, step counters)."""
    return sum(v.nbytes for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def train_memory(models, data, starts, cfg, device, warmup):
    """Train each (name, model) of ``models`` with fusedopt.AdamW in its --memory configuration
    on the same batches, the runs taking turns in an order rotated every step.

    Returns per run: losses (before each step's update), pre-clip grad norms, ms per whole step
    and ms of the optimizer step alone, and the optimizer's state bytes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    offsets = torch.arange(cfg["block"] + 1, device=device)
    runs = []
    for name, model in models:
        dtype, options = memory_run(name)
        opt = fusedopt.AdamW(model.parameters(), **cfg["hyperparameters"], **options,
                             max_grad_norm=MAX_NORM, rounding_seed=cfg["rounding_seed"])
        runs.append(dict(name=name, param_dtype=str(dtype).replace("torch.", ""),
                         options={k: str(v) for k, v in options.items()}, model=model, opt=opt,
                         schedule=cosine(opt, cfg), losses=[], grad_norms=[], ms=[], opt_ms=[]))
    for i, row in enumerate(starts.to(device)):
        window = data[row[:, None] + offsets]
        x, y = window[:, :-1], window[:, 1:]
        turn = i % len(runs)
        for run in runs[turn:] + runs[:turn]:
            sync()
            start = time.perf_counter()
            loss = run["model"](x, y)
            loss.backward()
            sync()
            opt_start = time.perf_counter()
            run["opt"].step()
            sync()
            opt_end = time.perf_counter()
            run["opt"].zero_grad(set_to_none=True)
            run["schedule"].step()
            sync()
            run["ms"].append((time.perf_counter() - start) * 1e3)
            run["opt_ms"].append((opt_end - opt_start) * 1e3)
            run["losses"].append(loss.detach())
            run["grad_norms"].append(run["opt"].grad_norm.detach().clone())
    for run in runs:
        run["losses"] = torch.stack(run["losses"]).tolist()
        run["grad_norms"] = torch.stack(run["grad_norms"]).float().tolist()
        run["median_ms"] = statistics.median(run["ms"][warmup:])
        run["median_opt_ms"] = statistics.median(run["opt_ms"][warmup:])
        params = list(run["model"].parameters())
        n = sum(p.numel() for p in params)
        run["state_bytes_per_param"] = optimizer_state_bytes(run["opt"]) / n
        run["param_bytes_per_param"] = sum(p.nbytes for p in params) / n
    return runs


def compare_to_fp32(runs, steps: int) -> None:
    """Adds to each run: its final loss (the mean over the last 1/FINAL_FRACTION of the steps), and
    against the fp32 run, the mean of loss - fp32's loss over those steps (> 0: behind fp32) and
    the mean |loss - fp32's loss| over all steps (the runs see the same batches, so the batch
    noise cancels step by step)."""
    last = max(1, steps // FINAL_FRACTION)
    ref = next(r for r in runs if r["name"] == "fp32")["losses"]
    for r in runs:
        diff = [a - b for a, b in zip(r["losses"], ref)]
        r.update(final_loss=statistics.fmean(r["losses"][-last:]),
                 final_gap_to_fp32=statistics.fmean(diff[-last:]),
                 mean_abs_gap_to_fp32=statistics.fmean(abs(d) for d in diff))


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (fewer at the ends), so that the curve does
    not trail the raw one."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    half = window // 2
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def plot_memory(path, runs, meta, cfg) -> bool:
    """The runs' loss curves overlaid (smoothed; fp32's raw curve faint behind), and each run's
    smoothed loss minus fp32's; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    window = max(1, cfg["steps"] // 30)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=[3, 2]))
    steps = range(cfg["steps"])
    ref = next(r for r in runs if r["name"] == "fp32")
    top.plot(steps, ref["losses"], "-", lw=0.6, alpha=0.25, color="black")
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    for k, r in enumerate(runs):
        fp32 = r["name"] == "fp32"
        label = (f"{r['name']}: final {r['final_loss']:.4f}, {r['state_bytes_per_param']:.1f} B "
                 f"state/param, {r['median_ms']:.0f} ms/step")
        top.plot(steps, smooth(r["losses"], window), linestyle=styles[k % len(styles)],
                 lw=3 if fp32 else 1.4, alpha=0.5 if fp32 else 1.0,
                 color="black" if fp32 else f"C{k}", label=label)
        if not fp32:
            bottom.plot(steps, smooth([a - b for a, b in zip(r["losses"], ref["losses"])], window),
                        linestyle=styles[k % len(styles)], lw=1.4, color=f"C{k}", label=r["name"])
    top.set_ylabel(f"training loss (nats / char)\n{window}-step mean")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    top.set_title(f"fusedopt.AdamW (clip {MAX_NORM}), lr {cfg['lr']:g} -> {cfg['lr_min']:g} "
                  "cosine, "
                  f"weight decay {cfg['hyperparameters']['weight_decay']}; {cfg['params']:,} "
                  f"params\n{meta['device']}, torch {meta['torch']}, {meta['date'][:10]}",
                  fontsize=9)
    bottom.axhline(0.0, color="black", lw=0.8)
    bottom.set_ylabel("loss - fp32 run's loss")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True



def corpus_and_shape(cfg, args, device):
    """The generated corpus as token ids on ``device``, every step's batch starts, and the GPT's
    shape for its vocabulary; torch's generator seeded for the model's initialisation."""
    text = make_corpus(cfg["corpus_chars"], cfg["words"], cfg["successors"], args.seed)
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], device=device)
    starts = batch_starts(len(data), cfg["block"], cfg["batch"], args.steps, args.seed)
    torch.manual_seed(args.seed)
    return data, starts, (len(vocab), cfg["block"], cfg["d_model"], cfg["n_layer"], cfg["n_head"])

def main_memory(args, device) -> None:
    """--memory (module docstring)."""
    torch.set_default_dtype(torch.float32)
    settings = dict(MEMORY_SETTINGS, **({"lr": args.lr, "lr_min": args.lr / 10}
                                        if args.lr is not None else {}))
    hyper = {k: v for k, v in settings.items() if k != "lr_min"}
    cfg = dict(CONFIG, optimizer="adamw", hyperparameters=hyper, lr=hyper["lr"],
               lr_min=settings["lr_min"], steps=args.steps, warmup=args.warmup, seed=args.seed,
               rounding_seed=args.rounding_seed, max_grad_norm=MAX_NORM, runs=args.configs,
               final_steps=max(1, args.steps // FINAL_FRACTION))
    meta = {
        "device": measure.device_name(device), "torch": torch.__version__,
        "triton": measure.versions()["triton"], "fusedopt": fusedopt.__version__,
        "commit": measure.commit(), "fusedopt_backend": choose_backend(None, {device}),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }
    data, starts, shape = corpus_and_shape(cfg, args, device)
    base = GPT(*shape).to(device)
    models = []
    for name in args.configs:
        model = GPT(*shape).to(device)
        model.load_state_dict(base.state_dict())
        models.append((name, model.to(memory_run(name)[0])))  # bf16: rounded to nearest
    cfg.update(vocab=shape[0], params=sum(p.numel() for p in base.parameters()))

    t0 = time.perf_counter()
    runs = train_memory(models, data, starts, cfg, device, args.warmup)
    wall_s = time.perf_counter() - t0
    meta["load_average_at_end"] = load_average()
    meta["wall_s_all_runs"] = wall_s
    compare_to_fp32(runs, args.steps)

    stem = report.result_paths(args.out_dir, "train-memory", meta["device"], args.tag,
                               ("png", "json"))
    charted = plot_memory(stem["png"], runs, meta, cfg)
    keys = ("name", "param_dtype", "options", "final_loss", "final_gap_to_fp32",
            "mean_abs_gap_to_fp32", "state_bytes_per_param", "param_bytes_per_param",
            "median_ms", "median_opt_ms", "losses", "grad_norms", "ms", "opt_ms")
    with open(stem["json"], "w") as f:
        json.dump({"meta": meta, "config": cfg,
                   "runs": [{k: r[k] for k in keys} for r in runs]}, f, indent=1)

    print(f"# fusedopt memory-lean options in training: {cfg['n_layer']}-layer GPT, "
          f"{cfg['params']:,} params\n")
    print(f"- device: {meta['device']}; fusedopt backend: {meta['fusedopt_backend']}")
    print(f"- torch {meta['torch']}, triton {meta['triton']}, fusedopt {meta['fusedopt']} at "
          f"{meta['commit']}, {meta['date']}")
    print(f"- {args.steps} steps of batch {cfg['batch']} x {cfg['block']} chars, fusedopt.AdamW "
          + ", ".join(f"{k} {v:g}" for k, v in hyper.items())
          + f", lr -> {cfg['lr_min']:g} (cosine), "
          f"clip {MAX_NORM}, rounding_seed {args.rounding_seed}; all runs {wall_s:.1f} s")
    if device.type == "cpu":
        print(f"- load average at start / end: {meta['load_average_at_start']} / "
              f"{meta['load_average_at_end']} (other work on these cores slows the steps)")
    print(f"- final loss: mean of the last {cfg['final_steps']} steps; gap: the same of loss - "
          "fp32's loss (> 0: behind fp32); mean |gap|: over all steps; state: bytes per param "
          "of opt.state; ms: median whole step / optimizer step, steps "
          f"{args.warmup}+\n")
    print("| run | params | options | final loss | gap to fp32 | mean abs gap | state B/param "
          "| param + state B/param | step ms | optimizer ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        print(f"| {r['name']} | {r['param_dtype']} | {options} | {r['final_loss']:.4f} | "
              f"{r['final_gap_to_fp32']:+.4f} | {r['mean_abs_gap_to_fp32']:.4f} | "
              f"{r['state_bytes_per_param']:.2f} | "
              f"{r['param_bytes_per_param'] + r['state_bytes_per_param']:.2f} | "
              f"{r['median_ms']:.1f} | {r['median_opt_ms']:.1f} |")
    print(f"\n- wrote {stem['json']}" + (f" and {stem['png']}" if charted
                                        else " (no chart: matplotlib is not installed)"))
    bad = [r["name"] for r in runs if not all(math.isfinite(x) for x in r["losses"])]
    if bad:
        sys.exit(f"FAIL: a loss is not finite in {', '.join(bad)}")


# -- outputs ------------------------------------------------------------------------------------

def load_average() -> float | None:
    """1-minute load average: on a shared CPU machine, a hint of how noisy the step times are."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def plot(path, runs, meta) -> bool:
    """The two loss curves overlaid, and their difference; False without matplotlib (it comes
    with the `bench` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    a, b = runs
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=[3, 1]))
    steps = range(len(a["losses"]))
    # (a) wide and solid, (b) thin and dashed on top: where the curves coincide both stay visible
    top.plot(steps, a["losses"], "-", lw=3, alpha=0.5, color="tab:blue",
             label=f"(a) {a['name']}: {a['median_ms']:.1f} ms/step")
    top.plot(steps, b["losses"], "--", lw=1.2, color="tab:red",
             label=f"(b) {b['name']}: {b['median_ms']:.1f} ms/step")
    top.set_ylabel("training loss (nats / char)")
    top.legend()
    top.grid(alpha=0.3)
    top.set_title(f"{meta['device']}, fp32, fusedopt backend: {meta['fusedopt_backend']}\n"
                  f"median step: (a) {a['median_ms']:.2f} ms, (b) {b['median_ms']:.2f} ms", fontsize=10)
    diff = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    bottom.semilogy([s for s, d in zip(steps, diff) if d > 0], [d for d in diff if d > 0], ".", ms=2,
                    color="black")  # zeros (step 0 is bit-identical) have no place on a log axis
    bottom.set_ylabel("|loss a - loss b|")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {DEFAULT_STEPS}, "
                                                   f"{QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_STEPS} steps")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first steps left out of the median step time (the first one creates "
                             "the optimizer state)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, choices=list(SETTINGS),
                        help="the fusedopt optimizer to train with, against its torch recipe "
                             f"(default {DEFAULT_OPTIMIZER})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the corpus, the initial weights and the batches")
    parser.add_argument("--memory", action="store_true",
                        help="train fusedopt.AdamW in fp32 and in the memory-lean bf16 "
                             "configurations instead (module docstring)")
    parser.add_argument("--configs", default=",".join(MEMORY_RUNS),
                        help="--memory: comma list of fp32 (always run: the reference) and "
                             f"{', '.join(MEMORY)} (default {','.join(MEMORY_RUNS)})")
    parser.add_argument("--lr", type=float,
                        help=f"--memory: the peak lr (default {MEMORY_SETTINGS['lr']}; the cosine "
                             "ends at a tenth of it)")
    parser.add_argument("--rounding-seed", type=int, default=0,
                        help="--memory: fusedopt's rounding_seed (stochastic rounding's bits)")
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="folder for train-[<optimizer>-]<device>-<date>[-<tag>][-N]."
                             "{png,json}, or train-memory-<device>-<date>[-<tag>][-N].{png,json} "
                             "(default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    if args.steps is None:
        if args.memory:
            args.steps = MEMORY_QUICK_STEPS if args.quick else MEMORY_STEPS
        else:
            args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.memory:
        if args.optimizer != DEFAULT_OPTIMIZER:
            parser.error("--memory trains AdamW only")
        names = args.configs.split(",")
        for name in names:
            if name != "fp32" and name not in MEMORY:
                parser.error(f"unknown --configs name {name!r}; known: fp32, {', '.join(MEMORY)}")
        args.configs = ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]
    elif args.lr is not None or args.configs != ",".join(MEMORY_RUNS):
        parser.error("--lr and --configs go with --memory")
    if args.warmup < 0 or args.steps <= args.warmup:
        parser.error("need 0 <= --warmup < --steps")
    args.tag = run_tag(args, parser)
    return args


def run_tag(args, parser) -> str:
    """The tag in the run's file names (bench/report.py's run_tag): '' for the default run,
    'quick', and the options given that differ from that mode's defaults (the optimizer is in the
    names already; fp32, always run, is left out of --configs)."""
    keys = ("steps", "warmup", "seed") + (("configs", "lr", "rounding_seed") if args.memory else ())
    defaults = {k: parser.get_default(k) for k in keys}
    defaults["steps"] = ((MEMORY_QUICK_STEPS if args.quick else MEMORY_STEPS) if args.memory
                         else QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.memory:
        defaults["configs"] = [n for n in MEMORY_RUNS if n != "fp32"]
        args = argparse.Namespace(**vars(args))
        args.configs = [n for n in args.configs if n != "fp32"]
    changed = report.changed_args(args, defaults)
    if "rounding_seed" in changed:
        changed["rseed"] = changed.pop("rounding_seed")
    return report.run_tag("quick" if args.quick else "", changed)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.memory:
        return main_memory(args, device)
    torch.set_default_dtype(torch.float32)
    hyper = {k: v for k, v in SETTINGS[args.optimizer].items() if k != "lr_min"}
    cfg = dict(CONFIG, optimizer=args.optimizer, hyperparameters=hyper, lr=hyper["lr"],
               lr_min=SETTINGS[args.optimizer]["lr_min"], steps=args.steps, warmup=args.warmup,
               seed=args.seed, max_grad_norm=MAX_NORM)
    meta = {
        "device": measure.device_name(device), "torch": torch.__version__,
        "triton": measure.versions()["triton"],
        "fusedopt": fusedopt.__version__, "fusedopt_backend": choose_backend(None, {device}),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "load_average_at_start": load_average(),
    }

    data, starts, shape = corpus_and_shape(cfg, args, device)
    model_a = GPT(*shape).to(device)
    model_b = GPT(*shape).to(device)
    model_b.load_state_dict(model_a.state_dict())  # identical starting weights
    cfg.update(vocab=shape[0], params=sum(p.numel() for p in model_a.parameters()))

    t0 = time.perf_counter()
    runs = train([model_a, model_b], data, starts, cfg, device, args.warmup)
    wall_s = time.perf_counter() - t0
    meta["load_average_at_end"] = load_average()

    a, b = runs
    loss_abs = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    loss_rel = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    norm_rel = max(abs(x - y) / x for x, y in zip(a["grad_norms"], b["grad_norms"]))
    diffs = param_diffs(model_a, model_b, cfg["d_model"])
    worst = max(diffs, key=diffs.get)
    worst_not_key = max((n for n in diffs if "[key]" not in n), key=diffs.get)
    param_scale = max(p.abs().max().item() for p in model_a.parameters())
    compare = dict(max_abs_loss_diff=loss_abs, max_rel_loss_diff=loss_rel, loss_rtol=LOSS_RTOL,
                   max_abs_param_diff=diffs[worst], max_abs_param_diff_in=worst,
                   max_abs_param_diff_without_key_bias=diffs[worst_not_key],
                   max_abs_param=param_scale, max_abs_param_diff_per_tensor=diffs,
                   max_rel_grad_norm_diff=norm_rel,
                   clipped_steps=sum(n > MAX_NORM for n in a["grad_norms"]),
                   speed_ratio_a_over_b=a["median_ms"] / b["median_ms"], wall_s_both_runs=wall_s)

    named = "train" if args.optimizer == DEFAULT_OPTIMIZER else f"train-{args.optimizer}"
    files = report.result_paths(args.out_dir, named, meta["device"], args.tag, ("png", "json"))
    charted = plot(files["png"], runs, meta)
    with open(files["json"], "w") as f:
        json.dump({"meta": meta, "config": cfg, "compare": compare,
                   "runs": [{k: v for k, v in r.items() if k in ("name", "median_ms", "losses",
                                                                  "grad_norms", "ms")} for r in runs]},
                  f, indent=1)

    print(f"# fusedopt training check: {cfg['n_layer']}-layer GPT, {cfg['params']:,} params, fp32\n")
    print(f"- device: {meta['device']}; fusedopt backend: {meta['fusedopt_backend']}")
    print(f"- torch {meta['torch']}, triton {meta['triton']}, fusedopt {meta['fusedopt']}, {meta['date']}")
    print(f"- {args.steps} steps of batch {cfg['batch']} x {cfg['block']} chars (vocab {shape[0]}), "
          f"{args.optimizer} " + ", ".join(f"{k} {v}" for k, v in hyper.items())
          + f", lr -> {cfg['lr_min']} (cosine), clip "
          f"{MAX_NORM} (active in {compare['clipped_steps']}/{args.steps} steps); both runs "
          f"{wall_s:.1f} s")
    if device.type == "cpu":
        print(f"- load average at start / end: {meta['load_average_at_start']} / "
              f"{meta['load_average_at_end']} (other work on these cores slows the steps)")
    for tag, r in zip("ab", runs):
        print(f"- ({tag}) {r['name']}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
              f"median {r['median_ms']:.2f} ms/step (steps {args.warmup}+)")
    print(f"- max |loss a - loss b|: {loss_abs:.3g} ({loss_rel:.3g} relative; limit {LOSS_RTOL:g})")
    print(f"- max |param a - param b| after training: {diffs[worst]:.3g}, in {worst} (largest |param| "
          f"{param_scale:.3g}); without the key biases: {diffs[worst_not_key]:.3g}, in {worst_not_key}")
    print(f"- pre-clip grad norms agree to {norm_rel:.3g} relative")
    print(f"- speed ratio, median step (a) / (b): {compare['speed_ratio_a_over_b']:.2f}x "
          "(> 1: fusedopt faster)")
    print(f"- wrote {files['json']}" + (f" and {files['png']}" if charted
                                     else " (no chart: matplotlib is not installed)"))
    if loss_rel > LOSS_RTOL:
        sys.exit(f"FAIL: the loss curves differ by {loss_rel:.3g} relative, more than {LOSS_RTOL:g}. "
                 "Training amplifies rounding; before suspecting fusedopt, check whether two torch "
                 "implementations (foreach=False vs foreach=True or fused=True) drift as far (see "
                 "LOSS_RTOL)")


if __name__ == "__main__":
    main()
