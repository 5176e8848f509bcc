"""PyTorch Lightning with fusedopt: the clip moves into the optimizer, the norm is logged from it,
the GradScaler's inf check joins the norm pass, and a skipped step holds the LR scheduler.
Tests: tests/test_integration_lightning.py.

What goes wrong without it (lightning 2.6.6):

- ``Trainer(gradient_clip_val=...)`` clips with ``clip_grad_norm_`` in front of the optimizer (a
  second clip when the fusedopt optimizer clips too) and, under any mixed precision, refuses:
  ``MixedPrecision.clip_gradients`` raises "does not allow for gradient clipping because it
  performs unscaling of gradients internally" for every optimizer that unscales inside its step.
- under fp16 the gradients that ``on_before_optimizer_step`` sees are still multiplied by the
  scale (65536 at the start, Lightning's default): Lightning unscales only the optimizers that do
  not do it themselves, and fusedopt's do.
- the scaler Lightning makes is a ``torch.amp.GradScaler``, which reads every gradient once more
  for infs; ``fusedopt.GradScaler`` takes them from the optimizer's norm pass.
- Lightning steps LR schedulers after a step the GradScaler skipped, for any optimizer.

``FusedOptCallback`` fixes the first three, ``SkipAwareScheduling`` (a LightningModule mixin)
the last. The unified ``lightning`` package only (``lightning.pytorch``, not the older
``pytorch_lightning``, whose Trainer refuses another package's callbacks). ``import fusedopt``
never imports this module.

Relies on these Lightning internals (tested with lightning 2.6.6):

- ``trainer.gradient_clip_val`` / ``trainer.gradient_clip_algorithm``: plain attributes that
  ``Precision._after_closure`` reads at every step and passes to ``configure_gradient_clipping``;
  None there means no clip, and no refusal under AMP.
- ``trainer.precision_plugin.scaler``: where ``MixedPrecision`` keeps its GradScaler and reads it
  at every backward and step; ``MixedPrecision.state_dict`` is the scaler's, so checkpoints work
  the same with ``fusedopt.GradScaler`` (a subclass).
- the order in ``Trainer._run``: ``trainer.optimizers`` exist from ``on_fit_start`` on (not in
  ``setup``), and a checkpoint (``ckpt_path=``) is restored after ``on_fit_start`` and before
  ``on_train_start``.
- ``Precision._after_closure``: callbacks' ``on_before_optimizer_step`` run before the
  LightningModule's, then ``configure_gradient_clipping``; ``MixedPrecision.optimizer_step`` does
  not ``unscale_`` an optimizer with ``_step_supports_amp_scaling``.
- ``TrainingEpochLoop._update_learning_rates``: step-interval schedulers are stepped through
  ``LightningModule.lr_scheduler_step`` right after the batch's optimizer step;
  ``trainer.lr_scheduler_configs`` says each scheduler's interval.
"""
import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from fusedopt.amp import GradScaler
from fusedopt.optimizer import ClippedStep

__all__ = ["FusedOptCallback", "SkipAwareScheduling", "last_step_skipped"]


def _fused(trainer: "pl.Trainer") -> list[tuple[int, ClippedStep]]:
    """The fusedopt optimizers of the trainer, with their index in ``trainer.optimizers``."""
    return [(i, opt) for i, opt in enumerate(trainer.optimizers) if isinstance(opt, ClippedStep)]


