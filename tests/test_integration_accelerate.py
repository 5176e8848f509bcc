"""fusedopt.integrations.accelerate against accelerate's own recipe on CPU: a plain loop
(prepare(model, opt, loader, scheduler), accelerator.backward, clip_grad_norm_, opt.step(),
scheduler.step(), opt.zero_grad()) with torch.optim.AdamW. A 2-layer GPT-2 (n_embd=32) from a
config, 64 generated sequences of 16 tokens in batches of 8, 8 steps at lr 1e-2 on a linear
schedule, max_grad_norm 0.5: the reference's pre-clip norms (0.57 to 1.07) exceed it at every step.
"""
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from fusedopt.integrations.accelerate import (FusedAccelerator, FusedAcceleratedOptimizer,
                                              FusedAcceleratorMixin, use_fusedopt)
from tiny_gpt2 import CLIP, INF_AT, LR, SCALE, STEPS, assert_same_params, gpt2, groups

IDS = torch.randint(0, 97, (64, 16), generator=torch.Generator().manual_seed(1))
DOUBLE_CLIP_FIX = "Remove the accelerator.clip_grad_norm_ call and let the optimizer clip"


def torch_adamw(model):
    # foreach, not fused: GradScaler skips it by not calling step(), which accelerate sees
    return torch.optim.AdamW(groups(model), lr=LR)


def fused_adamw(**kw):
    return lambda model: fusedopt.AdamW(groups(model), lr=LR, **kw)


def make(accelerator_cls, *, fp16=False):
    """``accelerator_cls(cpu=True)``; with ``fp16``, given a torch.amp.GradScaler("cpu") at the end
    of Accelerator.__init__, where accelerate makes its fp16 scaler on a GPU (it makes none on
    CPU: Accelerator.__init__ requires device.type != "cpu" for one). FusedAccelerator converts
    the scaler after that __init__, as it would convert accelerate's (and one assigned to
    accelerator.scaler later, at prepare_optimizer)."""
    if not fp16:
        return accelerator_cls(cpu=True)
    init = Accelerator.__init__

    def with_scaler(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Accelerator, "__init__", with_scaler)
        return accelerator_cls(cpu=True)


def prepare(accelerator, make_opt):
    model = gpt2()
    opt = make_opt(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / STEPS)
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in IDS], batch_size=8)
    return accelerator.prepare(model, opt, loader, schedule)


class HostSyncs(TorchDispatchMode):
    """Counts the aten ops that copy a tensor's value to the host (.item(), bool(tensor))."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "item")
        return func(*args, **(kwargs or {}))


@dataclass
class Run:
    """Per step: params before and after opt.step(), the lr it used, what the accelerator said,
    the host syncs in step + scheduler step + that question, the norm clip_grad_norm_ returned,
    and the optimizer's grad_norm and step_skipped; the model at the end."""
    model: torch.nn.Module = None
    before: list = field(default_factory=list)
    after: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    syncs: list = field(default_factory=list)
    clip_norms: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    step_skipped: list = field(default_factory=list)


