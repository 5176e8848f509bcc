"""A framework about to clip on top of fusedopt's own clip, found at a clipping optimizer's first
step, and named in a warning with the fix (the tighter limit would win silently, and
``opt.grad_norm`` would measure gradients already clipped).

Reads only ``sys.modules`` (imports no framework) and the caller's stack frames, once per
optimizer: the Hugging Face Trainer clips to ``TrainingArguments.max_grad_norm`` (1.0 by default)
before it calls ``optimizer.step()``; Lightning clips to ``Trainer(gradient_clip_val=...)`` in
the closure the step runs (in fp32: under mixed precision Lightning refuses the clip itself).
A frame's ``self`` of one of their classes gives the trainer and its settings.
"""
import sys
import warnings

_DEPTH = 64  # frames searched above step(): Lightning's loop sits ~15 below the user's fit()


def _hf_trainer(obj):
    module = sys.modules.get("transformers.trainer")
    if module is None or not isinstance(obj, module.Trainer):
        return None
    mixin = sys.modules.get("fusedopt.integrations.transformers")
    return None if mixin is not None and isinstance(obj, mixin.FusedTrainerMixin) else obj


def _lightning_trainer(obj):
    module = sys.modules.get("lightning.pytorch")
    if module is None or not type(obj).__module__.startswith("lightning.pytorch"):
        return None
    trainer = obj if isinstance(obj, module.Trainer) else getattr(obj, "__dict__", {}).get("trainer")
    return trainer if isinstance(trainer, module.Trainer) else None


def framework_clip(name: str, max_norm, max_value) -> str | None:
    """The warning for a framework found clipping in the calling stack, or None."""
    if "transformers.trainer" not in sys.modules and "lightning.pytorch" not in sys.modules:
        return None
    frame = sys._getframe(1)
    for _ in range(_DEPTH):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        trainer = _hf_trainer(obj)
        if trainer is not None:
            limit = trainer.args.max_grad_norm
            if limit is None or limit <= 0:
                return None
            return (f"transformers.Trainer clips the gradients to TrainingArguments.max_grad_norm="
                    f"{limit} (its default is 1.0) before fusedopt.{name}.step(), which clips "
                    f"them again (max_grad_norm={max_norm}, max_grad_value={max_value}): the "
                    "tighter limit wins, and opt.grad_norm measures gradients already clipped. "
                    "Use fusedopt.integrations.transformers.FusedTrainer (one clip, in the "
                    "optimizer; it logs the optimizer's norm), or TrainingArguments(max_grad_norm=0)")
        trainer = _lightning_trainer(obj)
        if trainer is not None:
            limit = trainer.gradient_clip_val
            if not limit or limit <= 0:
                return None
            return (f"Lightning's Trainer(gradient_clip_val={limit}) clips the gradients inside "
                    f"fusedopt.{name}.step(), before its own clip (max_grad_norm={max_norm}, "
                    f"max_grad_value={max_value}): the tighter limit wins, and opt.grad_norm "
                    "measures gradients already clipped. Add "
                    "fusedopt.integrations.lightning.FusedOptCallback() to the Trainer's "
                    "callbacks (it moves the clip into the optimizer), or remove gradient_clip_val")
        frame = frame.f_back
    return None


def warn_if_clipped_on_top(opt) -> None:
    settings = opt._clip
    message = framework_clip(type(opt).__name__, settings.max_norm, settings.max_value)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=4)
