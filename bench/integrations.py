"""What do the clip and the optimizer step cost inside a training framework, with torch's recipe,
with fusedopt but without its integration, and with fusedopt's integration (issue 14)?

    python bench/integrations.py          # GPT-2 small (124M), fp32, 3 rounds: ~2 min, 2 CPU cores
    python bench/integrations.py --quick  # 2-layer GPT-2, 1 + 2 steps, 1 round: ~7 s: a smoke run
    python bench/integrations.py --frameworks hf,accelerate --steps 12 --out-dir /tmp/i

Arms (the same AdamW settings and weight-decay groups everywhere: HYPER, the Trainer's groups):

- hf: (torch) transformers.Trainer with its default optimizer (torch.optim.AdamW, fused) and
  max_grad_norm=1.0; (fusedopt) Trainer + optimizers=(fusedopt.AdamW(max_grad_norm=1.0), None)
  and TrainingArguments(max_grad_norm=0), the recipe before the integration (the Trainer still
  runs clip_grad_norm_(params, inf) every step for the grad_norm it logs); (integration)
  fusedopt.integrations.transformers.FusedTrainer, max_grad_norm=1.0, optimizer from the args.
- accelerate, a plain loop: (torch) Accelerator + torch.optim.AdamW(fused=True) +
  accelerator.clip_grad_norm_(params, 1.0); (integration) FusedAccelerator +
  fusedopt.AdamW(max_grad_norm=1.0), no clip call.
- lightning: (torch) Trainer(gradient_clip_val=1.0) + torch.optim.AdamW(fused=True);
  (integration) the same Trainer + FusedOptCallback + fusedopt.AdamW (the callback moves the clip
  into the optimizer).

Timed per step (wall time, torch.cuda.synchronize at each mark on a GPU), warm-up steps left out:
"clip" from the end of backward to the optimizer's update about to start (HF: training_step
returned -> on_pre_optimizer_step, which also holds the Trainer's per-step bookkeeping, alike in
every arm; Lightning: on_after_backward -> Precision._after_closure returned, which runs the
on_before_optimizer_step hooks and the clip), "update" from there to optimizer.step() returned,
and the whole step (HF: on_step_begin -> on_step_end; Lightning: on_train_batch_start ->
on_train_batch_end; accelerate: forward to zero_grad). Arms run one after another (each framework
owns its loop), so the report gives, per arm, how many CPUs other processes kept busy while it ran
(a neighbour on a 2-core machine slows a CPU step many times: torch's OpenMP threads wait for each
other). Each arm runs --rounds times, each time on a fresh model and optimizer, every other round
in reverse order: on the idle 2-core machine one arm's update took 35 ms in one run and 55 ms in
the next, steady within each (the same torch fused AdamW step; fusedopt's 50 or 77 ms), so one run
per arm would set a ratio by chance; the report gives each round's median.

Checked, so that what is timed is right: in each framework every fusedopt arm against the torch
arm, the per-step losses, the final Adam moments (exp_avg scales with the clip coefficient, so a
missing or doubled clip shows there: Adam's update itself hardly moves with it) and the params'
change from the start; a warning in the report where one differs by more than RTOL, and the
script then exits 1 (after writing its files).

Needs transformers, accelerate and lightning (the `integrations` or `test` extra). Writes Markdown
(also printed) and JSON (every step's times) to
<out-dir>/integrations-<device>-<date>[-<tag>][-N].{md,json} (report.result_paths; --out-dir
defaults to bench/results/ beside this script).
"""
import argparse
import copy
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings

import torch

import fusedopt
import measure  # bench/ is on sys.path when run as `python bench/integrations.py`
import report

