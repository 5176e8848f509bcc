"""fusedopt.integrations.transformers against transformers.Trainer's own recipe on CPU:
Trainer(optim="adamw_torch") with torch.optim.AdamW, where the Trainer clips with
accelerator.clip_grad_norm_ and logs the norm that returns. A 2-layer GPT-2 (n_embd=32) from a
config, 64 generated sequences of 16 tokens in batches of 8 (8 steps an epoch), 8 steps at
lr 1e-2, max_grad_norm 0.5: the reference's logged norms (0.57 to 1.07) exceed it at every step.
"""
import re

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Trainer, TrainerCallback, TrainingArguments

import fusedopt
from fusedopt.integrations.transformers import FusedTrainer, FusedTrainerMixin
from tiny_gpt2 import CLIP, INF_AT, LR, SCALE, STEPS, WD, assert_same_params, gpt2, groups


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 97, (64, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(trainer_cls, out, *, optimizer=None, callbacks=(), resume=None, init=None, **settings):
    """trainer_cls on the tiny GPT-2 for STEPS steps; ``optimizer(model)`` if given is passed in
    optimizers=, ``init`` to the trainer; callbacks with a ``trainer`` attribute get the trainer;
    ``settings`` go to TrainingArguments."""
    model = gpt2()
    kw = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=LR,
              weight_decay=WD, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
              seed=0, dataloader_num_workers=0, disable_tqdm=True)
    kw.update(settings)
    trainer = trainer_cls(model=model, args=TrainingArguments(**kw), train_dataset=Tokens(),
                          optimizers=(optimizer(model) if optimizer else None, None),
                          callbacks=list(callbacks), **(init or {}))
    for callback in callbacks:
        if hasattr(callback, "trainer"):
            callback.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "loss" in entry]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def bitwise_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def assert_same_norms(ours, ref, rtol=1e-5):
    """Logged grad norms: fusedopt's norm pass against the Trainer's clip_grad_norm_, the same
    sums in another order (1-2e-7 apart here)."""
    torch.testing.assert_close(logged(ours, "grad_norm"), logged(ref, "grad_norm"), rtol=rtol,
                               atol=0)


def assert_clip_active(norms, clip):
    """The reference's pre-clip norms exceed the clip at most steps: the clip is tested."""
    assert len(norms) == STEPS and sum(n > clip for n in norms) >= STEPS - 1, norms


def group_names(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"])
            for g in trainer.optimizer.param_groups]


# -- the Trainer's clip moves into the optimizer -------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_trainer_equals_the_trainers_clip(tmp_path, backend):
    """FusedTrainer(max_grad_norm=0.5) ends where Trainer(optim="adamw_torch", max_grad_norm=0.5)
    does and logs the same grad_norm at every step; its optimizer is fusedopt.AdamW clipping at
    0.5, with the Trainer's weight-decay groups. "torch": the optimizer built from
    TrainingArguments (the default optim); "triton": optimizer_cls_and_kwargs (interpreter)."""
    ref = train(Trainer, tmp_path / "ref", optim="adamw_torch", max_grad_norm=CLIP)
    assert_clip_active(logged(ref, "grad_norm"), CLIP)
    init = {} if backend == "torch" else dict(
        optimizer_cls_and_kwargs=(fusedopt.AdamW, dict(lr=LR, backend="triton")))
    ours = train(FusedTrainer, tmp_path / "ours", max_grad_norm=CLIP, init=init)

    assert isinstance(ours.optimizer, AcceleratedOptimizer)
    opt = ours.optimizer.optimizer
    assert type(opt) is fusedopt.AdamW and opt.max_grad_norm == CLIP
    assert opt.backend == (None if backend == "torch" else "triton")
    assert group_names(ours) == group_names(ref)
    (decay, wd), (no_decay, no_wd) = group_names(ours)
    assert wd == WD and no_wd == 0.0 and decay and no_decay
    assert all("bias" in n or ".ln_" in n for n in no_decay)
    assert_same_norms(ours, ref)
    assert logged(ours, "learning_rate") == logged(ref, "learning_rate")
    assert_same_params(ours.model, ref.model)


