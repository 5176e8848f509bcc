"""What a step does about scaled and non-finite gradients: the ``nonfinite`` policy and AMP.

One ``StepGuard`` per step says whether the gradients arrive multiplied by a GradScaler's scale
(the step divides them by it), whether a GradScaler already found an inf/NaN (``found_in``: the
update is skipped on the device), and whether the step must look for inf/NaN itself
(``detect``: the ``nonfinite='skip'``/``'raise'`` policies, and fusedopt.GradScaler). A skipped
step leaves parameters, optimizer state and step counters as they were, decided on the device:
no host sync, except for ``'raise'``, which must read the flag to raise.

The torch-path helpers live here; the Triton twins are kernels/norm.py (detection, in the norm
pass) and kernels/_common.launch_scalars (the skip, in every update launch).
"""
import torch

from fusedopt._distributed import local
from fusedopt._grouping import group_by_device_dtype, pick

POLICIES = ("propagate", "skip", "raise")


def check_policy(nonfinite) -> str:
    if nonfinite not in POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r} is not a policy: use one of {POLICIES} "
                         "('propagate', torch.optim's behaviour, is the default)")
    return nonfinite


class StepGuard:
    """This step's AMP scale, GradScaler's found-inf flag and whether to detect inf/NaN.

    ``scale``: a 1-element fp32 tensor that multiplied the loss (grads are divided by it), or
    None. ``found_in``: a GradScaler's fp32 flag (non-zero: skip the update), or None.
    ``detect``: look for inf/NaN in the grads and skip the update if any. ``policy``: 'raise'
    makes the step raise FloatingPointError after a skipped update (never under a GradScaler,
    whose overflow steps are expected).
    """

    def __init__(self, scale=None, found_in=None, detect=False, policy="propagate"):
        self.scale, self.found_in, self.detect, self.policy = scale, found_in, detect, policy

    @classmethod
    def for_step(cls, opt) -> "StepGuard":
        """From what a GradScaler set on the optimizer for this call, else from its policy.

        torch.amp.GradScaler.step sets ``grad_scale`` (None after a manual ``unscale_``) and
        ``found_inf`` for the duration of the call (its ``_step_supports_amp_scaling``
        protocol); fusedopt.GradScaler sets ``_amp_scale`` and lets the norm pass find infs.
        """
        own = opt.__dict__
        if own.get("_amp_scale") is not None:
            return cls(scale=own["_amp_scale"], detect=True)
        if "found_inf" in own:
            return cls(scale=own.get("grad_scale"), found_in=own["found_inf"])
        return cls(detect=opt.nonfinite != "propagate", policy=opt.nonfinite)

    @property
    def active(self) -> bool:
        return self.scale is not None or self.found_in is not None or self.detect

    @property
    def skips(self) -> bool:
        """Whether this step's update may be skipped on the device."""
        return self.found_in is not None or self.detect

    def inv_scale(self, device: torch.device) -> torch.Tensor:
        """1 / scale as GradScaler.unscale_ forms it (in fp64, rounded to fp32), or 1."""
        if self.scale is None:
            return torch.ones((), dtype=torch.float32, device=device)
        return self.scale.double().reciprocal().float().reshape(()).to(device)

    def combine(self, found: torch.Tensor) -> torch.Tensor:
        """``found`` or GradScaler's own flag, as 0.0 / 1.0 (torch's fused ops skip only on 1.0)."""
        if self.found_in is None:
            return found
        outside = (self.found_in.to(found.device).reshape(()) != 0).float()
        return torch.maximum(found, outside)


def unscale_and_check_(grads: list[torch.Tensor], guard: StepGuard, device: torch.device):
    """The torch path's unscale + inf/NaN check, in place on ``grads`` (GradScaler.unscale_'s
    own op); returns this step's skip flag, an fp32 0-dim tensor on ``device`` (0.0 or 1.0), or
    None when nothing can skip."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    if guard.scale is not None or guard.detect:
        inv_scales = {}  # one per device, not per (device, dtype) group: three small ops each
        for (dev, _), idx in group_by_device_dtype(grads).items():
            if dev not in inv_scales:
                inv_scales[dev] = guard.inv_scale(dev)
            here = torch.zeros((), dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(pick(grads, idx), here,
                                                             inv_scales[dev])
            found = torch.maximum(found, here.to(device, non_blocking=True))
    return guard.combine(found) if guard.skips else None


def keep_where(skip, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new``, or ``old`` where the step is skipped (``skip``: the 0-dim flag, or None): the
    rule paths' skip without a host branch."""
    if skip is None:
        return new
    return torch.where(skip.to(new.device) != 0, old.to(new.dtype), new)


def culprit(opt) -> str:
    """Where the first inf/NaN gradient is, for the 'raise' policy's message (reads every grad:
    only after a step found one)."""
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            g = local(p.grad)  # this rank's shard of a DTensor's: no collective
            if g is not None and not bool(torch.isfinite(g).all()):
                kinds = [k for k, bad in (("NaN", g.isnan().any()), ("inf", g.isinf().any()))
                         if bool(bad)]
                return f" ({' and '.join(kinds)} in group {gi}, parameter {pi}, shape {tuple(p.shape)})"
    return ""


def raise_nonfinite(opt, where: str) -> None:
    """The 'raise' policy, after a step that found inf/NaN and so changed nothing."""
    raise FloatingPointError(
        f"fusedopt.{type(opt).__name__}: non-finite gradient{where}; nonfinite='raise' skipped "
        "the step, so parameters, state and step counters are unchanged")
