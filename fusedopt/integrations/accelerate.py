"""accelerate with fusedopt: skipped steps reported, one inf check, no clip on top of the optimizer's.

What goes wrong without it (accelerate 1.15):

- ``AcceleratedOptimizer`` decides that a step was skipped by whether ``GradScaler.step`` called
  ``optimizer.step``. A fusedopt optimizer (like torch's fused ones) is always called and skips
  on the device, so ``accelerator.optimizer_step_was_skipped`` stays False and a prepared
  scheduler (``AcceleratedScheduler`` steps only when no optimizer skipped) advances on an
  overflow step. The same holds for ``nonfinite="skip"``, which accelerate cannot see at all.
- the scaler accelerate makes reads every gradient once more for infs; ``fusedopt.GradScaler``
  takes them from the optimizer's norm pass.
- ``accelerator.clip_grad_norm_`` before ``step()`` clips in front of the optimizer's own clip.

``FusedAccelerator`` (the same arguments as ``Accelerator``) or ``use_fusedopt(accelerator)`` (for
an accelerator made elsewhere, as the Hugging Face Trainer makes its own) fixes all three:

- a prepared fusedopt optimizer reports ``step_was_skipped`` from its ``step_skipped`` flag (one
  host sync when read, under a GradScaler or ``nonfinite="skip"``; none otherwise);
- a ``torch.amp.GradScaler`` becomes ``fusedopt.GradScaler.from_torch`` of it;
- ``clip_grad_norm_`` / ``clip_grad_value_`` over parameters of a fusedopt optimizer that clips
  warn (once per optimizer) with the fix, then do what they were asked.

Relies on these accelerate internals (tested with accelerate 1.15.0): ``Accelerator.scaler``,
``Accelerator._optimizers`` (the prepared optimizers) and ``prepare_optimizer`` (which makes
them), ``AcceleratedOptimizer.optimizer`` and ``.scaler``, and the ``step_was_skipped`` property
that ``Accelerator.optimizer_step_was_skipped`` and ``AcceleratedScheduler.step`` read.
"""
import warnings

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from fusedopt.amp import GradScaler
from fusedopt.optimizer import ClippedStep

__all__ = ["FusedAccelerator", "FusedAcceleratedOptimizer", "use_fusedopt"]


def fusedopt_inside(optimizer):
    """The fusedopt optimizer under accelerate's wrappers, or None."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, ClippedStep) else None


class FusedAcceleratedOptimizer(AcceleratedOptimizer):
    """accelerate's wrapper of a fusedopt optimizer: the same, but ``step_was_skipped`` is the
    optimizer's own skip flag, which a GradScaler (or ``nonfinite="skip"``) sets on the device
    without keeping ``step()`` from running."""

    @property
    def step_was_skipped(self) -> bool:
        flag = fusedopt_inside(self).step_skipped
        if flag is None:  # this step could not skip: no scaler, nonfinite="propagate"
            return self._is_overflow
        return bool(flag)  # a host sync, as a GradScaler's own skip decision


class FusedAcceleratorMixin:
    """What ``use_fusedopt`` adds to an Accelerator class (module docstring)."""

    def prepare_optimizer(self, optimizer, device_placement=None):
        self._use_fused_scaler()  # a scaler set on the accelerator after it was made
        return _wrap(super().prepare_optimizer(optimizer, device_placement=device_placement))

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        self._warn_double_clip(parameters, "clip_grad_norm_", "max_grad_norm", max_norm)
        return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters, clip_value):
        parameters = list(parameters)
        self._warn_double_clip(parameters, "clip_grad_value_", "max_grad_value", clip_value)
        return super().clip_grad_value_(parameters, clip_value)

    def _warn_double_clip(self, parameters, call, key, limit) -> None:
        ids = {id(p) for p in parameters}
        for wrapper in self._optimizers:
            opt = fusedopt_inside(wrapper)
            if opt is None or getattr(opt, key) is None or opt.__dict__.get("_warned_double_clip"):
                continue
            if any(id(p) in ids for g in opt.param_groups for p in g["params"]):
                opt._warned_double_clip = True
                warnings.warn(
                    f"accelerator.{call}({limit}) clips the gradients of a fusedopt."
                    f"{type(opt).__name__} whose step() clips them too ({key}="
                    f"{getattr(opt, key)}): the tighter limit wins, the extra clip reads and "
                    "writes every gradient, and opt.grad_norm then measures gradients already "
                    f"clipped. Remove the accelerator.{call} call and let the optimizer clip "
                    "(opt.grad_norm holds the pre-clip norm after step()), or set "
                    f"opt.{key} = None to keep only this clip.", UserWarning, stacklevel=3)

    def _use_fused_scaler(self) -> None:
        """accelerate's torch.amp.GradScaler becomes a fusedopt.GradScaler (the same scale and
        settings), in the accelerator and in the optimizers it already prepared. Other scalers
        (FSDP1's ShardedGradScaler, XLA's, a scaler subclass of someone else's) are kept."""
        old = self.scaler
        if type(old) is not torch.amp.GradScaler:
            return
        self.scaler = GradScaler.from_torch(old)
        for wrapper in self._optimizers:
            if wrapper.scaler is old:
                wrapper.scaler = self.scaler


class FusedAccelerator(FusedAcceleratorMixin, Accelerator):
    """``accelerate.Accelerator`` (the same arguments) for fusedopt optimizers (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._use_fused_scaler()


_FUSED_CLASSES = {Accelerator: FusedAccelerator}


def _wrap(prepared):
    """A prepared fusedopt optimizer's wrapper made a FusedAcceleratedOptimizer (the same object:
    accelerate and the caller keep their references); anything else as it is."""
    if type(prepared) is AcceleratedOptimizer and fusedopt_inside(prepared) is not None:
        prepared.__class__ = FusedAcceleratedOptimizer
    return prepared


def use_fusedopt(accelerator: Accelerator) -> Accelerator:
    """Make an existing accelerator a fusedopt one, in place (module docstring): its class gains
    FusedAcceleratorMixin, its torch.amp.GradScaler becomes a fusedopt.GradScaler, and the
    fusedopt optimizers it already prepared report their skips. Returns the accelerator."""
    cls = type(accelerator)
    if not issubclass(cls, FusedAcceleratorMixin):
        if cls not in _FUSED_CLASSES:
            _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedAcceleratorMixin, cls), {})
        accelerator.__class__ = _FUSED_CLASSES[cls]
    accelerator._use_fused_scaler()
    for wrapper in accelerator._optimizers:
        _wrap(wrapper)
    return accelerator
