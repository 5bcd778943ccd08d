"""Running one influence job across processes with ``torch.distributed``.

When a default process group is initialised (``torchrun``, or
``torch.distributed.init_process_group`` by hand), every solver splits the
training data by blocks: process ``r`` of ``W`` takes blocks ``r, r + W,
r + 2W, ...`` of the data it is given, so the global training indices stay
those of the data order. Sums over the training data (curvature products,
Kronecker covariances, explicit matrices) are all-reduced, and score sinks are
combined at the end: dense results are summed (each column comes from one
process, the others add exact zeros), top-k lists are merged with the same
tie rule as the single-process merge (equal values: lower index first).

Without a process group (or with one process) every function here is a no-op,
so single-process code pays nothing. Every process must call the same solver
methods in the same order with the same arguments, as with any collective code.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .data import SampleBlock, Samples


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether more than one process shares the job."""
    return world()[1] > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and shows progress bars."""
    return world()[0] == 0


def block_selector() -> Optional[Callable[[int], bool]]:
    """The predicate that keeps this process's blocks (index % W == rank); None for one process."""
    rank, size = world()
    if size == 1:
        return None
    return lambda index: index % size == rank


def local_blocks(samples: Samples, *, checked: bool = True) -> Iterator[SampleBlock]:
    """This process's share of ``samples.blocks()`` (all of them without a process group)."""
    return samples.blocks(checked=checked, select=block_selector())


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sums `tensor` over all processes, in place; returns it. A no-op for one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_count(count: int, device: torch.device) -> int:
    """The sum of an integer over all processes."""
    return _all_reduce_int(count, device, "SUM")


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of an integer over all processes."""
    return _all_reduce_int(value, device, "MAX")


def _all_reduce_int(value: int, device: torch.device, op: str) -> int:
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)  # on the device its backend serves
    dist.all_reduce(total, op=getattr(dist.ReduceOp, op))
    return int(total)


def barrier() -> None:
    """Waits for every process (a no-op for one process)."""
    if is_distributed():
        dist.barrier()


def local_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """This process's contiguous slice of one minibatch, and its share of the minibatch's rows.

    Used where every process reads the same random minibatch (LiSSA): each takes
    its slice, and the weighted sum of the slices' mean curvature products equals
    the whole minibatch's.
    """
    rank, size = world()
    if size == 1:
        return x, y, 1.0
    b = x.shape[0]
    start, stop = (rank * b) // size, ((rank + 1) * b) // size
    return x[start:stop], y[start:stop], (stop - start) / b


def merge_topk(values: Tensor, indices: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Merges each process's (n_query, k) top-k list into the global one on every process.

    Order: by value (descending for ``largest``), equal values by ascending index;
    unfilled slots (index -1) sort last. The same rule as the single-process merge,
    so the result equals a one-process run whenever the scores are equal.
    """
    if not is_distributed():
        return values, indices
    _, size = world()
    k = values.shape[1]
    gathered_v = [torch.empty_like(values) for _ in range(size)]
    gathered_i = [torch.empty_like(indices) for _ in range(size)]
    dist.all_gather(gathered_v, values.contiguous())
    dist.all_gather(gathered_i, indices.contiguous())
    v, i = torch.cat(gathered_v, dim=1), torch.cat(gathered_i, dim=1)
    missing = i < 0
    # Two stable sorts: by index first, then by value, so ties keep the lower index first.
    big = torch.iinfo(torch.int64).max
    order = torch.sort(torch.where(missing, big, i), dim=1, stable=True).indices
    v, i, missing = v.gather(1, order), i.gather(1, order), missing.gather(1, order)
    key = v if not largest else -v
    key = torch.where(missing, torch.full_like(key, torch.inf), key)
    order = torch.sort(key, dim=1, stable=True).indices[:, :k]
    return v.gather(1, order), i.gather(1, order)


def init_from_environment() -> bool:
    """Joins the process group ``torchrun`` describes in the environment; returns whether one is active.

    Does nothing without ``WORLD_SIZE`` > 1 or when a group is already initialised.
    CPU tensors go through gloo; CUDA tensors through NCCL when CUDA is available.
    """
    import os

    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[bool]:
    """Joins the group ``torchrun`` describes (see :func:`init_from_environment`) for the
    ``with`` block, and leaves it together with the other processes at the end.

    Yields whether a group is active. On a normal exit every process waits at a
    barrier before the group is destroyed: a process that finishes early (one
    that writes no report) must not tear down its communication threads while
    the others still run, which aborts it at interpreter exit. A group that was
    already initialised by the caller is left as it is.
    """
    owned = not (dist.is_available() and dist.is_initialized())
    active = init_from_environment()
    try:
        yield active
    except BaseException:
        if active and owned:  # no barrier: the other processes may never reach it
            dist.destroy_process_group()
        raise
    if active and owned:
        dist.barrier()
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, source: int = 0) -> torch.nn.Module:
    """Copies rank `source`'s parameters and buffers to every process (a no-op for one process).

    Models trained separately in each process can differ in their last bits
    (thread counts, kernels); an influence job needs one model everywhere.
    """
    if is_distributed():
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=source)
    return module
