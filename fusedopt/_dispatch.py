"""The one place that decides which backend runs a step: "torch" or "triton".

No environment variable and no module global changes the answer: only the tensors and the
``backend=`` argument do. Where the user asks for something that cannot run, the error says why.
"""
import torch

BACKENDS = ("torch", "triton")

# Device types with torch fused optimizer kernels (torch._fused_sgd_/_fused_adam_/_fused_adamw_),
# which the torch path calls: torch.optim.optimizer._get_fused_kernels_supported_devices().
_TORCH_FUSED_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", torch._C._get_privateuse1_backend_name())


def check_backend(backend) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of None, 'torch', 'triton'")
    return backend


def triton_unavailable_reason(devices) -> str:
    """Why the Triton backend cannot run on ``devices``."""
    # The kernels (fusedopt.kernels) arrive with the kernel work; until then nothing can run them.
    return "this fusedopt build has no Triton kernels yet (fusedopt.kernels is empty)"


def choose_backend(requested: str | None, devices: set[torch.device]) -> str:
    """The backend for one step over parameters on ``devices``."""
    if requested == "triton":
        raise RuntimeError(f"backend='triton' cannot run: {triton_unavailable_reason(devices)}; "
                           "use backend='torch' or backend=None")
    unsupported = sorted({d.type for d in devices} - set(_TORCH_FUSED_DEVICE_TYPES))
    if unsupported:
        raise RuntimeError(
            f"fusedopt's torch path runs on torch's fused optimizer kernels, which do not exist for "
            f"device type(s) {unsupported}; supported: {list(_TORCH_FUSED_DEVICE_TYPES)}")
    return "torch"
