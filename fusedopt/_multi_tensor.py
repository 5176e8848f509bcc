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


class LaunchTable:
    """The device tables of one launch; ``refresh`` each step, read by the kernel launchers."""

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int):
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self._rows_key = None
        self._sizes_key = None
        self.rows = self.block_tensor = self.block_index = None
        self.row_width = 0
        self.n_blocks = 0

    def refresh(self, rows: list[list[int]], numels: list[int]) -> None:
        """``rows[i]``: the ints of tensor i (addresses, numel, flags); ``numels[i]`` its size."""
        if rows != self._rows_key:
            self._rows_key = rows
            self.row_width = len(rows[0])
            self.rows = self._to_device(torch.tensor(rows, dtype=torch.int64, pin_memory=self._pin))
        if numels != self._sizes_key:
            self._sizes_key = numels
            counts = (torch.tensor(numels, dtype=torch.int64) + self.block_size - 1) // self.block_size
            tensor_of_block = torch.repeat_interleave(torch.arange(len(numels)), counts)
            first_block = torch.cumsum(counts, 0) - counts
            index_in_tensor = torch.arange(len(tensor_of_block)) - first_block[tensor_of_block]
            self.n_blocks = len(tensor_of_block)
            self.block_tensor = self._to_device(tensor_of_block.to(torch.int32))
            self.block_index = self._to_device(index_in_tensor.to(torch.int32))

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self._pin and not host.is_pinned():
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)


def norm_grid(device: torch.device, n_blocks: int, num_partials: int) -> int:
    """Programs of a norm pass, one partial each: as many as there are slots on a GPU (enough
    loads in flight to fill the memory system); under the CPU interpreter 16, since each program
    costs ~7 ms of interpretation there whatever it does (measured, triton 3.9)."""
    return max(1, min(n_blocks, num_partials if device.type == "cuda" else 16))


def update_grid(device: torch.device, n_blocks: int) -> int:
    """Programs of an update launch: each walks blocks pid, pid + grid, ... and forms the clip
    coefficient once. 16 per SM on a GPU (4 warps each: half of an H100 SM's 64 warps; not yet
    swept). Under the CPU interpreter, 16 in all: the program count changes no result there."""
    if device.type == "cuda":
        return max(1, min(n_blocks, 16 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_blocks, 16))