def train(accelerator, prepared, *, clip=None, unscale=False, inf_at=None, warned=None):
    """The loop, on what ``prepare`` returned. ``clip``: accelerator.clip_grad_norm_(params, clip)
    before the step, after scaler.unscale_ when ``unscale`` (the unscale accelerate does on a GPU
    in unscale_gradients, which it gates on native_amp and mixed_precision == "fp16", both off
    on CPU). ``inf_at``: the step whose gradient gets an inf after backward, as an fp16 overflow
    would. ``warned``: a list that collects the warnings of the whole loop."""
    model, opt, loader, schedule = prepared
    torch.manual_seed(1)  # dropout: the same draws in every run
    run = Run(model=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, batch in enumerate(loader):
            accelerator.backward(model(**batch).loss)
            if i == inf_at:
                model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
            if clip is not None:
                if unscale:
                    accelerator.scaler.unscale_(opt.optimizer)
                run.clip_norms.append(accelerator.clip_grad_norm_(model.parameters(), clip).clone())
            run.before.append([p.detach().clone() for p in model.parameters()])
            run.lrs.append(schedule.get_last_lr()[0])
            with HostSyncs() as syncs:
                opt.step()
                schedule.step()
                run.skipped.append(accelerator.optimizer_step_was_skipped)
            run.syncs.append(syncs.count)
            run.after.append([p.detach().clone() for p in model.parameters()])
            inner = opt.optimizer
            for seen, name in ((run.grad_norms, "grad_norm"), (run.step_skipped, "step_skipped")):
                value = getattr(inner, name, None)
                seen.append(None if value is None else value.clone())
            opt.zero_grad()
    if warned is not None:
        warned.extend(caught)
    else:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    assert len(run.lrs) == STEPS
    return run


def lr_schedule(skipped_at=None):
    """The lr each step uses on the linear schedule, lr * (1 - k / STEPS) after k scheduler
    steps, when the scheduler does not advance on step ``skipped_at``."""
    advanced = [i - (skipped_at is not None and i > skipped_at) for i in range(STEPS)]
    return [LR * (1 - k / STEPS) for k in advanced]


def assert_skipped_at_inf(run):
    """Step INF_AT, and only it, reported skipped, left the params as they were and held the lr."""
    assert run.skipped == [i == INF_AT for i in range(STEPS)]
    for i, (before, after) in enumerate(zip(run.before, run.after)):
        assert all(torch.equal(a, b) for a, b in zip(before, after)) == (i == INF_AT), i
    assert run.lrs == pytest.approx(lr_schedule(INF_AT), rel=1e-12)


def reference_with_skip():
    """accelerate's recipe under an fp16 GradScaler, inf at step INF_AT: torch.optim.AdamW
    (foreach, so GradScaler skips by not calling step() and accelerate sees it), unscale_ then
    accelerator.clip_grad_norm_(params, CLIP)."""
    accelerator = make(Accelerator, fp16=True)
    run = train(accelerator, prepare(accelerator, torch_adamw), clip=CLIP, unscale=True,
                inf_at=INF_AT)
    assert type(accelerator.scaler) is torch.amp.GradScaler
    assert_skipped_at_inf(run)
    assert accelerator.scaler.get_scale() == SCALE / 2
    return run


# -- the clip inside the optimizer -----------------------------------------------------------------

def test_fused_accelerator_equals_accelerates_clip():
    """FusedAccelerator + fusedopt.AdamW(max_grad_norm=0.5) ends where Accelerator +
    torch.optim.AdamW + accelerator.clip_grad_norm_(params, 0.5) does, and opt.grad_norm after
    each step equals the norm clip_grad_norm_ returned (the same sums in another order: 1-2e-7
    apart). No GradScaler and nonfinite="propagate": nothing skips, nothing syncs."""
    accelerator = make(Accelerator)
    ref = train(accelerator, prepare(accelerator, torch_adamw), clip=CLIP)
    assert sum(float(n) > CLIP for n in ref.clip_norms) >= STEPS - 1, ref.clip_norms
    accelerator = make(FusedAccelerator)
    prepared = prepare(accelerator, fused_adamw(max_grad_norm=CLIP))
    assert type(prepared[1]) is FusedAcceleratedOptimizer
    assert type(prepared[3]) is AcceleratedScheduler
    ours = train(accelerator, prepared)
    torch.testing.assert_close(ours.grad_norms, ref.clip_norms, rtol=1e-5, atol=0)
    assert ours.skipped == [False] * STEPS and ours.step_skipped == [None] * STEPS
    assert ours.syncs == [0] * STEPS
    assert ours.lrs == pytest.approx(lr_schedule(), rel=1e-12) and ref.lrs == ours.lrs
    assert_same_params(ours.model, ref.model)


# -- skipped steps ---------------------------------------------------------------------------------

def test_grad_scaler_skip_is_reported():
    """Under accelerate's fp16 GradScaler (made where accelerate makes it): FusedAccelerator
    turns it into one fusedopt.GradScaler, shared with the prepared optimizer; the overflow step
    is reported skipped (accelerator.optimizer_step_was_skipped), the prepared scheduler does not
    advance on it, the params stay, the scale backs off once; the run ends where the reference
    (torch.optim.AdamW under torch's scaler, which accelerate sees skip) ends.

    A fact about accelerate, which the integration exists for: the plain Accelerator with the
    same fusedopt optimizer and scaler reports no skip on that step (GradScaler calls a fusedopt
    step() that skips on the device, and accelerate judges by the call), so its scheduler
    advances there, although the params did not move."""
    ref = reference_with_skip()

    accelerator = make(FusedAccelerator, fp16=True)
    assert type(accelerator.scaler) is fusedopt.GradScaler
    prepared = prepare(accelerator, fused_adamw(max_grad_norm=CLIP))
    assert prepared[1].scaler is accelerator.scaler
    ours = train(accelerator, prepared, inf_at=INF_AT)
    assert_skipped_at_inf(ours)
    assert accelerator.scaler.get_scale() == SCALE / 2
    good = [i for i in range(STEPS) if i != INF_AT]
    torch.testing.assert_close([ours.grad_norms[i] for i in good],
                               [ref.clip_norms[i] for i in good], rtol=1e-5, atol=0)
    assert_same_params(ours.model, ref.model)

    plain = make(Accelerator, fp16=True)
    prepared = prepare(plain, fused_adamw(max_grad_norm=CLIP))
    assert type(prepared[1]) is AcceleratedOptimizer and type(plain.scaler) is torch.amp.GradScaler
    unseen = train(plain, prepared, inf_at=INF_AT)
    assert [bool(flag) for flag in unseen.step_skipped] == [i == INF_AT for i in range(STEPS)]
    assert all(torch.equal(a, b) for a, b in zip(unseen.before[INF_AT], unseen.after[INF_AT]))
    assert unseen.skipped == [False] * STEPS
    assert unseen.lrs == pytest.approx(lr_schedule(), rel=1e-12)


def test_nonfinite_skip_without_a_scaler_is_reported():
    """No scaler, fusedopt.AdamW(nonfinite="skip"): the inf step is reported skipped (one host
    sync to read the flag, each step), the scheduler waits, the params stay, and the run ends
    where the reference's scaler-skipped run ends (its power-of-2 scale is exact). With
    nonfinite="propagate" and no scaler, a step cannot skip: step_skipped stays None, the
    accelerator reports False, and nothing syncs (the sync counter sees the one above)."""
    ref = reference_with_skip()
    accelerator = make(FusedAccelerator)
    assert accelerator.scaler is None
    prepared = prepare(accelerator, fused_adamw(max_grad_norm=CLIP, nonfinite="skip"))
    ours = train(accelerator, prepared, inf_at=INF_AT)
    assert_skipped_at_inf(ours)
    assert all(n >= 1 for n in ours.syncs)
    assert_same_params(ours.model, ref.model)

    accelerator = make(FusedAccelerator)
    never = train(accelerator, prepare(accelerator, fused_adamw(max_grad_norm=CLIP)))
    assert never.step_skipped == [None] * STEPS and never.skipped == [False] * STEPS
    assert never.syncs == [0] * STEPS


# -- no clip on top of the optimizer's -------------------------------------------------------------

def test_clip_on_top_of_the_optimizers_warns_once_and_clips():
    """accelerator.clip_grad_norm_(params, 0.5) over a fusedopt.AdamW(max_grad_norm=0.3): one
    warning with the fix over 8 steps, and both clips happen as asked: the run equals torch's
    double-clip recipe (clip_grad_norm_ at 0.5, then at 0.3, then torch.optim.AdamW), the
    returned norms equal the first clip's, opt.grad_norm the second's (a norm of clipped
    gradients). An optimizer that does not clip: no warning, and the run is accelerate's. The
    same for clip_grad_value_ over an optimizer with max_grad_value."""
    own = 0.3

    def double_clip(model):
        opt = torch_adamw(model)
        opt.seen = []
        opt.register_step_pre_hook(lambda o, args, kwargs: o.seen.append(
            torch.nn.utils.clip_grad_norm_(model.parameters(), own)))
        return opt
    accelerator = make(Accelerator)
    prepared = prepare(accelerator, double_clip)
    ref = train(accelerator, prepared, clip=CLIP)
    assert sum(float(n) > CLIP for n in ref.clip_norms) >= STEPS - 1  # both clips active
    assert sum(float(n) > own for n in prepared[1].optimizer.seen) >= STEPS - 1

    accelerator = make(FusedAccelerator)
    warned = []
    ours = train(accelerator, prepare(accelerator, fused_adamw(max_grad_norm=own)), clip=CLIP,
                 warned=warned)
    double = [str(w.message) for w in warned if issubclass(w.category, UserWarning)]
    assert len(double) == 1, double
    message = double[0]
    assert "accelerator.clip_grad_norm_(0.5)" in message and "max_grad_norm=0.3" in message
    assert DOUBLE_CLIP_FIX in message and "opt.max_grad_norm = None" in message
    torch.testing.assert_close(ours.clip_norms, ref.clip_norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.grad_norms, prepared[1].optimizer.seen, rtol=1e-5, atol=0)
    assert_same_params(ours.model, ref.model)

    accelerator = make(Accelerator)
    plain = train(accelerator, prepare(accelerator, torch_adamw), clip=CLIP)
    accelerator = make(FusedAccelerator)
    warned = []
    quiet = train(accelerator, prepare(accelerator, fused_adamw()), clip=CLIP, warned=warned)
    assert [w for w in warned if issubclass(w.category, UserWarning)] == []
    assert_same_params(quiet.model, plain.model)

    accelerator = make(FusedAccelerator)
    model, opt, loader, _ = prepare(accelerator, fused_adamw(max_grad_value=1e-3))
    accelerator.backward(model(**next(iter(loader))).loss)
    with pytest.warns(UserWarning, match=r"clip_grad_value_\(0\.01\).*max_grad_value=0\.001.*"
                                         r"Remove the accelerator\.clip_grad_value_ call"):
        accelerator.clip_grad_value_(model.parameters(), 1e-2)
    assert max(float(p.grad.abs().max()) for p in model.parameters()) <= 1e-2


# -- an accelerator made elsewhere -----------------------------------------------------------------

def test_use_fusedopt_after_prepare():
    """use_fusedopt on a plain Accelerator that already prepared a fusedopt optimizer under its
    fp16 scaler: the same accelerator and wrapper objects change class in place, the scaler
    becomes a fusedopt.GradScaler in both, the overflow step is then reported; a second call
    changes nothing. The run equals the reference."""
    accelerator = make(Accelerator, fp16=True)
    prepared = prepare(accelerator, fused_adamw(max_grad_norm=CLIP))
    wrapper, old_scaler = prepared[1], accelerator.scaler
    assert type(wrapper) is AcceleratedOptimizer and wrapper.scaler is old_scaler

    assert use_fusedopt(accelerator) is accelerator
    assert type(accelerator) is FusedAccelerator and isinstance(accelerator, FusedAcceleratorMixin)
    assert type(wrapper) is FusedAcceleratedOptimizer and accelerator._optimizers == [wrapper]
    assert type(accelerator.scaler) is fusedopt.GradScaler and wrapper.scaler is accelerator.scaler
    assert accelerator.scaler.state_dict() == old_scaler.state_dict()
    scaler = accelerator.scaler
    use_fusedopt(accelerator)
    assert type(accelerator) is FusedAccelerator and type(wrapper) is FusedAcceleratedOptimizer
    assert accelerator.scaler is scaler and wrapper.scaler is scaler

    ours = train(accelerator, prepared, inf_at=INF_AT)
    assert_skipped_at_inf(ours)
    assert_same_params(ours.model, reference_with_skip().model)


# -- fusedopt.GradScaler.from_torch ----------------------------------------------------------------

def test_grad_scaler_from_torch():
    """from_torch carries over the device, the settings, the scale reached and the growth
    tracker (state_dict() equal) after a few steps that moved both; a disabled scaler stays
    disabled; between step() and update() it is refused, and works again after update()."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_factor=4.0, backoff_factor=0.25,
                                  growth_interval=3)
    for step in range(5):  # 2 good, an overflow (scale / 4), 2 good: tracker at 2
        opt.zero_grad()
        scaler.scale((w * (float("inf") if step == 2 else 1.0)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.state_dict() == dict(scale=SCALE / 4, growth_factor=4.0, backoff_factor=0.25,
                                       growth_interval=3, _growth_tracker=2)
    fused = fusedopt.GradScaler.from_torch(scaler)
    assert type(fused) is fusedopt.GradScaler and fused.is_enabled()
    assert fused.state_dict() == scaler.state_dict() and fused._device == "cpu"

    off = fusedopt.GradScaler.from_torch(torch.amp.GradScaler("cpu", enabled=False))
    assert type(off) is fusedopt.GradScaler and not off.is_enabled()

    opt.zero_grad()
    scaler.scale(w.sum()).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"between step\(\) and update\(\)"):
        fusedopt.GradScaler.from_torch(scaler)
    scaler.update()
    assert fusedopt.GradScaler.from_torch(scaler).state_dict() == scaler.state_dict()


def test_save_state_and_load_state_resume_bit_for_bit(tmp_path):
    """accelerator.save_state after 4 steps; a fresh FusedAccelerator and optimizer (built with
    another clip, 7.0) load_state it and step on: the uninterrupted run's parameters bit for bit
    (the same ops on the same values; accelerate restores the RNG, so dropout draws the same),
    with the checkpoint's clip (0.5, in the optimizer's param groups) winning, as its lr does."""
    batches = [{"input_ids": x, "labels": x} for x in IDS.split(8)]

    def steps(accelerator, model, opt, schedule, todo):
        for batch in todo:
            accelerator.backward(model(**batch).loss)
            opt.step()
            schedule.step()
            opt.zero_grad()

    def build(clip):
        accelerator = FusedAccelerator(cpu=True)
        model = gpt2()
        opt = fusedopt.AdamW(groups(model), lr=LR, max_grad_norm=clip)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / STEPS)
        return (accelerator, *accelerator.prepare(model, opt, schedule))

    first = build(CLIP)
    torch.manual_seed(1)
    steps(*first, batches[:4])
    first[0].save_state(str(tmp_path / "ckpt"))
    steps(*first, batches[4:])
    resumed = build(7.0)
    resumed[0].load_state(str(tmp_path / "ckpt"))
    assert resumed[2].optimizer.max_grad_norm == CLIP
    steps(*resumed, batches[4:])
    assert first[2].optimizer.grad_norm > CLIP  # the clip was active up to the end
    for a, b in zip(resumed[1].parameters(), first[1].parameters()):
        assert torch.equal(a, b)
