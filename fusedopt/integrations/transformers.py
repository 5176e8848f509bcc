"""The Hugging Face Trainer with fusedopt: one clip, inside the optimizer, and its norm logged.

What goes wrong with ``transformers.Trainer`` and a fusedopt optimizer (transformers 5.24):

- with ``max_grad_norm > 0`` (1.0 by default) the Trainer clips before ``optimizer.step()``, so
  a fusedopt clip set elsewhere is silently overridden by the tighter of the two, and
  ``opt.grad_norm`` measures gradients already clipped;
- with ``max_grad_norm=0`` the Trainer still runs ``clip_grad_norm_(params, inf)`` every step to
  log ``grad_norm``: a norm pass plus a read and write of every gradient;
- a step a GradScaler (or ``nonfinite="skip"``) skips on the device is not reported, so the
  learning-rate scheduler advances on it.

``FusedTrainer`` (or ``FusedTrainerMixin`` in front of a Trainer subclass of yours) does the clip
once, in the optimizer, from ``TrainingArguments.max_grad_norm``; logs ``grad_norm`` from
``opt.grad_norm`` (the pre-clip norm the optimizer's norm pass took: no pass of its own); reports
skipped steps through accelerate (``fusedopt.integrations.accelerate.use_fusedopt``, which also
gives the Trainer's fp16 GradScaler the optimizer's inf check).

The optimizer: one passed in ``optimizers=`` or ``optimizer_cls_and_kwargs=`` must be fusedopt's;
otherwise ``TrainingArguments.optim`` must name a torch.optim class with a fusedopt namesake
("adamw_torch" and "adamw_torch_fused", the default, become fusedopt.AdamW with the same
arguments; "sgd", "adagrad", "rmsprop" likewise), built with the Trainer's usual param groups.

Its clip: ``TrainingArguments.max_grad_norm > 0`` sets the optimizer's ``max_grad_norm`` when it
has none; an optimizer that already clips at another value is refused (ValueError) rather than
guessed between. ``max_grad_norm=0`` leaves the optimizer's clip as it is; an optimizer without
one gets ``max_grad_norm=inf`` so that its norm pass measures the norm the Trainer logs (it never
clips; the norm costs one read of every gradient, where the Trainer's own costs three). A run
resumed from a checkpoint clips as the checkpoint says (the clip is in the optimizer's param
groups, as lr is), and says so when TrainingArguments asks for another.

Relies on these Trainer internals (tested with transformers 5.24.0; checked at import):
``Trainer._clip_grad_norm(model)`` and ``Trainer._get_grad_norm(model, grad_norm)``, which the
training loop calls before ``optimizer.step()`` for the norm it logs (``.item()`` is read only
when logging, after the step); ``create_accelerator_and_postprocess`` (makes
``self.accelerator``); ``create_optimizer``; ``get_optimizer_cls_and_kwargs``;
``_load_optimizer_and_scheduler`` (a resumed checkpoint's optimizer state); the callback event
``on_optimizer_step`` (right after ``optimizer.step()``); and
``accelerator.optimizer_step_was_skipped``, which gates ``lr_scheduler.step()``.
"""
import weakref

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

import fusedopt
from fusedopt.integrations.accelerate import fusedopt_inside, use_fusedopt

__all__ = ["FusedTrainer", "FusedTrainerMixin"]

_INTERNALS = ("_clip_grad_norm", "_get_grad_norm", "create_accelerator_and_postprocess",
              "create_optimizer", "get_optimizer_cls_and_kwargs", "_load_optimizer_and_scheduler")
_missing = [name for name in _INTERNALS if not hasattr(Trainer, name)]
if _missing:
    import transformers
    raise ImportError(
        f"fusedopt.integrations.transformers was written against transformers 5.24, whose Trainer "
        f"has {', '.join(_missing)}; transformers {transformers.__version__} does not. Pass a "
        "fusedopt optimizer to transformers.Trainer with TrainingArguments(max_grad_norm=0) "
        "instead (the Trainer then measures the norm it logs with a pass of its own)")

logger = logging.get_logger(__name__)


class _GradNormFromOptimizer(TrainerCallback):
    """Holds the tensor the Trainer logs as ``grad_norm``: handed out before the step (the Trainer
    asks for the norm then), filled from ``opt.grad_norm`` right after it, on the device."""

    def __init__(self, trainer):
        self.trainer = weakref.ref(trainer)  # the trainer holds this callback
        self.norm = None

    def slot(self, optimizer) -> torch.Tensor:
        if self.norm is None:
            first = next(p for g in optimizer.param_groups for p in g["params"])
            self.norm = torch.full((), float("nan"), device=first.device)
        return self.norm

    def on_optimizer_step(self, args, state, control, **kwargs):
        opt = fusedopt_inside(self.trainer().optimizer)
        if opt is not None and opt.grad_norm is not None and self.norm is not None:
            self.norm.copy_(opt.grad_norm)  # no host sync: .item() comes when the Trainer logs