MAX_NORM = 1.0
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
FRAMEWORKS = ("hf", "accelerate", "lightning")
ARMS = {
    "hf": {
        "torch": "Trainer(max_grad_norm=1.0), default optim (torch AdamW fused)",
        "fusedopt": "Trainer(max_grad_norm=0) + fusedopt.AdamW(max_grad_norm=1.0)",
        "integration": "FusedTrainer(max_grad_norm=1.0)"},
    "accelerate": {
        "torch": "Accelerator + clip_grad_norm_ + torch AdamW(fused=True)",
        "integration": "FusedAccelerator + fusedopt.AdamW(max_grad_norm=1.0)"},
    "lightning": {
        "torch": "Trainer(gradient_clip_val=1.0) + torch AdamW(fused=True)",
        "integration": "Trainer(gradient_clip_val=1.0) + FusedOptCallback + fusedopt.AdamW"},
}
# The two clip coefficients differ by torch's rounding: on CPU clip_grad_norm_'s fp32 norm of
# GPT-2 small's first gradients is 4.4e-5 below the fp64 norm (47.92918 vs 47.93130), fusedopt's
# within 1e-7, and Adam's moments after 8 steps are 1.4e-4 apart; with fusedopt's clip left out
# they were 4.6 (exp_avg) and 31 (exp_avg_sq) apart (the quick model, tried once).
RTOL = 1e-3
FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)  # GPT2Config()
QUICK = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1024, n_positions=64)


class Clock:
    """Each training step's marks, taken after a device sync: start, backward (its end), update
    (the clip done, the update about to start), step (optimizer.step() returned), end."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps, self.now, self.losses = [], {}, []

    def mark(self, name: str) -> None:
        self.sync()
        self.now[name] = time.perf_counter()
        if name == "end":
            self.steps.append(self.now)
            self.now = {}

    def times(self, warmup: int) -> dict:
        def ms(a, b):
            return [(s[b] - s[a]) * 1e3 for s in self.steps[warmup:]]
        return dict(clip_ms=ms("backward", "update"), update_ms=ms("update", "step"),
                    opt_ms=ms("backward", "step"), whole_ms=ms("start", "end"))


# -- what every arm shares ------------------------------------------------------------------------

def param_groups(model):
    """The Hugging Face Trainer's groups: weight decay but on biases and LayerNorms."""
    from transformers import Trainer
    decay = set(Trainer.get_decay_parameter_names(None, model))  # self unused
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": HYPER["weight_decay"]},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def torch_adamw(groups):
    return torch.optim.AdamW(groups, **HYPER, fused=True)


def fused_adamw(groups, max_grad_norm):
    return fusedopt.AdamW(groups, **HYPER, max_grad_norm=max_grad_norm)


def run_hf(arm, model, data, args, device, clock):
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from fusedopt.integrations.transformers import FusedTrainer

    class Marks(TrainerCallback):  # added last: after FusedTrainer's own on_optimizer_step
        def on_step_begin(self, *a, **k):
            clock.mark("start")

        def on_pre_optimizer_step(self, *a, **k):
            clock.mark("update")

        def on_optimizer_step(self, *a, **k):
            clock.mark("step")

        def on_step_end(self, *a, **k):
            clock.mark("end")

    class Timed(FusedTrainer if arm == "integration" else Trainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)  # forward + backward
            clock.mark("backward")
            clock.losses.append(loss)
            return loss

    optimizers = (None, None)
    if arm == "fusedopt":
        optimizers = (fused_adamw(param_groups(model), MAX_NORM), None)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=len(data) // args.batch,
            per_device_train_batch_size=args.batch,
            learning_rate=HYPER["lr"], adam_beta1=HYPER["betas"][0], adam_beta2=HYPER["betas"][1],
            adam_epsilon=HYPER["eps"], weight_decay=HYPER["weight_decay"],
            max_grad_norm=0.0 if arm == "fusedopt" else MAX_NORM, lr_scheduler_type="constant",
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=device.type == "cpu", dataloader_pin_memory=False, seed=args.seed)
        trainer = Timed(model=model, args=targs, optimizers=optimizers,
                        train_dataset=[{"input_ids": x, "labels": x} for x in data])
        trainer.add_callback(Marks())
        trainer.remove_callback(PrinterCallback)  # the run's summary, on stdout
        trainer.train()
    return trainer.optimizer.optimizer  # accelerate's wrapper's


def run_accelerate(arm, model, data, args, device, clock):
    from accelerate import Accelerator
    from fusedopt.integrations.accelerate import FusedAccelerator
    groups = param_groups(model)
    if arm == "torch":
        accelerator, opt = Accelerator(cpu=device.type == "cpu"), torch_adamw(groups)
    else:
        accelerator, opt = FusedAccelerator(cpu=device.type == "cpu"), fused_adamw(groups, MAX_NORM)
    model, prepared = accelerator.prepare(model, opt)
    model.train()
    torch.manual_seed(args.seed)
    for x in data.split(args.batch):
        x = x.to(accelerator.device)
        clock.mark("start")
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        clock.mark("backward")
        if arm == "torch":
            accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        clock.mark("update")
        prepared.step()
        clock.mark("step")
        prepared.zero_grad(set_to_none=True)
        clock.mark("end")
        clock.losses.append(loss.detach())
    return opt


