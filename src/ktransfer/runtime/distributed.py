"""Several training processes (``torchrun``): process group, rank and world, and the few collectives training needs.

``torchrun --nproc_per_node N -m ktransfer train ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. ``init`` reads them and joins the process group
(``nccl`` when the process trains on CUDA, ``gloo`` on CPU); without them (or with ``WORLD_SIZE=1``) nothing is
started and every helper here acts as for a single process: rank 0 of 1, collectives return their input.

Helpers:

- ``init(device)`` / ``cleanup()`` and the ``session(device)`` context manager that pairs them;
- ``rank()``, ``world_size()``, ``local_rank()``, ``is_main()``, ``barrier()``;
- ``all_reduce_sum(values)`` (token counts, loss sums), ``any_flag(value)`` (stop signals), ``broadcast(obj)``;
- ``shard(items)`` / ``gather(items)``: split a list into contiguous per-rank pieces and join them back in order;
  ``map_sharded(fn, items)``: ``fn`` on this rank's piece, the results of all ranks in the order of ``items``.

See ``docs/distributed.md`` for how batches are split and what resuming with another number of processes means.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 for a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 for a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def launch_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 without torchrun), whether or not a group is running."""
    return int(os.environ.get("RANK", "0"))


def rank_prefix() -> str:
    """``"rank R: "`` when torchrun started several processes (each rank reports its own errors), else ``""``."""
    return f"rank {launch_rank()}: " if _env_world() > 1 else ""


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; picks the GPU), 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, metrics and progress bars."""
    return rank() == 0


def backend_for(device: str) -> str:
    """``nccl`` for a CUDA device (``device`` is ``train.device``: auto, cpu, cuda, cuda:N, mps), else ``gloo``."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def init(device: str = "auto", *, timeout_s: float = 1800) -> bool:
    """Join the process group that torchrun's environment describes; returns whether this call started it.

    Nothing happens for a single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) or when a group is already
    running. On CUDA, this process uses GPU ``LOCAL_RANK`` (``torch.cuda.set_device``).
    """
    if _env_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Leave the process group (when one is running)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """``init`` on entry and, if it started the group, ``cleanup`` on exit.

    On a normal exit every process first waits at a barrier: a process that tears its group down while another still
    talks to it can abort in gloo's threads ("terminate called without an active exception", seen under load in the
    torchrun translate test). After an exception there is no barrier (the others may never arrive).
    """
    started = init(device)
    try:
        yield
    except BaseException:
        if started:
            cleanup()
        raise
    if started:
        barrier()
        cleanup()


def barrier() -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over processes of ``values`` (float64; integers up to 2**53 stay exact)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over processes (e.g. a signal number, 0 for none)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every process (pickled by torch: for small, trusted objects such as results)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank_``'s contiguous piece of ``n`` items; pieces differ in size by at most 1,
    the first ``n % world`` ranks holding one more."""
    if not 0 <= rank_ < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank_}")
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (rank_ < extra)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous piece of ``items`` (``shard_bounds``); the pieces of ranks 0..world-1, concatenated,
    give ``items`` back (``gather``)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    start, end = shard_bounds(len(items), rank_, world)
    return list(items[start:end])


def gather(items: Sequence[T]) -> list[T]:
    """Every rank's ``items`` concatenated in rank order, on every rank (``all_gather_object``); the inverse of
    ``shard``. Items must be picklable (strings, numbers)."""
    if not is_distributed():
        return list(items)
    pieces: list[Any] = [None] * world_size()
    dist.all_gather_object(pieces, list(items))
    return [x for piece in pieces for x in piece]


def map_sharded(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` computed in pieces: each rank applies ``fn`` to its ``shard`` (one result per item, in order),
    and every rank gets all results in the order of ``items``. E.g. beam search of a test set on every GPU."""
    mine = shard(items)
    results = list(fn(mine))
    if len(results) != len(mine):
        raise ValueError(f"fn returned {len(results)} results for {len(mine)} items")
    return gather(results)
