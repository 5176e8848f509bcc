"""fusedopt.integrations.lightning against Lightning's own recipe on CPU: torch.optim.AdamW with
Trainer(gradient_clip_val=...), where Lightning clips with clip_grad_norm_ / clip_grad_value_ and,
under fp16, unscales, clips and lets the GradScaler skip. A 2-layer MLP, 64 generated samples in
batches of 16 (4 steps an epoch), 8 steps; the loss is x100 so that the clip at 1.0 is active.
"""
import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from conftest import assert_close
from fusedopt.integrations.lightning import FusedOptCallback, SkipAwareScheduling

pytestmark = [
    # Lightning's advice for real runs (more DataLoader workers, a logger), not about this code
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # torch 2.13 deprecates a class lightning 2.6.6's _pytree still uses
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

STEPS, LR, CLIP, INF_AT = 8, 1e-2, 1.0, 3
_gen = torch.Generator().manual_seed(1)
X, Y = torch.randn(64, 8, generator=_gen), torch.randn(64, 4, generator=_gen)
# the aten ops of a norm or a clip pass (clip_grad_norm_, clip_grad_value_, get_total_norm)
CLIP_OPS = {"_foreach_norm", "linalg_vector_norm", "norm", "_foreach_mul_", "_foreach_mul",
            "mul_", "_foreach_clamp_min_", "_foreach_clamp_max_", "clamp_", "clamp"}


def amp(init_scale=2.0 ** 8):
    """Lightning's fp16 plugin on CPU (precision="16-mixed" on CPU falls back to bf16-mixed), with
    a scale low enough that no step overflows in fp16 but the injected one."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return [MixedPrecision("16-mixed", "cpu", scaler=scaler)]


class Net(pl.LightningModule):
    def __init__(self, make_opt, *, inf_at=None, scheduler=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 4))
        self.make_opt, self.inf_at, self.scheduler = make_opt, inf_at, scheduler
        self.batches = 0  # training_step calls so far

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.batches == self.inf_at:
            x = x.clone()
            x[0, 0] = float("inf")
        self.batches += 1
        return 100 * (self.net(x).float() - y).square().mean()

    def configure_optimizers(self):
        opt = self.make_opt(self.parameters())
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Probe(pl.Callback):
    """Records, per batch: the first optimizer's lr, params before and after, trainer's clip."""

    def __init__(self):
        self.lrs, self.before, self.after, self.trainer_clip, self.opt_clip = [], [], [], [], []
        self.grad_norms = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.lrs.append(opt.param_groups[0]["lr"])
        self.before.append([p.detach().clone() for p in module.parameters()])
        self.trainer_clip.append(trainer.gradient_clip_val)
        self.opt_clip.append(getattr(opt, "max_grad_norm", None))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append([p.detach().clone() for p in module.parameters()])
        self.grad_norms.append(getattr(trainer.optimizers[0], "grad_norm", None))


def fit(module, *, callbacks=(), max_steps=STEPS, ckpt_path=None, **trainer_kw):
    kw = dict(logger=False, enable_checkpointing=False)
    kw.update(trainer_kw)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                         callbacks=list(callbacks), enable_progress_bar=False,
                         enable_model_summary=False, **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.fixture
def lightning_clips(monkeypatch):
    """What Lightning's own clip saw: per call, the total norm clip_grad_norm_ returned, or the
    largest |grad| before clip_grad_value_ (Lightning looks both up on torch.nn.utils per call)."""
    seen = []
    by_norm, by_value = torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad_value_

    def norm_(parameters, max_norm, *a, **kw):
        total = by_norm(parameters, max_norm, *a, **kw)
        seen.append(float(total))
        return total

    def value_(parameters, clip_value, *a, **kw):
        parameters = list(parameters)
        seen.append(max(float(p.grad.abs().max()) for p in parameters))
        return by_value(parameters, clip_value, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", norm_)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", value_)
    return seen


# -- the Trainer's clip moves into the optimizer -------------------------------------------------

@pytest.mark.parametrize("algorithm,backend", [("norm", "torch"), ("value", "torch"),
                                               ("norm", "triton")])
def test_trainer_clip_moves_into_the_optimizer(lightning_clips, algorithm, backend):
    """fusedopt.AdamW (no clip of its own) + FusedOptCallback + Trainer(gradient_clip_val=1.0)
    ends where torch.optim.AdamW + Trainer(gradient_clip_val=1.0) (Lightning's own clip) does;
    the clip is active at most steps, Lightning never clips in our run, and the Trainer's setting
    is None during the fit and back after it."""
    clip_kw = dict(gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm)
    ref = Net(lambda ps: torch.optim.AdamW(ps, lr=LR))
    fit(ref, **clip_kw)
    seen_by_lightning = list(lightning_clips)
    assert len(seen_by_lightning) == STEPS
    assert sum(s > CLIP for s in seen_by_lightning) >= STEPS - 1, seen_by_lightning

    lightning_clips.clear()
    ours, probe = Net(lambda ps: fusedopt.AdamW(ps, lr=LR, backend=backend)), Probe()
    trainer = fit(ours, callbacks=[FusedOptCallback(), probe], **clip_kw)
    assert lightning_clips == []
    opt = trainer.optimizers[0]
    key = "max_grad_value" if algorithm == "value" else "max_grad_norm"
    assert getattr(opt, key) == CLIP
    assert getattr(opt, "max_grad_norm" if algorithm == "value" else "max_grad_value") is None
    assert probe.trainer_clip == [None] * STEPS and trainer.gradient_clip_val == CLIP
    for a, b in zip(params(ours), params(ref)):
        assert_close(a, b)


def test_differing_clips_are_refused():
    """The optimizer's max_grad_norm=2.0 against Trainer(gradient_clip_val=1.0): a ValueError
    naming both, before any step; the Trainer's setting is left as it was."""
    module = Net(lambda ps: fusedopt.AdamW(ps, lr=LR, max_grad_norm=2.0))
    start = params(module)
    refusal = r"(?s)gradient_clip_val=1\.0.*max_grad_norm=2\.0.*Keep one"
    with pytest.raises(ValueError, match=refusal):
        fit(module, callbacks=[FusedOptCallback()], gradient_clip_val=CLIP)
    assert all(torch.equal(a, b) for a, b in zip(params(module), start))

    module = Net(lambda ps: fusedopt.AdamW(ps, lr=LR, norm_type="inf"))
    with pytest.raises(ValueError, match="clips the L2 norm.*norm_type=inf"):
        fit(module, callbacks=[FusedOptCallback()], gradient_clip_val=CLIP)


def test_what_the_callback_says(caplog):
    """It says that the optimizer clips now; warns that an overridden configure_gradient_clipping
    still runs; refuses a torch.optim optimizer beside a fusedopt one when clipping (Lightning 2.6
    cannot build that Trainer: a stand-in); with torch.optim alone it warns and leaves the clip
    to Lightning."""
    class OwnClipping(Net):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                        gradient_clip_algorithm=None):
            self.passed = gradient_clip_val
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)

    module = OwnClipping(lambda ps: fusedopt.AdamW(ps, lr=LR))
    caplog.set_level("INFO", logger="lightning.pytorch.utilities.rank_zero")
    still_runs = "configure_gradient_clipping still runs.*gradient_clip_val=None"
    with pytest.warns(UserWarning, match=still_runs):
        fit(module, callbacks=[FusedOptCallback()], gradient_clip_val=CLIP, max_steps=1)
    assert "clips now, inside its step: max_grad_norm=1.0" in caplog.text
    assert module.passed is None

    class Stand:  # the attributes of a Trainer that the callback reads
        gradient_clip_val, gradient_clip_algorithm, precision_plugin = CLIP, None, None
    stand = Stand()
    w = torch.nn.Parameter(torch.ones(2))
    v = torch.nn.Parameter(torch.ones(2))
    stand.optimizers = [fusedopt.AdamW([w], lr=LR), torch.optim.SGD([v], lr=LR)]
    with pytest.raises(ValueError, match="SGD is not a fusedopt optimizer"):
        FusedOptCallback().on_train_start(stand, Net(None))
    stand.optimizers = stand.optimizers[1:]
    with pytest.warns(UserWarning, match=r"none of trainer.optimizers is a fusedopt one \(SGD\)"):
        FusedOptCallback().on_train_start(stand, Net(None))
    assert stand.gradient_clip_val == CLIP