def run_lightning(arm, model, data, args, device, clock):
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import Precision
    from fusedopt.integrations.lightning import FusedOptCallback
    for name in ("lightning.pytorch", "lightning.fabric"):  # levels set on import: after it
        logging.getLogger(name).setLevel(logging.ERROR)

    class Marks(Precision):  # fp32's plugin ("32-true"), marking its steps
        def _after_closure(self, model, optimizer):
            # optimizer.step(closure) ran the closure (training_step, zero_grad, backward); then
            # on_before_optimizer_step hooks and the clip (configure_gradient_clipping)
            super()._after_closure(model, optimizer)
            clock.mark("update")

        def optimizer_step(self, *a, **k):
            out = super().optimizer_step(*a, **k)
            clock.mark("step")
            return out

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            clock.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):
            groups = param_groups(self.model)
            # no clip of its own: FusedOptCallback takes Trainer(gradient_clip_val=) into it
            return torch_adamw(groups) if arm == "torch" else fused_adamw(groups, None)

        def on_train_batch_start(self, batch, batch_idx):
            clock.mark("start")

        def on_after_backward(self):
            clock.mark("backward")

        def on_train_batch_end(self, outputs, batch, batch_idx):
            clock.mark("end")

    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        max_steps=len(data) // args.batch, gradient_clip_val=MAX_NORM, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, plugins=[Marks()],
        callbacks=[] if arm == "torch" else [FusedOptCallback()])
    pl.seed_everything(args.seed, verbose=False)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False)
    trainer.fit(Lit(), loader)
    return trainer.optimizers[0]


RUN = {"hf": run_hf, "accelerate": run_accelerate, "lightning": run_lightning}


# -- checks: the fusedopt arms train as the torch arm ---------------------------------------------

def trained(opt, base_params, clock) -> dict:
    """What the arm's training left, on the CPU: losses, Adam moments and params' change, each
    flattened in param-group order (the same in every arm)."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def flat(tensors):
        return torch.cat([t.detach().float().cpu().flatten() for t in tensors])
    return dict(losses=torch.stack(clock.losses).float().cpu(),
                exp_avg=flat(opt.state[p]["exp_avg"] for p in params),
                exp_avg_sq=flat(opt.state[p]["exp_avg_sq"] for p in params),
                change=flat(params) - flat(base_params[id(p)] for p in params))


def compare(ours: dict, ref: dict) -> dict:
    """Relative gaps to the torch arm: losses max |a - b| / |b| step by step; the moments and
    the params' change as ||a - b|| / ||b||."""
    gaps = dict(loss=float(((ours["losses"] - ref["losses"]).abs() / ref["losses"].abs()).max()))
    for key in ("exp_avg", "exp_avg_sq", "change"):
        gaps[key] = float((ours[key] - ref[key]).norm() / ref[key].norm())
    return gaps


# -- the report ---------------------------------------------------------------------------------

def spread(ms: list[float]) -> str:
    return f"{statistics.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}]"


