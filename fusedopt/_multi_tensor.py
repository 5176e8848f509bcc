"""Launch plumbing for the Triton kernels: device tables over many tensors, cached.

A launch covers many tensors through two tables on the device: one int64 row per tensor (the
addresses of its columns, its numel, small per-tensor ints) and, per block of BLOCK_SIZE elements,
the tensor it belongs to and its index inside it. Rows are rebuilt only when an address, a size
or a flag changed; a rebuild is one host-to-device copy (from pinned memory on CUDA), the block
map is rebuilt only when sizes change. Optimizer-agnostic: the optimizers say what the columns
are, the kernels in fusedopt.kernels read them.
"""
import array
import contextlib
import itertools

import torch

# The only tensor types whose data_ptr() and numel() are the memory a kernel may touch. A
# subclass may be a wrapper with no storage of its own (a DTensor's numel() is global and its
# data_ptr() 0 or an offset), so none reaches a kernel: a DTensor goes as its local shard
# (fusedopt/_distributed.py), other subclasses take the torch path.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def unfit_reason(tensors: list[torch.Tensor], dtypes, device: torch.device,
                 same_dtype: bool = True) -> str | None:
    """Why one row of tensors (param, grad, state...) cannot go through a kernel, in a few words;
    None when it can: plain tensors (PLAIN_TYPES) on ``device``, dtypes in ``dtypes`` (fp64
    cannot), the same one unless ``same_dtype`` is False (a row's state dtype and master column
    are the class's to keep consistent: fusedopt/_elementwise.py), same numel and not empty (an
    empty tensor has no block to advance Adam's counter: the torch path does it), contiguous,
    16-byte aligned (the kernels use 128-bit accesses). Others take the torch path, tensor by
    tensor (``opt.last_step`` counts them by this reason)."""
    first = tensors[0]
    n = first.numel()
    if n == 0:
        return "empty"
    for t in tensors:
        if type(t) not in PLAIN_TYPES:
            return f"a {type(t).__name__}, not a plain tensor"
        if t.dtype not in dtypes or (same_dtype and t.dtype != first.dtype):
            return f"{t.dtype} (kernels take {', '.join(str(d) for d in dtypes)})" \
                if t.dtype not in dtypes else "param and grad of different dtypes"
        if t.device != device:
            return f"on {t.device}, not {device}"
        if t.numel() != n:
            return "a grad or state of another size than its param"
        if not t.is_contiguous():
            return "not contiguous"
        if t.data_ptr() % 16:
            return "not 16-byte aligned"
    return None


def scalars_fit_kernel(scalars: list[torch.Tensor], device: torch.device) -> bool:
    """Whether per-tensor scalars (Adam's step) can be read and written by a kernel: plain
    one-element fp32 tensors on ``device``."""
    return all(type(s) is torch.Tensor and s.device == device and s.dtype == torch.float32
               and s.numel() == 1 for s in scalars)


def device_guard(device: torch.device):
    """The context every launch and table copy of a step runs in: ``device`` made current, so
    that Triton launches on it and on its current stream (Triton takes the current device's
    current stream), as torch's own ops on those tensors would. Nothing to enter elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


CAPTURE_ERROR = (
    "fusedopt: the optimizer's launch tables changed during CUDA graph capture (new grads, new "
    "state or new params since the last eager step); a captured host-to-device copy would replay "
    "from a host buffer nothing keeps alive. Run a few eager warmup steps with the grads the graph "
    "will use (opt.zero_grad(set_to_none=False) keeps their storage), then capture.")


def to_device(values, device: torch.device) -> torch.Tensor:
    """One host-to-device copy of int64 values; from pinned memory on CUDA, so the host does not
    wait (torch's caching host allocator keeps the buffer until the copy is done). Refused during
    CUDA graph capture (CAPTURE_ERROR)."""
    pin = device.type == "cuda"
    if pin and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(CAPTURE_ERROR)
    host = values if isinstance(values, torch.Tensor) else _int64_tensor(values)
    if pin:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _int64_tensor(values: list) -> torch.Tensor:
    """A host int64 tensor of a flat or 2-D list of ints. torch.tensor(list) infers the type of
    every element: 154 ns each for 2000 addresses on the CI machine's CPU, against 21 ns through
    array('q') (the tensor keeps the array alive)."""
    rows = values and isinstance(values[0], list)
    flat = array.array("q", itertools.chain.from_iterable(values) if rows else values)
    out = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.empty(0, dtype=torch.int64)
    return out.view(len(values), -1) if rows else out


class DeviceInts:
    """A host list of ints mirrored on the device: copied again only when the list changes. The
    key is re-pointed at every refresh, so an equal list is compared once, not every step."""

    def __init__(self, device: torch.device):
        self.device, self._key, self.tensor = device, None, None

    def refresh(self, values: list) -> bool:
        """Whether the device copy changed."""
        changed = values != self._key
        if changed:
            self.tensor = to_device(values, self.device)
        self._key = values
        return changed


class LaunchTable:
    """The device tables of one launch, built once per plan, read by the kernel launchers.

    ``rows``: int64 [n, row_width], param and state addresses, numel, flags. ``grads``: int64
    [n], the grad addresses, which change every step after zero_grad(set_to_none=True): a slice
    of one DeviceInts per dtype, shared by the norm pass and the updates, set by the step.
    ``block_tensor`` / ``block_index``: int32 [n_blocks], the tensor of each block of
    ``block_size`` elements and its index inside it. ``grid``: the launch's program count.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int,
                 rows: list[list[int]], numels: list[int]):
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.rows = to_device(rows, device)
        self.row_width = len(rows[0])
        self.grads = None
        counts = (torch.tensor(numels, dtype=torch.int64) + block_size - 1) // block_size
        tensor_of_block = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_block = torch.cumsum(counts, 0) - counts
        index_in_tensor = torch.arange(len(tensor_of_block)) - first_block[tensor_of_block]
        self.n_blocks = len(tensor_of_block)
        self.block_tensor = to_device(tensor_of_block.to(torch.int32), device)
        self.block_index = to_device(index_in_tensor.to(torch.int32), device)
        self.grid = 1


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