# -- the norm, logged from the optimizer --------------------------------------------------------

class AtenCalls(TorchDispatchMode):
    """Counts the aten ops run under it, by name, while ``on``."""

    def __init__(self):
        super().__init__()
        self.calls, self.on = {}, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("clip", [CLIP, None])
def test_logged_grad_norm_is_the_norm_lightning_clips_by(tmp_path, lightning_clips, clip):
    """log_grad_norm=True: the "grad_norm" a CSVLogger writes at each step is the norm
    clip_grad_norm_ returned in Lightning's own run (clip=1.0), or the total norm of the grads
    in an unclipped torch.optim run (clip=None: the optimizer gets max_grad_norm=inf, measures and
    never clips). Two batches accumulate per step: one value per optimizer step, not per batch.
    The hook that logs it runs no .item() (aten._local_scalar_dense)."""
    class Measured(pl.Callback):  # the unclipped reference's norms, from the grads themselves
        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.norms.append(float(torch.nn.utils.get_total_norm(
                [p.grad for p in module.parameters()])))

    ref, measured = Net(lambda ps: torch.optim.AdamW(ps, lr=LR)), Measured()
    fit(ref, callbacks=[measured], gradient_clip_val=clip, accumulate_grad_batches=2)
    expected = lightning_clips if clip else measured.norms
    assert len(expected) == STEPS

    callback = FusedOptCallback(log_grad_norm=True)
    logging_hook, counter = callback.on_train_batch_end, AtenCalls()

    def counted(*args):
        with counter:
            logging_hook(*args)
    callback.on_train_batch_end = counted
    ours, logged_keys = Net(lambda ps: fusedopt.AdamW(ps, lr=LR)), []
    module_log = ours.log

    def log(name, value, **kw):  # Lightning writes only on stepping batches: count the calls
        logged_keys.append(name)
        return module_log(name, value, **kw)
    ours.log = log
    trainer = fit(ours, callbacks=[callback], gradient_clip_val=clip, accumulate_grad_batches=2,
                  log_every_n_steps=1, logger=CSVLogger(tmp_path, name="", version=""))
    assert "_local_scalar_dense" not in counter.calls, counter.calls
    assert logged_keys == ["grad_norm"] * STEPS
    assert trainer.optimizers[0].max_grad_norm == (clip or math.inf)
    with open(tmp_path / "metrics.csv") as f:
        logged = [float(row["grad_norm"]) for row in csv.DictReader(f) if row.get("grad_norm")]
    assert_close(torch.tensor(logged), torch.tensor(expected))
    for a, b in zip(params(ours), params(ref)):
        assert_close(a, b)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_no_clip_pass_outside_the_step(algorithm):
    """With the callback no norm or clip op runs outside the optimizer's step (aten ops counted by
    a dispatch mode over the whole fit, paused inside step() but not inside the closure that
    Lightning runs in it, where its own clip happens); Lightning's run on torch.optim shows its
    clip ops there, so the counter does see them."""
    def counted_outside_step(counter, make):
        def make_opt(ps):
            opt = make(ps)
            step = opt.step

            def closure_counted(closure):
                def run():
                    counter.on = True
                    try:
                        return closure()
                    finally:
                        counter.on = False
                return run

            def paused_step(closure=None, **kw):
                counter.on = False
                try:
                    return step(closure=None if closure is None else closure_counted(closure), **kw)
                finally:
                    counter.on = True
            opt.step = paused_step
            return opt
        return make_opt

    clip_kw = dict(gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm)
    runs = {}
    for name, make, callbacks in (
            ("torch", lambda ps: torch.optim.AdamW(ps, lr=LR), []),
            ("fused", lambda ps: fusedopt.AdamW(ps, lr=LR), [FusedOptCallback()])):
        counter = AtenCalls()
        with counter:
            fit(Net(counted_outside_step(counter, make)), callbacks=callbacks, **clip_kw)
        runs[name] = {k: v for k, v in counter.calls.items() if k in CLIP_OPS}
    assert runs["fused"] == {}
    assert sum(runs["torch"].values()) >= STEPS, runs["torch"]


