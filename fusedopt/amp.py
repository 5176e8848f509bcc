"""fusedopt.GradScaler: torch.amp.GradScaler whose step() lets a fusedopt optimizer's norm pass
find the infs, so that unscale + inf check + clip + update read each gradient twice in all.

With torch.amp.GradScaler, ``scaler.step(opt)`` on a fusedopt optimizer already skips the
scaler's unscale (the optimizer divides by the scale inside its update), but the scaler still
reads every gradient once more to look for infs before the step. This scaler hands the optimizer
its scale and takes the found-inf flag from the step instead: for fp32 AdamW with clipping that is
32 bytes per parameter (norm pass: g; update: g, p, m, v read, p, m, v written) against the torch
recipe's 48 (unscale_: g read + written; clip_grad_norm_: g read, then read + written; fused
AdamW: 28).

Everything else is torch.amp.GradScaler's: scale(), update(), unscale_() (after which step()
takes torch's path), state_dict(), and step() for any other optimizer.
"""
import torch
from torch.amp.grad_scaler import OptState

from fusedopt.optimizer import ClippedStep


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler (same arguments) whose ``step(opt)`` on a fusedopt optimizer takes the
    inf check from the optimizer's norm pass instead of a pass of its own (module docstring)."""

    @classmethod
    def from_torch(cls, scaler: torch.amp.GradScaler) -> "GradScaler":
        """This scaler in place of ``scaler`` (a torch.amp.GradScaler a framework made): the same
        device, settings, current scale and growth tracker; refused between a step and its
        update(), where the scaler holds per-optimizer state of the step in flight."""
        if not scaler.is_enabled():  # a disabled scaler keeps no settings
            return cls(scaler._device, enabled=False)
        if any(s["stage"] is not OptState.READY for s in scaler._per_optimizer_states.values()):
            raise RuntimeError(
                "fusedopt.GradScaler.from_torch: the scaler is between step() and update(); "
                "convert it before training starts or right after update()")
        new = cls(scaler._device, init_scale=scaler._init_scale,
                  growth_factor=scaler._growth_factor, backoff_factor=scaler._backoff_factor,
                  growth_interval=scaler._growth_interval)
        new.load_state_dict(scaler.state_dict())  # mid-training: the scale reached so far
        return new

    def step(self, optimizer, *args, **kwargs):
        if not self._enabled or not isinstance(optimizer, ClippedStep):
            return super().step(optimizer, *args, **kwargs)
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:  # unscale_() already checked: torch's protocol
            return super().step(optimizer, *args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        optimizer._amp_scale = self._scale
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            del optimizer._amp_scale
        found = optimizer.step_skipped
        if found is None:  # no parameter had a gradient: nothing was found
            found = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        state["found_inf_per_device"] = {found.device: found.reshape(1)}
        state["stage"] = OptState.STEPPED
        return retval
