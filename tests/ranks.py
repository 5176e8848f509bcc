"""Run a test body on N ranks: spawned processes, a gloo process group over a file store.

``run_ranks(body, world_size, *args)`` calls ``body(rank, world_size, *args)`` in every rank (a
module-level function, so that spawned processes can import it) and fails the calling test with
the first rank's traceback. A file store, not a TCP port: parallel test runs never collide.
The ranks run with TRITON_INTERPRET=1, on a GPU machine too: their tensors are on the CPU.

Helpers for bodies: ``full`` (a DTensor's whole value), ``CollectiveCounter`` (counts direct
dist.all_reduce calls and all collectives in a block) and ``NoHostRead`` (fails on any read of a
tensor's value by the host in a block: what would be a device sync on a GPU).
"""
import contextlib
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode


def _entry(rank, body, world_size, store_path, args):
    # one intra-op thread per rank: the CI machine has 2 cores for 2 (or 4) ranks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        body(rank, world_size, *args)
        dist.barrier()
    finally:
        # torch 2.13 CPU: destroying the group while a DDP/FSDP2 module or a mesh still holds it
        # can abort the process at exit (README, Distributed training); free them first
        gc.collect()
        dist.destroy_process_group()


def run_ranks(body, world_size: int, *args) -> None:
    # the ranks step CPU tensors, so their Triton backend runs under the interpreter on a GPU
    # machine too; set for the children only (spawn copies the environment at start): in this
    # process triton may already have compiled kernels for the GPU
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_entry, args=(body, world_size, os.path.join(tmp, "store"), args),
                     nprocs=world_size, join=True)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: call it on every rank), a plain tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class CollectiveCounter(contextlib.AbstractContextManager):
    """Inside the block: ``all_reduce`` counts direct torch.distributed.all_reduce calls (the
    clip's), ``total`` every collective that reached c10d, those DTensor ops issue included
    (CommDebugMode)."""

    def __enter__(self):
        from torch.distributed.tensor.debug import CommDebugMode
        self.all_reduce = 0
        self._real = dist.all_reduce

        def counting(*a, **kw):
            self.all_reduce += 1
            return self._real(*a, **kw)
        dist.all_reduce = counting
        self._comm = CommDebugMode()
        self._comm.__enter__()
        return self

    def __exit__(self, *exc):
        self._comm.__exit__(*exc)
        dist.all_reduce = self._real
        self.total = self._comm.get_total_counts()
        return False


class NoHostRead(TorchFunctionMode):
    """Inside the block, reading a tensor's value on the host (``item``, ``bool``, ``float``,
    ``int``, ``tolist``: on a GPU each is a sync) raises AssertionError naming the call. On CPU
    nothing syncs, so this is how a CPU test shows a GPU step would not."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.tolist}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor value: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))
