"""Launch plumbing for the Triton kernels: device tables over many tensors, cached.

A launch covers many tensors through two tables on the device: one int64 row per tensor (the
addresses of its columns, its numel, small per-tensor ints) and, per block of BLOCK_SIZE elements,
the tensor it belongs to and its index inside it. Rows are rebuilt only when an address, a size
or a flag changed; a rebuild is one host-to-device copy (from pinned memory on CUDA), the block
map is rebuilt only when sizes change. Optimizer-agnostic: the optimizers say what the columns
are, the kernels in fusedopt.kernels read them.
"""
import torch


def tensors_fit_kernel(tensors: list[torch.Tensor], dtypes) -> bool:
    """Whether one row of tensors (param, grad, state...) can go through a kernel: same dtype in
    ``dtypes`` (fp64 cannot), same numel, contiguous, 16-byte aligned (the kernels use 128-bit
    accesses). Others take the torch path, tensor by tensor."""
    first = tensors[0]
    return first.dtype in dtypes and all(
        t.dtype == first.dtype and t.numel() == first.numel() and t.is_contiguous()
        and t.data_ptr() % 16 == 0 for t in tensors)


CAPTURE_ERROR = (
    "fusedopt: the optimizer's launch tables changed during CUDA graph capture (new grads, new "
    "state or new params since the last eager step); a captured host-to-device copy would replay "
    "from a host buffer nothing keeps alive. Run a few eager warmup steps with the grads the graph "
    "will use (opt.zero_grad(set_to_none=False) keeps their storage), then capture.")


def _to_device(values, device: torch.device) -> torch.Tensor:
    """One host-to-device copy of int64 values; from pinned memory on CUDA, so the host does not
    wait (torch's caching host allocator keeps the buffer until the copy is done). Refused during
    CUDA graph capture (CAPTURE_ERROR)."""
    pin = device.type == "cuda"
    if pin and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(CAPTURE_ERROR)
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
    if pin:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class DeviceInts:
    """A host list of ints mirrored on the device: copied again only when the list changes."""

    def __init__(self, device: torch.device):
        self.device, self._key, self.tensor = device, None, None

    def refresh(self, values: list) -> None:
        if values is not self._key and values != self._key:
            self._key, self.tensor = values, _to_device(values, self.device)


class LaunchTable:
    """The device tables of one launch, refreshed each step, read by the kernel launchers.

    ``rows``: int64 [n, row_width], what changes rarely (param and state addresses, numel,
    flags). ``grads``: int64 [n], the grad addresses, which change every step after
    zero_grad(set_to_none=True): a slice of one DeviceInts per dtype, shared by the norm pass and
    the updates. ``block_tensor`` / ``block_index``: int32 [n_blocks], the tensor of each block of
    ``block_size`` elements and its index inside it, rebuilt only when sizes change.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int):
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self._rows = DeviceInts(device)
        self._sizes_key = None
        self.grads = self.block_tensor = self.block_index = None
        self.row_width = 0
        self.n_blocks = 0

    @property
    def rows(self) -> torch.Tensor:
        return self._rows.tensor

    def refresh(self, rows: list[list[int]], numels: list[int], grads: torch.Tensor) -> None:
        self._rows.refresh(rows)
        self.row_width = len(rows[0])
        self.grads = grads
        if numels is not self._sizes_key and numels != self._sizes_key:
            self._sizes_key = numels
            counts = (torch.tensor(numels, dtype=torch.int64) + self.block_size - 1) // self.block_size
            tensor_of_block = torch.repeat_interleave(torch.arange(len(numels)), counts)
            first_block = torch.cumsum(counts, 0) - counts
            index_in_tensor = torch.arange(len(tensor_of_block)) - first_block[tensor_of_block]
            self.n_blocks = len(tensor_of_block)
            self.block_tensor = _to_device(tensor_of_block.to(torch.int32), self.device)
            self.block_index = _to_device(index_in_tensor.to(torch.int32), self.device)


def norm_grid(device: torch.device, n_blocks: int, num_partials: int) -> int:
    """Programs of a norm pass, one partial each: as many as there are slots on a GPU (enough
    loads in flight to fill the memory system); under the CPU interpreter 16, since each program
    costs ~7 ms of interpretation there whatever it does (measured, triton 3.9)."""
    return max(1, min(n_blocks, num_partials if device.type == "cuda" else 16))


def update_grid(device: torch.device, n_blocks: int, programs_per_sm: int) -> int:
    """Programs of an update launch: each walks blocks pid, pid + grid, ... and forms the clip
    coefficient once. ``programs_per_sm`` per SM on a GPU (kernels/_common.LaunchConfig). Under
    the CPU interpreter, 16 in all: the program count changes no result there."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, programs_per_sm * sms))
    return max(1, min(n_blocks, 16))