# -- fp16: the scaler, skipped steps, the scheduler ---------------------------------------------

class SkipAwareNet(SkipAwareScheduling, Net):
    pass


class OracleNet(Net):
    """The schedule that counts only the updates that happened: no scheduler step after the batch
    with the injected inf (known beforehand, not read from any flag)."""

    def lr_scheduler_step(self, scheduler, metric):
        if self.batches - 1 != self.inf_at:
            super().lr_scheduler_step(scheduler, metric)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_skipped_step_holds_params_and_schedule(backend):
    """fp16 autocast + GradScaler, an inf in the 4th batch. fusedopt.AdamW + FusedOptCallback +
    SkipAwareScheduling against torch.optim.AdamW + Lightning's fp16 path (unscale_,
    clip_grad_norm_, the scaler skips) with the scheduler step of the skipped batch left out:
    the step is skipped (params equal over it), the lr trajectory is the oracle's, the scaler is
    fusedopt's, with the oracle's scale, and the good steps match."""
    clip_kw = dict(gradient_clip_val=CLIP)
    ref = OracleNet(lambda ps: torch.optim.AdamW(ps, lr=LR), inf_at=INF_AT, scheduler=True)
    ref_probe = Probe()
    ref_trainer = fit(ref, callbacks=[ref_probe], plugins=amp(), **clip_kw)
    ours, probe = SkipAwareNet(lambda ps: fusedopt.AdamW(ps, lr=LR, backend=backend),
                               inf_at=INF_AT, scheduler=True), Probe()
    trainer = fit(ours, callbacks=[FusedOptCallback(), probe], plugins=amp(), **clip_kw)

    for p in (ref_probe, probe):  # the oracle skipped there too, and only there
        unchanged = [all(map(torch.equal, x, y)) for x, y in zip(p.before, p.after)]
        assert unchanged == [i == INF_AT for i in range(STEPS)]
    assert ref_probe.lrs[INF_AT + 1] == ref_probe.lrs[INF_AT] > ref_probe.lrs[INF_AT + 2]
    assert probe.lrs == ref_probe.lrs
    scaler = trainer.precision_plugin.scaler
    assert type(scaler) is fusedopt.GradScaler
    assert scaler.get_scale() == ref_trainer.precision_plugin.scaler.get_scale() == 2.0 ** 7
    # Autocast casts the weights to fp16 (unit roundoff 2**-11) for every matmul. The two runs'
    # fp32 params drift by fp32 rounding (fused vs for-loop AdamW), and a drift of an ulp can flip
    # one weight's fp16 rounding: that changes the grads it touches by up to 2**-11 relative,
    # and AdamW's normalized update lr * m / sqrt(v) by about as much, at most lr * 2**-10 per
    # step with a factor 2 to spare; over STEPS steps: STEPS * lr * 2**-10 (7.8e-5). Measured: 3e-8
    # (no flip happened), so the runs agree as in fp32 unless a rounding flips.
    for a, b in zip(params(ours), params(ref)):
        assert_close(a, b, atol=STEPS * LR * 2.0 ** -10)