def test_two_clips_are_refused_and_max_grad_norm_0_keeps_the_optimizers(tmp_path):
    """The issue: TrainingArguments' default max_grad_norm=1.0 and fusedopt.AdamW(max_grad_norm=2.0)
    made the Trainer's tighter clip win silently; now train() refuses, naming both and the fix,
    before any step. With max_grad_norm=0 the optimizer's own clip (0.3 here, active) stands:
    the run equals Trainer(max_grad_norm=0.3) + torch.optim.AdamW, logged norms included."""
    model = gpt2()
    start = snapshot(model)
    settings = dict(output_dir=str(tmp_path / "default"), use_cpu=True, report_to=[], max_steps=2)
    assert TrainingArguments(**settings).max_grad_norm == 1.0
    trainer = FusedTrainer(model=model, args=TrainingArguments(**settings), train_dataset=Tokens(),
                           optimizers=(fusedopt.AdamW(model.parameters(), max_grad_norm=2.0), None))
    fix = (r"(?s)TrainingArguments\(max_grad_norm=1\.0\).*max_grad_norm=2\.0.*"
           r"set TrainingArguments\(max_grad_norm=2\.0\), or max_grad_norm=0")
    with pytest.raises(ValueError, match=fix):
        trainer.train()
    assert bitwise_equal(model.parameters(), start)

    own = 0.3
    ref = train(Trainer, tmp_path / "ref", optim="adamw_torch", max_grad_norm=own)
    assert_clip_active(logged(ref, "grad_norm"), own)
    ours = train(FusedTrainer, tmp_path / "ours", max_grad_norm=0,
                 optimizer=lambda m: fusedopt.AdamW(groups(m), lr=LR, max_grad_norm=own))
    assert ours.optimizer.optimizer.max_grad_norm == own
    assert_same_norms(ours, ref)
    assert_same_params(ours.model, ref.model)


def test_max_grad_norm_0_still_logs_the_norm(tmp_path):
    """max_grad_norm=0 and an optimizer without a clip: the optimizer gets max_grad_norm=inf (it
    measures, never clips), the logged grad_norm equals the one Trainer(max_grad_norm=0) logs
    (its clip_grad_norm_(params, inf)), and the run equals the unclipped reference."""
    ref = train(Trainer, tmp_path / "ref", optim="adamw_torch", max_grad_norm=0)
    ours = train(FusedTrainer, tmp_path / "ours", max_grad_norm=0)
    assert ours.optimizer.optimizer.max_grad_norm == float("inf")
    norms = logged(ref, "grad_norm")
    assert len(norms) == STEPS and all(n > 0 for n in norms)
    torch.testing.assert_close(logged(ours, "grad_norm"), norms, rtol=1e-5, atol=0)
    assert_same_params(ours.model, ref.model)


# -- no pass over the gradients but the optimizer's ----------------------------------------------

class GradOps(TorchDispatchMode):
    """Counts, by name, the aten ops that take one of ``grads`` (by storage) as an argument."""

    def __init__(self, grads):
        super().__init__()
        self.storages = {g.untyped_storage().data_ptr() for g in grads}
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() in self.storages for t in tensors):
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class CountFromBackwardToStep(TrainerCallback):
    """With counting(): the ops on the grads from the end of backward (training_step returns) to
    the end of optimizer.step() (on_optimizer_step), one dict per step."""

    def __init__(self):
        self.trainer, self.per_step = None, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        counter = self.trainer.counter
        counter.__exit__(None, None, None)
        self.per_step.append(counter.calls)