class FusedOptCallback(pl.Callback):
    """Makes the fused recipe the easy one in a Lightning Trainer (module docstring: what goes
    wrong without it). Everything is decided in ``on_train_start``, after a checkpoint given as
    ``ckpt_path=`` is restored (Lightning restores it after ``on_fit_start``), so the clip settings
    compared below are the ones the optimizer will step with.

    1. ``Trainer(gradient_clip_val=v)`` becomes the fusedopt optimizer's own clip: algorithm
       "norm" sets ``max_grad_norm=v``, "value" sets ``max_grad_value=v``. An optimizer without
       that setting (None, or ``max_grad_norm=inf``, which clips nothing) takes v, and says so; one
       that holds v already is fine; one that holds another value raises ValueError. Then
       ``trainer.gradient_clip_val`` is None for the rest of the fit, so Lightning neither clips a
       second time nor refuses under AMP; ``on_fit_end`` puts v back (a later ``fit`` on the same
       Trainer makes new optimizers, which take it again). Lightning clips the L2 norm, so an
       optimizer with ``norm_type=inf`` is refused too. A non-fusedopt optimizer beside a fusedopt
       one is refused when clipping: fusedopt's clip covers only its own parameters, where
       Lightning's covered every optimizer's. (Lightning 2.6 cannot get there: several optimizers
       need manual optimization, which refuses ``gradient_clip_val``.) Only torch.optim
       optimizers: the callback leaves the clip to Lightning and warns that it does nothing.
       A LightningModule that overrides ``configure_gradient_clipping`` is warned: the override
       still runs, now with ``gradient_clip_val=None``; a clip it does itself comes on top.

    2. ``log_grad_norm=True``: after each optimizer step, ``opt.grad_norm`` (the pre-clip total
       norm the optimizer's own norm pass computed) is logged through ``pl_module.log`` as
       "grad_norm", or "grad_norm/<i>" (i: the index in ``trainer.optimizers``) when there are
       several fusedopt optimizers. No host sync here (the 0-dim tensor is passed; Lightning syncs
       when a logger writes it) and no extra pass over the gradients. A new step is recognised by
       a new ``grad_norm`` tensor (each step makes one), so batches that only accumulate log
       nothing; in manual optimization, one optimizer stepped twice in a batch logs the last.
       An optimizer that does not clip by norm gets ``max_grad_norm=float('inf')``: it then takes
       the norm in its norm pass (one read of every gradient, already paid under
       ``fusedopt.GradScaler``, whose inf check is that pass) and never clips. With
       ``max_grad_value`` set, the norm is of the value-clamped gradients (the clamp comes first).
       The inf is kept in the param groups, so checkpoints carry it.

    3. ``fused_scaler=True``: a ``torch.amp.GradScaler`` (exactly that type: not FSDP's sharded
       one, nor a subclass you chose) in ``trainer.precision_plugin.scaler`` is replaced with
       ``fusedopt.GradScaler.from_torch(scaler)``: the same settings and current scale, the same
       state_dict in checkpoints, one pass less over the gradients per step.

    4. ``unscale_before_hooks=False``. Under fp16 with a GradScaler the gradients that
       ``on_before_optimizer_step`` sees are multiplied by ``scaler.get_scale()``: a fusedopt
       optimizer divides by the scale inside its step. With True, this callback's
       ``on_before_optimizer_step`` calls ``scaler.unscale_(optimizer)`` first, so the
       LightningModule's hook (called after the callbacks') and the callbacks listed after this
       one see the true gradients. Cost: one read and write of every gradient, and the step then
       takes the scaler's found-inf flag instead of finding infs in its norm pass (torch's
       GradScaler protocol; ``fusedopt.GradScaler`` follows it). Nothing is unscaled when no
       parameter of the optimizer has a gradient (``training_step`` returned None: Lightning then
       calls neither ``scaler.step`` nor ``update``, and a second ``unscale_`` before the next
       ``update`` would raise).

    Keyword-only options, defaults as above.
    """

    def __init__(self, *, log_grad_norm: bool = False, fused_scaler: bool = True,
                 unscale_before_hooks: bool = False) -> None:
        super().__init__()
        self.log_grad_norm = log_grad_norm
        self.fused_scaler = fused_scaler
        self.unscale_before_hooks = unscale_before_hooks
        self._taken = None  # the Trainer's gradient_clip_val this fit took, put back at its end
        self._logged: dict[int, torch.Tensor] = {}  # optimizer index -> last grad_norm logged

    # -- fit start: clip, norm, scaler ---------------------------------------------------------

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        fused = _fused(trainer)
        if not fused:
            names = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            rank_zero_warn("FusedOptCallback: none of trainer.optimizers is a fusedopt one "
                           f"({names}); the callback does nothing")
            return
        self._take_clip(trainer, fused)
        if is_overridden("configure_gradient_clipping", pl_module):
            rank_zero_warn(
                f"{type(pl_module).__name__}.configure_gradient_clipping still runs before each "
                "step, now with gradient_clip_val=None: the fusedopt optimizer clips inside its "
                "step, and a clip done in that hook comes on top of it (under AMP, Lightning's "
                "clip_gradients refuses). Set the clip on the optimizer (max_grad_norm=, "
                "max_grad_value=) or in Trainer(gradient_clip_val=) instead")
        if self.log_grad_norm:
            for _, opt in fused:
                if opt.max_grad_norm is None:
                    opt.max_grad_norm = math.inf  # the norm pass runs and never clips
        # a grad_norm from before this fit (an optimizer reused) is not this fit's first step's
        self._logged = {i: opt.grad_norm for i, opt in fused}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.fused_scaler and type(scaler) is torch.amp.GradScaler:
            trainer.precision_plugin.scaler = GradScaler.from_torch(scaler)

    def _take_clip(self, trainer: "pl.Trainer", fused) -> None:
        value = trainer.gradient_clip_val
        if value is None or value <= 0:  # Lightning's own test: no clip
            return
        others = [type(o).__name__ for o in trainer.optimizers if not isinstance(o, ClippedStep)]
        if others:
            raise ValueError(
                f"Trainer(gradient_clip_val={value!r}) with FusedOptCallback: Lightning would clip "
                f"the parameters of every optimizer, but {', '.join(others)} is not a fusedopt "
                "optimizer and fusedopt's clip covers only its own optimizer's parameters. Use "
                "fusedopt optimizers throughout, or drop gradient_clip_val and set max_grad_norm "
                "on each fusedopt optimizer (and clip the others yourself)")
        by_value = trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE
        key = "max_grad_value" if by_value else "max_grad_norm"
        algorithm = "value" if by_value else "norm"
        for i, opt in fused:
            name = f"trainer.optimizers[{i}] ({type(opt).__name__})"
            held = getattr(opt, key)
            if not by_value and opt.norm_type != 2.0:
                raise ValueError(
                    f"Trainer(gradient_clip_val={value!r}, gradient_clip_algorithm='norm') clips "
                    f"the L2 norm, but {name} has norm_type={opt.norm_type!r}. Drop "
                    f"gradient_clip_val and let the optimizer clip ({key}=...), or use "
                    "norm_type=2.0")
            if held is None or (not by_value and held == math.inf):  # inf: measures, never clips
                setattr(opt, key, float(value))
                rank_zero_info(
                    f"FusedOptCallback: {name} clips now, inside its step: {key}={float(value)!r} "
                    f"from Trainer(gradient_clip_val={value!r}, gradient_clip_algorithm="
                    f"'{algorithm}'); Lightning's own clip is off for this fit")
            elif held != value:
                raise ValueError(
                    f"Trainer(gradient_clip_val={value!r}, gradient_clip_algorithm='{algorithm}') "
                    f"and {name} with {key}={held!r} ask for two different clips (the optimizer's "
                    "comes from its constructor, an assignment, or the checkpoint being resumed). "
                    f"Keep one: drop gradient_clip_val from the Trainer, or set {key}={value!r} on "
                    "the optimizer (or construct it with None)")
        self._taken = value
        trainer.gradient_clip_val = None  # read by Precision._after_closure at every step

    def _give_back(self, trainer: "pl.Trainer") -> None:
        if self._taken is not None:
            trainer.gradient_clip_val, self._taken = self._taken, None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._give_back(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        self._give_back(trainer)

    # -- every step ----------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer) -> None:
        if not self.unscale_before_hooks or not isinstance(optimizer, ClippedStep):
            return  # Lightning unscaled any other optimizer already
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        if any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
            scaler.unscale_(optimizer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs, batch, batch_idx: int) -> None:
        if not self.log_grad_norm:
            return
        fused = _fused(trainer)
        for i, opt in fused:
            norm = opt.grad_norm
            if norm is None or norm is self._logged.get(i):  # no step since the last log
                continue
            self._logged[i] = norm  # held, so that `is` never meets a recycled id
            key = "grad_norm" if len(fused) == 1 else f"grad_norm/{i}"
            pl_module.log(key, norm, on_step=True, on_epoch=False)  # a tensor: no sync here


def last_step_skipped(trainer: "pl.Trainer", scheduler) -> bool:
    """Whether the optimizer step just taken was skipped, for a step-interval ``scheduler``: its
    own optimizer (``scheduler.optimizer``) when that is a fusedopt one, else any fusedopt
    optimizer of the trainer when the scheduler names none. False for schedulers with another
    interval (an epoch-interval scheduler counts epochs, not steps) and for optimizers whose step
    could not skip (``step_skipped`` None: no GradScaler, ``nonfinite="propagate"``). Reads the
    device flag: one host sync per flag read."""
    config = next((c for c in trainer.lr_scheduler_configs if c.scheduler is scheduler), None)
    if config is not None and config.interval != "step":
        return False
    own = getattr(scheduler, "optimizer", None)
    optimizers = [own] if own is not None else trainer.optimizers
    return any(bool(opt.step_skipped) for opt in optimizers
               if isinstance(opt, ClippedStep) and opt.step_skipped is not None)


class SkipAwareScheduling:
    """LightningModule mixin: a step-interval LR scheduler does not step after an optimizer step
    that was skipped (a GradScaler found inf/NaN, or ``nonfinite="skip"``), so the schedule
    counts the updates that happened, as ``accelerate`` does. Lightning has no notion of skipped
    steps and steps the scheduler anyway. Put it first::

        class Model(SkipAwareScheduling, pl.LightningModule): ...

    Cost: one host sync per scheduler step (``last_step_skipped`` reads the device flag). Only
    fusedopt optimizers report a skip; a torch.optim optimizer's schedulers step as before. A
    module that overrides ``lr_scheduler_step`` itself must call ``super().lr_scheduler_step``.
    The one-line equivalent, for a module with step-interval schedulers only::

        def lr_scheduler_step(self, scheduler, metric):
            if not scheduler.optimizer.step_skipped:  # None, or a 0-dim flag (bool() syncs)
                super().lr_scheduler_step(scheduler, metric)
    """

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not last_step_skipped(self.trainer, scheduler):
            super().lr_scheduler_step(scheduler, metric)