def test_grads_the_module_hook_sees_under_fp16():
    """unscale_before_hooks=True: the LightningModule's on_before_optimizer_step sees the true
    gradients, whose norm is the one the optimizer's step then measures (opt.grad_norm); without
    it, the gradients times the scaler's scale (256 here). Both end in the same place."""
    class Looking(Net):
        def on_before_optimizer_step(self, optimizer):
            self.seen.append(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]))
            self.scales.append(self.trainer.precision_plugin.scaler.get_scale())

    finals = {}
    for unscale in (True, False):
        module, probe = Looking(lambda ps: fusedopt.AdamW(ps, lr=LR)), Probe()
        module.seen, module.scales = [], []
        fit(module, callbacks=[FusedOptCallback(unscale_before_hooks=unscale), probe],
            plugins=amp(), gradient_clip_val=CLIP)
        assert module.scales == [2.0 ** 8] * STEPS
        factor = 1.0 if unscale else 2.0 ** 8
        assert_close(torch.stack(module.seen), factor * torch.stack(probe.grad_norms))
        finals[unscale] = params(module)
    for a, b in zip(finals[True], finals[False]):
        assert_close(a, b)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")
def test_unscale_before_hooks_after_a_batch_without_loss():
    """A training_step that returns None: Lightning still calls on_before_optimizer_step (with no
    grads: zero_grad ran) but neither scaler.step nor update; an unscale_ there would make the
    next batch's unscale_ raise "unscale_() has already been called"."""
    class NoLossAt3(Net):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if self.batches == 3 else loss

    module = NoLossAt3(lambda ps: fusedopt.AdamW(ps, lr=LR))
    fit(module, callbacks=[FusedOptCallback(unscale_before_hooks=True)], plugins=amp(),
        gradient_clip_val=CLIP)
    assert module.batches == STEPS