def _namesake(cls):
    """fusedopt's class of the same name as torch.optim's ``cls``, or None."""
    if not (isinstance(cls, type) and cls.__module__.startswith("torch.optim")):
        return None
    fused = getattr(fusedopt, cls.__name__, None)
    return fused if isinstance(fused, type) and issubclass(fused, cls) else None


class FusedTrainerMixin:
    """Put in front of ``transformers.Trainer`` or a subclass of it (module docstring):
    ``class MyTrainer(FusedTrainerMixin, SFTTrainer)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_norm = _GradNormFromOptimizer(self)
        self.add_callback(self._fused_norm)

    # -- the accelerator: skipped steps reported, fusedopt.GradScaler --------------------------

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        use_fusedopt(self.accelerator)

    # -- the optimizer and its clip ------------------------------------------------------------

    @classmethod
    def get_optimizer_cls_and_kwargs(cls, args, model=None):
        optimizer_cls, kwargs = super().get_optimizer_cls_and_kwargs(args, model)
        fused = _namesake(optimizer_cls)
        if fused is None:
            raise ValueError(
                f"TrainingArguments(optim={getattr(args.optim, 'value', args.optim)!r}) builds "
                f"{optimizer_cls.__module__}.{optimizer_cls.__qualname__}, which has no fusedopt "
                "namesake; FusedTrainer steps a fusedopt optimizer: use optim='adamw_torch' "
                "(or 'sgd', 'adagrad', 'rmsprop'), or pass optimizers=(fusedopt.<Class>(...), None)")
        return fused, kwargs

    def create_optimizer(self, model=None):
        if self.is_deepspeed_enabled:
            raise ValueError(
                "FusedTrainer does not run under DeepSpeed: DeepSpeed's engine owns the optimizer "
                "step and the clip. Use transformers.Trainer there")
        optimizer = super().create_optimizer(model)
        self._take_over_clip(optimizer)
        return optimizer

    def _take_over_clip(self, optimizer) -> None:
        opt = fusedopt_inside(optimizer)
        if opt is None:
            raise TypeError(
                f"FusedTrainer steps a fusedopt optimizer, got {type(optimizer).__module__}."
                f"{type(optimizer).__qualname__}: pass optimizers=(fusedopt.<Class>(...), "
                "scheduler) or leave the optimizer to TrainingArguments.optim, or use "
                "transformers.Trainer")
        asked = self.args.max_grad_norm
        if asked is not None and asked > 0:
            if opt.max_grad_norm is None:
                opt.max_grad_norm = float(asked)
                logger.info(f"fusedopt.{type(opt).__name__} clips to TrainingArguments."
                            f"max_grad_norm={asked} inside its step; the Trainer does not clip")
            elif opt.max_grad_norm != asked:
                raise ValueError(
                    f"TrainingArguments(max_grad_norm={asked}) and fusedopt."
                    f"{type(opt).__name__}(max_grad_norm={opt.max_grad_norm}) ask for two clips "
                    "(1.0 is TrainingArguments' default). FusedTrainer clips once, in the "
                    f"optimizer: set TrainingArguments(max_grad_norm={opt.max_grad_norm}), or "
                    "max_grad_norm=0 to keep the optimizer's")
        elif opt.max_grad_norm is None:
            opt.max_grad_norm = float("inf")  # measure the norm the Trainer logs; never clips

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        opt = fusedopt_inside(self.optimizer)
        asked = self.args.max_grad_norm
        if checkpoint is not None and opt is not None and asked is not None and asked > 0 \
                and opt.max_grad_norm != asked:
            logger.warning(
                f"Resumed from {checkpoint}: fusedopt.{type(opt).__name__} clips at the "
                f"checkpoint's max_grad_norm={opt.max_grad_norm}, as it takes the checkpoint's lr; "
                f"TrainingArguments(max_grad_norm={asked}) is not used. To change it, set "
                "trainer.optimizer.optimizer.max_grad_norm after the resume (a callback's "
                "on_train_begin)")

    # -- the norm the Trainer logs: the optimizer's ----------------------------------------------

    def _clip_grad_norm(self, model):
        """No clip here: the optimizer clips inside step(). The norm is filled in after it."""
        return self._fused_norm.slot(self.optimizer)

    def _get_grad_norm(self, model, grad_norm=None):
        return self._fused_norm.slot(self.optimizer) if grad_norm is None else grad_norm


class FusedTrainer(FusedTrainerMixin, Trainer):
    """``transformers.Trainer`` (the same arguments) stepping a fusedopt optimizer that does the
    clip (module docstring)."""
