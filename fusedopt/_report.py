"""What a step actually ran (``opt.last_step``): ``backend=`` is what was asked, this is what
happened, and why any tensor took the torch path."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class StepReport:
    """The last step of an optimizer: which backend updated its parameters, how many tensors the
    Triton kernels updated and how many the torch path did, and why those did: ``why_torch`` holds
    (reason, tensors) pairs, e.g. ``(("torch.float64 (kernels take ...)", 2),)``, or the one
    reason the whole step took the torch path ("backend='torch' was asked", the parameters are on
    the CPU, triton cannot be imported, ...)."""

    backend: str  # "triton" or "torch"
    kernel_tensors: int
    torch_tensors: int
    why_torch: tuple = ()

    def __str__(self) -> str:
        if self.backend == "torch":
            why = "; ".join(reason for reason, _ in self.why_torch)
            return f"torch path, {_tensors(self.torch_tensors)}" + (f" ({why})" if why else "")
        text = f"triton, {_tensors(self.kernel_tensors)} in the kernels"
        if self.torch_tensors:
            why = "; ".join(f"{n}: {reason}" for reason, n in self.why_torch)
            text += f", {self.torch_tensors} on the torch path ({why})"
        return text


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")