# -- checkpoints -------------------------------------------------------------------------------

# Lightning's advice to pass the ModelCheckpoint that wrote the checkpoint: it resumes nothing here
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
@pytest.mark.parametrize("precision", ["32", "16-mixed"])
@pytest.mark.parametrize("resume_clip", [None, CLIP])
def test_resume_takes_the_clip_from_the_checkpoint(tmp_path, precision, resume_clip):
    """8 steps uninterrupted, saving a checkpoint at step 4 (an epoch's end); a fresh Trainer
    resumes from it to step 8 with an optimizer constructed with max_grad_norm=5.0 and ends on
    the uninterrupted run's params, bit for bit: the checkpoint's clip (1.0, which the first run
    took from its Trainer) wins, whether the resumed Trainer asks for no clip or for the same
    one (the checkpoint is restored before on_train_start, where the callback compares). Under
    fp16 an inf at step 1 halves the scale before the checkpoint; the resumed scaler goes on
    from it."""
    plugins = amp() if precision == "16-mixed" else []
    inf_at = 1 if plugins else None
    whole = Net(lambda ps: fusedopt.AdamW(ps, lr=LR), inf_at=inf_at)
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    whole_trainer = fit(whole, callbacks=[FusedOptCallback(), save], gradient_clip_val=CLIP,
                        plugins=plugins, enable_checkpointing=True, default_root_dir=tmp_path)
    (ckpt,) = tmp_path.glob("*step=4.ckpt")
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["max_grad_norm"] for g in saved] == [CLIP]

    resumed = Net(lambda ps: fusedopt.AdamW(ps, lr=LR, max_grad_norm=5.0))
    probe = Probe()
    trainer = fit(resumed, callbacks=[FusedOptCallback(), probe], ckpt_path=ckpt,
                  gradient_clip_val=resume_clip, plugins=amp() if plugins else [])
    assert len(probe.opt_clip) == STEPS - 4 and set(probe.opt_clip) == {CLIP}
    for a, b in zip(params(resumed), params(whole)):
        assert torch.equal(a, b)
    if plugins:
        assert type(trainer.precision_plugin.scaler) is fusedopt.GradScaler
        assert trainer.precision_plugin.scaler.get_scale() == 2.0 ** 7
        assert whole_trainer.precision_plugin.scaler.get_scale() == 2.0 ** 7