def markdown(meta: dict, rows: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        "# The clip + optimizer part of a training step, per framework, with and without "
        "fusedopt's integrations", "",
        f"- device: {meta['device']}; torch threads {meta['threads']}",
        f"- torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, "
        f"accelerate {v['accelerate']}, lightning {v['lightning']}, CUDA {v['cuda']}, Python "
        f"{v['python']}; fusedopt {meta['fusedopt']}, commit {meta['commit']}",
        f"- date: {meta['date']}; all arms took {report.eta_text(meta['wall_s'])}",
        f"- model: GPT-2 {meta['model']} ({meta['params'] / 1e6:.1f}M params), fp32, batch "
        f"{meta['batch']} x {meta['seq']} generated tokens, seed {meta['seed']}; "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps per arm and round, "
        f"{meta['rounds']} round(s): each a fresh model and optimizer per arm, every other "
        "round in reverse order",
        "- AdamW " + ", ".join(f"{k}={x}" for k, x in HYPER.items())
        + f" (not on biases and LayerNorms); clip at max norm {MAX_NORM}",
        f"- CPUs busy with other work at start / end: {meta['busy_cpus']}; during each arm: "
        "the table's last column"
        + (" (the arms run one after another: a neighbour's load falls on some arms only)"
           if meta["device_type"] == "cpu" else ""),
        "",
        "ms per step, median [min-max] over every round's timed steps; per round: each round's "
        "median of clip + update. clip: end of backward -> the update about to start "
        "(HF: includes the Trainer's per-step bookkeeping, in every arm); update: -> "
        "optimizer.step() returned; clip + update: the two; whole: the whole training step. "
        "speed: the framework's torch recipe's median / this median (> 1: faster); the whole "
        "step holds forward and backward, whose spread from run to run can pass the optimizer "
        "part's differences: read its speed loosely. others' CPUs: "
        "how many CPUs other processes kept busy, on average, while the arm ran (set-up "
        "included), per round; copy GB/s: the device's copy bandwidth (read + write) just before "
        "the arm, per round (on a shared host it moves with the other machines' load, unseen "
        "from here, and a memory-bound step with it).", "",
        "| framework | arm | clip ms | update ms | clip + update ms | per round | speed "
        "| whole step ms | speed | others' CPUs | copy GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['arm']}: {r['recipe']} | {spread(r['clip_ms'])} | "
            f"{spread(r['update_ms'])} | {spread(r['opt_ms'])} | "
            + " / ".join(f"{statistics.median(one['opt_ms']):.1f}" for one in r["rounds"])
            + f" | {r['opt_speed']:.2f}x | {spread(r['whole_ms'])} | {r['whole_speed']:.2f}x | "
            + " / ".join("-" if one["busy_during"] is None else f"{one['busy_during']:.2f}"
                         for one in r["rounds"]) + " | "
            + " / ".join(f"{one['copy_gbs']:.0f}" for one in r["rounds"]) + " |")
    lines += ["", "## Do the fusedopt arms train as the torch arm?", "",
              f"Relative gaps to the framework's torch arm (tolerance {RTOL:g}): losses, step by "
              "step; Adam's exp_avg and exp_avg_sq after the last step (they scale with the clip "
              "coefficient); the params' change from the start.", ""]
    for r in rows:
        if r["gaps"] is None:
            continue
        text = ", ".join(f"{k} {x:.1e}" for k, x in r["gaps"].items())
        bad = [k for k, x in r["gaps"].items() if not x <= RTOL]
        lines.append(f"- {r['framework']} {r['arm']}: {text}"
                     + (f" -- **WARNING: {', '.join(bad)} differ**" if bad else ": the same"))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small GPT-2 ({QUICK}), 1 + 2 steps: checks the script runs")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"comma list of {', '.join(FRAMEWORKS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs of every arm, every other one in reverse order")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (>= 1)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(report.RESULTS_DIR),
                        help="where the files go (default: bench/results/ beside this script)")
    args = parser.parse_args(argv)
    defaults = dict(frameworks=",".join(FRAMEWORKS), steps=2 if args.quick else 6,
                    rounds=1 if args.quick else 3, warmup=1 if args.quick else 2, batch=1, seq=32,
                    seed=0)
    args.steps = args.steps or defaults["steps"]
    args.rounds = args.rounds or defaults["rounds"]
    args.warmup = args.warmup or defaults["warmup"]
    report.split_names(parser, args, {"frameworks": FRAMEWORKS})
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.tag = report.run_tag("quick" if args.quick else "", report.changed_args(args, defaults))
    return args


def quiet() -> None:
    """The frameworks' advice for real runs (workers, loggers), not about what is measured."""
    warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|does not have many).*")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()