def counting(base):
    class Counting(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.counter = GradOps([p.grad for p in model.parameters() if p.grad is not None])
            self.counter.__enter__()
            return loss
    return Counting


def test_no_pass_over_the_grads_but_the_optimizers(tmp_path):
    """Between backward and the end of optimizer.step(), FusedTrainer (torch backend) touches the
    gradients only in fusedopt's norm pass (one _foreach_norm) and its update (_fused_adamw_),
    and logs that norm. The recipe it replaces, transformers.Trainer(max_grad_norm=0) + the same
    optimizer, adds the Trainer's clip_grad_norm_(params, inf): one more _foreach_norm and a
    _foreach_mul_ by 1.0 every step. The same optimizer clips in both, so both runs end bit for
    bit in the same place."""
    ours_count, ref_count = CountFromBackwardToStep(), CountFromBackwardToStep()
    make_opt = lambda m: fusedopt.AdamW(groups(m), lr=LR, max_grad_norm=CLIP, backend="torch")
    ours = train(counting(FusedTrainer), tmp_path / "ours", max_grad_norm=CLIP,
                 optimizer=make_opt, callbacks=[ours_count])
    ref = train(counting(Trainer), tmp_path / "ref", max_grad_norm=0, optimizer=make_opt,
                callbacks=[ref_count])
    update = {"_fused_adamw_": 2}  # one call per param group
    assert ref_count.per_step == [{"_foreach_norm": 2, "_foreach_mul_": 1, **update}] * STEPS
    assert ours_count.per_step == [{"_foreach_norm": 1, **update}] * STEPS
    assert bitwise_equal(ours.model.parameters(), ref.model.parameters())
    assert_same_norms(ours, ref, rtol=1e-6)


# -- skipped steps ---------------------------------------------------------------------------------

class Probe(TrainerCallback):
    """Per optimizer step: the params before and after it, and what the accelerator says."""

    def __init__(self):
        self.trainer, self.before, self.after, self.skipped = None, [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before.append(snapshot(model))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after.append(snapshot(model))
        self.skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)


def overflowing(base):
    """``base`` whose backward at step INF_AT leaves an inf in one gradient (as an fp16 overflow
    would); it also records the raw (scaled, if a scaler scaled the loss) norm at each backward."""
    class Overflowing(base):
        raw_norms = ()

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            self.raw_norms = [*self.raw_norms, float(torch.linalg.vector_norm(grads))]
            if self.state.global_step == INF_AT:
                model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
            return loss
    return Overflowing


class Fp16Trainer(Trainer):
    """transformers.Trainer as it runs under fp16 on a GPU, on CPU. accelerate makes its fp16
    GradScaler only off-CPU (Accelerator.__init__ requires device.type != "cpu"), so this gives
    the accelerator a torch.amp.GradScaler("cpu") right after the Trainer makes it, where
    accelerate's own would be; FusedTrainerMixin in front converts it right after that
    (use_fusedopt), as it converts accelerate's. (Assigned to trainer.accelerator.scaler later,
    it would reach prepare() unconverted; no accelerate code path does that.) And on a GPU,
    accelerator.clip_grad_norm_ unscales first (accelerator.unscale_gradients), which accelerate
    gates on native_amp and mixed_precision == "fp16", both off on CPU: the reference does that
    unscale here, or it would clip scaled gradients."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)

    def _clip_grad_norm(self, model):
        self.accelerator.scaler.unscale_(self.optimizer.optimizer)
        return super()._clip_grad_norm(model)


class FusedFp16Trainer(FusedTrainerMixin, Fp16Trainer):
    """FusedTrainer under the same scaler (its _clip_grad_norm replaces Fp16Trainer's)."""


def lr_with_one_skip():
    """The logged lr per step (the Trainer logs the lr the step used) for the linear schedule
    without warmup, lr * (1 - k / STEPS) after k scheduler steps, when the scheduler does not
    advance on step INF_AT."""
    advanced = [i - (i > INF_AT) for i in range(STEPS)]
    return [LR * (STEPS - k) / STEPS for k in advanced]


def assert_skipped_at_inf(probe, trainer):
    assert probe.skipped == [i == INF_AT for i in range(STEPS)]
    for i, (before, after) in enumerate(zip(probe.before, probe.after)):
        assert bitwise_equal(before, after) == (i == INF_AT), i
    assert logged(trainer, "learning_rate") == pytest.approx(lr_with_one_skip(), rel=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_skip_is_reported_and_the_scheduler_waits(tmp_path, backend):
    """fusedopt.AdamW(nonfinite="skip") with an inf in one gradient at step 3: that step leaves
    the params as they were, trainer.accelerator.optimizer_step_was_skipped is True right after
    it (only then), and the linear schedule does not advance on it. The run ends where
    Trainer + torch.optim.AdamW (foreach) does when its GradScaler skips the same step: there
    accelerate sees that step() was not called (the power-of-2 scale is exact: the unscaled
    gradients are ours)."""
    ref_probe, probe = Probe(), Probe()
    ref = train(overflowing(Fp16Trainer), tmp_path / "ref", optim="adamw_torch",
                max_grad_norm=CLIP, callbacks=[ref_probe])
    assert_skipped_at_inf(ref_probe, ref)

    skip = lambda m: fusedopt.AdamW(groups(m), lr=LR, nonfinite="skip", backend=backend)
    ours = train(overflowing(FusedTrainer), tmp_path / "ours", max_grad_norm=CLIP, optimizer=skip,
                 callbacks=[probe])
    assert ours.accelerator.scaler is None and ours.optimizer.scaler is None
    assert_skipped_at_inf(probe, ours)
    ref_norms, norms = logged(ref, "grad_norm"), logged(ours, "grad_norm")
    assert ref_norms[INF_AT] == float("inf")
    del ref_norms[INF_AT], norms[INF_AT]
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert_same_params(ours.model, ref.model)


def test_grad_scaler_skip_is_reported(tmp_path):
    """Under the Trainer's fp16 GradScaler (injected where accelerate makes it): FusedTrainer's
    accelerator and the prepared optimizer hold one fusedopt.GradScaler (use_fusedopt's
    swap); the Trainer scales the loss itself (accelerator.backward: the raw gradient norm is
    SCALE times the logged one); the overflow step is skipped and reported, the scheduler waits,
    the scale backs off once; and the run equals Trainer + torch.optim.AdamW (non-fused, so
    accelerate sees the skip) under the same scaler and inf."""
    ref_probe, probe = Probe(), Probe()
    ref = train(overflowing(Fp16Trainer), tmp_path / "ref", optim="adamw_torch",
                max_grad_norm=CLIP, callbacks=[ref_probe])
    assert type(ref.accelerator.scaler) is torch.amp.GradScaler
    assert_skipped_at_inf(ref_probe, ref)

    ours = train(overflowing(FusedFp16Trainer), tmp_path / "ours", max_grad_norm=CLIP,
                 callbacks=[probe])
    assert type(ours.accelerator.scaler) is fusedopt.GradScaler
    assert ours.optimizer.scaler is ours.accelerator.scaler
    assert_skipped_at_inf(probe, ours)
    assert ours.accelerator.scaler.get_scale() == ref.accelerator.scaler.get_scale() == SCALE / 2

    norms = logged(ours, "grad_norm")
    torch.testing.assert_close(ours.raw_norms[0], SCALE * norms[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.raw_norms, ref.raw_norms, rtol=1e-5, atol=0)
    ref_norms = logged(ref, "grad_norm")
    del ref_norms[INF_AT], norms[INF_AT]
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert_same_params(ours.model, ref.model)


# -- checkpoints -----------------------------------------------------------------------------------

def test_resume_from_checkpoint(tmp_path):
    """FusedTrainer saves at step 4 of 8; a fresh FusedTrainer whose TrainingArguments ask
    max_grad_norm=1.0 resumes from that checkpoint and ends bit for bit where the uninterrupted
    run ends: the checkpoint holds the clip in the optimizer's param groups, and the saved clip
    wins over the new arguments as the saved lr does (the optimizer is built from the arguments,
    then loads the checkpoint). Bit for bit, not to rounding: the same ops run on the same values
    (the Trainer restores the RNG for dropout and skips the batches already seen). The
    checkpoint's optimizer state also loads into torch.optim.AdamW."""
    whole = train(FusedTrainer, tmp_path, max_grad_norm=CLIP, save_strategy="steps",
                  save_steps=STEPS // 2)
    checkpoint = tmp_path / f"checkpoint-{STEPS // 2}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [g["max_grad_norm"] for g in saved["param_groups"]] == [CLIP, CLIP]

    resumed = train(FusedTrainer, tmp_path / "resumed", max_grad_norm=1.0, resume=str(checkpoint))
    assert resumed.optimizer.optimizer.max_grad_norm == CLIP
    assert resumed.state.global_step == STEPS
    assert bitwise_equal(resumed.model.parameters(), whole.model.parameters())
    # the first half of the resumed log is the checkpoint's trainer_state.json, the second is new
    assert logged(resumed, "grad_norm") == logged(whole, "grad_norm")

    model = gpt2()
    plain = torch.optim.AdamW(groups(model), lr=LR)
    plain.load_state_dict(saved)
    assert [g["weight_decay"] for g in plain.param_groups] == [WD, 0.0]
    loaded = plain.state_dict()["state"]
    assert loaded.keys() == saved["state"].keys() and len(loaded) == len(list(model.parameters()))
    for i, state in saved["state"].items():
        assert state.keys() == loaded[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state[k], loaded[i][k]) for k in state)


# -- what FusedTrainer refuses ---------------------------------------------------------------------

def test_optimizers_without_a_fusedopt_namesake_are_refused(tmp_path):
    """TrainingArguments(optim="adafactor") builds transformers' Adafactor, which fusedopt has no
    namesake of: a ValueError naming it and the fix. A torch.optim optimizer passed in
    optimizers=: a TypeError naming it and the fix. Both before any step."""
    model = gpt2()
    start = snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                             optim="adafactor")
    trainer = FusedTrainer(model=model, args=args, train_dataset=Tokens())
    refusal = (r"(?s)optim='adafactor'.*transformers\.optimization\.Adafactor.*no fusedopt "
               r"namesake.*optim='adamw_torch'.*optimizers=\(fusedopt\.<Class>\(\.\.\.\), None\)")
    with pytest.raises(ValueError, match=refusal):
        trainer.train()

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    trainer = FusedTrainer(model=model, args=args, train_dataset=Tokens(),
                           optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match=re.escape("got torch.optim.adamw.AdamW: pass optimizers="
                                                  "(fusedopt.<Class>(...), scheduler)")):
        trainer.train()
    assert bitwise_equal(model.parameters(), start)
