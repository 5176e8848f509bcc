"""The one place that decides which backend runs a step: "torch" or "triton".

Only the tensors' devices and the ``backend=`` argument decide; no module global does. Where the
user asks for something that cannot run, the error says why.
"""
import functools
import os

import torch

BACKENDS = ("torch", "triton")

# Device types with torch fused optimizer kernels (torch._fused_sgd_/_fused_adam_/_fused_adamw_),
# which the torch path calls: torch.optim.optimizer._get_fused_kernels_supported_devices().
# "meta": shapes only, as torch.optim steps meta params (deferred initialisation).
_TORCH_FUSED_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "meta",
                             torch._C._get_privateuse1_backend_name())


def check_backend(backend) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of None, 'torch', 'triton'")
    return backend


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401  (only whether it imports)
    except ImportError as e:  # not installed, or broken
        return f"triton cannot be imported ({e}); install it with `pip install triton`"
    return None


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the kernels on CPU tensors (read at each call, as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(devices: set[torch.device]) -> str | None:
    """Why the Triton kernels cannot step parameters on ``devices``; None when they can."""
    if len(devices) > 1:
        return (f"the parameters span several devices ({sorted(map(str, devices))}); a kernel "
                "launch covers one device")
    (device,) = devices
    if device.type == "meta":
        return ("the parameters are on the meta device (deferred initialisation); materialize "
                "them first, e.g. module.to_empty(device='cuda'), then step")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return (f"the parameters are on {device.type}; the kernels run on CUDA GPUs (or on CPU "
                "tensors under TRITON_INTERPRET=1)")
    return _triton_import_error()


def first_subclass(params) -> str | None:
    """Why the kernels cannot take ``params``: the first one that is a tensor subclass other than
    DTensor, described; None when there is none. Its data_ptr() and numel() need not be the memory a kernel may touch, so such a step
    takes the torch path whole. DTensors (FSDP2, tensor parallel) step on their local shards on
    either backend (fusedopt/_distributed.py)."""
    from fusedopt._distributed import is_dtensor
    for i, p in enumerate(params):
        if type(p) not in (torch.Tensor, torch.nn.Parameter) and not is_dtensor(p):
            return (f"parameter {i} (shape {tuple(p.shape)}) is a {type(p).__name__}; the kernels "
                    "take plain tensors and DTensors only (other tensor subclasses step on "
                    "backend='torch')")
    return None


def choose_backend(requested: str | None, devices: set[torch.device],
                   obstacle: str | None = None) -> str:
    """The backend for one step over parameters on ``devices``; ``obstacle``: why the kernels
    cannot take this step whatever the device (first_subclass's reason, or an optimizer without
    kernels), if anything.

    None picks Triton for plain parameters on one CUDA device when triton imports, the torch path
    otherwise (CPU, several devices, tensor subclasses, no triton, an optimizer without kernels).
    """
    if not devices:
        return requested or "torch"
    if requested == "triton":
        # the optimizer's or the parameters' own reason first: moving to CUDA would not help
        reason = obstacle or triton_unavailable_reason(devices)
        if reason:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    if requested is None and obstacle is None and all(d.type == "cuda" for d in devices) \
            and triton_unavailable_reason(devices) is None:
        return "triton"
    unsupported = sorted({d.type for d in devices} - set(_TORCH_FUSED_DEVICE_TYPES))
    if unsupported:
        raise RuntimeError(
            f"fusedopt's torch path runs on torch's fused optimizer kernels, which do not exist for "
            f"device type(s) {unsupported}; supported: {list(_TORCH_FUSED_DEVICE_TYPES)}")
    return "torch"


def torch_reason(requested: str | None, devices: set[torch.device], obstacle: str | None) -> str:
    """Why choose_backend picked the torch path for parameters on ``devices`` (its reasons, in
    its order), in a few words for ``opt.last_step``."""
    if requested == "torch":
        return "backend='torch' was asked"
    if obstacle is not None:
        return obstacle
    if not devices:
        return "no parameter has a grad"
    return triton_unavailable_reason(devices) or "the kernels were not asked for"