def run_arm(framework, arm, base, data, args, device):
    """One training run of an arm on a fresh copy of ``base``: (its Clock, its optimizer, the
    start value of each of its params by id, the CPUs others kept busy, torch threads before and
    after, wall seconds, the device's copy bandwidth just before in GB/s)."""
    copy_gbs = measure.copy_bandwidth_gbs(device, mbytes=512, repeats=5)
    model = copy.deepcopy(base).to(device)
    # id of the arm's param -> its start value (.to keeps the params, moving their data)
    base_params = {id(p): q.detach() for p, q in zip(model.parameters(), base.parameters())}
    clock, threads, start = Clock(device), torch.get_num_threads(), time.perf_counter()
    before = measure.cpu_sample()  # measure.busy_cpus's reading, over the whole arm
    opt = RUN[framework](arm, model, data, args, device, clock)
    others = measure.others_busy(before, measure.cpu_sample())
    return (clock, opt, base_params, others, [threads, torch.get_num_threads()],
            time.perf_counter() - start, copy_gbs)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    quiet()
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(**(QUICK if args.quick else FULL))
    torch.manual_seed(args.seed)
    base = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(config.vocab_size, ((args.warmup + args.steps) * args.batch, args.seq),
                         generator=gen)
    arms = [(f, a) for f in args.frameworks for a in ARMS[f]]
    rows = {key: dict(framework=key[0], arm=key[1], recipe=ARMS[key[0]][key[1]], rounds=[])
            for key in arms}
    progress = report.Progress(len(arms) * args.rounds)
    busy, start = [measure.busy_cpus()], time.perf_counter()
    measure.warn_if_busy(busy[0], "at the start")
    for r in range(args.rounds):
        # every other round backwards: each arm runs early and late, beside other neighbours
        for framework, arm in (arms if r % 2 == 0 else arms[::-1]):
            row = rows[framework, arm]
            clock, opt, base_params, others, threads, wall, copy_gbs = run_arm(
                framework, arm, base, data, args, device)
            row["rounds"].append(dict(busy_during=others, copy_gbs=copy_gbs, threads=threads,
                                      wall_s=wall, **clock.times(args.warmup)))
            if r == 0:  # the check, once: every round trains alike (the same seed and batches)
                row["losses"] = torch.stack(clock.losses).float().tolist()
                state = trained(opt, base_params, clock)
                if arm == "torch":  # first in its framework in round 0
                    reference, row["gaps"] = state, None
                else:
                    row["gaps"] = compare(state, reference)
                del state
            del clock, opt, base_params
            measure.warn_if_busy(others, f"during {framework} {arm}")
            progress.row(f"round {r + 1}, {framework} {arm}: clip + update "
                         f"{statistics.median(row['rounds'][-1]['opt_ms']):.1f} ms")
    del reference
    busy.append(measure.busy_cpus())
    rows = list(rows.values())
    for row in rows:  # every round's timed steps together
        for key in ("clip_ms", "update_ms", "opt_ms", "whole_ms"):
            row[key] = [t for one in row["rounds"] for t in one[key]]
    for row in rows:
        ref = next(x for x in rows if x["framework"] == row["framework"] and x["arm"] == "torch")
        row["opt_speed"] = statistics.median(ref["opt_ms"]) / statistics.median(row["opt_ms"])
        row["whole_speed"] = statistics.median(ref["whole_ms"]) / statistics.median(row["whole_ms"])
    import accelerate
    import lightning
    import transformers
    meta = dict(
        device=measure.device_name(device), device_type=device.type,
        versions=dict(measure.versions(), transformers=transformers.__version__,
                      accelerate=accelerate.__version__, lightning=lightning.__version__),
        fusedopt=fusedopt.__version__, commit=measure.commit(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        threads=torch.get_num_threads(), model="small" if not args.quick else f"quick {QUICK}",
        config={k: getattr(config, k) for k in FULL},
        params=sum(p.numel() for p in base.parameters()), batch=args.batch, seq=args.seq,
        seed=args.seed, warmup=args.warmup, steps=args.steps, rounds=args.rounds,
        hyperparameters=HYPER,
        max_grad_norm=MAX_NORM, wall_s=time.perf_counter() - start,
        busy_cpus=" / ".join("-" if b is None else f"{b:.2f}" for b in busy))
    text = markdown(meta, rows)
    print(text)
    files = report.result_paths(args.out_dir, "integrations", meta["device"], args.tag,
                                ("md", "json"))
    files["md"].write_text(text)
    files["json"].write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {files['md']}, {files['json']}")
    wrong = [f"{r['framework']} {r['arm']}" for r in rows
             if r["gaps"] and not all(x <= RTOL for x in r["gaps"].values())]
    if wrong:
        print(f"warning: {', '.join(wrong)} did not train as the torch arm (gaps in {files['md']})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
