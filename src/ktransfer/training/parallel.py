"""How the processes of a run share the work: one process, DDP replicas or FSDP shards, behind one small object.

- ``single``: one process; every method is the plain single-process thing.
- ``ddp`` (several processes, ``train.distributed=ddp``): the learner is wrapped in ``DistributedDataParallel``;
  each rank trains on its share of a step's batches, validates its share of the validation batches and translates
  its share of the sources; sums go over the processes.
- ``fsdp`` (several processes, ``train.distributed=fsdp``): learner and teacher are sharded per transformer block
  (``ktransfer.runtime.fsdp``). Every forward is a collective, so every rank validates and translates everything;
  checkpoints gather the full weights and optimiser state (every rank takes part, rank 0 writes).

Which settings each mode refuses is stated in ``ktransfer.training.rules`` (checked before any model loads).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ktransfer.runtime import distributed


@dataclass
class Parallel:
    """The run's process layout: ``mode`` (single, ddp, fsdp), ``world`` processes, and the DDP wrapper if any."""

    mode: str = "single"
    world: int = 1
    wrapper: torch.nn.Module | None = None  # the learner in DistributedDataParallel (ddp), else None

    @classmethod
    def choose(cls, distributed_setting: str) -> Parallel:
        """The layout for ``train.distributed`` and the processes this program runs in (before any model loads)."""
        world = distributed.world_size()
        if world <= 1:
            return cls()
        return cls(mode=distributed_setting, world=world)

    @property
    def sharded(self) -> bool:
        """Whether every forward is a collective (FSDP): every rank must then run the same passes."""
        return self.mode == "fsdp"

    def wrap(self, model: torch.nn.Module, teacher: torch.nn.Module | None, device: torch.device) -> None:
        """Shard learner and teacher (fsdp) or wrap the learner in DDP (ddp; the frozen teacher has no gradients to
        synchronise). Raises ValueError for a model FSDP cannot shard (no transformer blocks)."""
        if self.mode == "fsdp":
            from ktransfer.runtime import fsdp

            for m in (model, teacher):
                if m is not None:
                    fsdp.shard(m)
        elif self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.wrapper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def describe(self, teacher: bool) -> str:
        if self.mode == "ddp":
            return f" x {self.world} processes (DDP)"
        if self.mode == "fsdp":
            return (f" sharded over {self.world} processes (FSDP2), learner{' and teacher' if teacher else ''} per "
                    "transformer block")
        return ""

    def trained(self, model: torch.nn.Module) -> torch.nn.Module:
        """What training steps run forward/backward through: the DDP wrapper when there is one, else ``model``."""
        return model if self.wrapper is None else self.wrapper

    def no_sync(self, last: bool):
        """DDP: no gradient all-reduce on a micro-batch that is not the ``last`` of its step; else nothing."""
        return self.wrapper.no_sync() if self.wrapper is not None and not last else contextlib.nullcontext()

    # --- sums, shares -----------------------------------------------------------------------------------------
    @staticmethod
    def sum(values) -> list[float]:
        """Element-wise sum over the processes (training: every rank holds its own batches)."""
        return distributed.all_reduce_sum(values)

    def valid_share(self, items: list) -> list:
        """This rank's share of validation ``items``: all of them under FSDP, a contiguous piece under DDP."""
        return list(items) if self.sharded else distributed.shard(items)

    def valid_sum(self, values) -> list[float]:
        """Sums over the shares of ``valid_share`` (under FSDP every rank already has the whole)."""
        return [float(v) for v in values] if self.sharded else distributed.all_reduce_sum(values)

    def valid_map(self, fn, items: list) -> list:
        """``fn(items)``, each rank computing its share (DDP) or all of it (FSDP); every rank gets all results."""
        return list(fn(items)) if self.sharded else distributed.map_sharded(fn, items)

    def runs_examples(self) -> bool:
        """Whether this rank generates the logged validation examples (rank 0; every rank under FSDP)."""
        return self.sharded or distributed.is_main()

    # --- checkpoints -------------------------------------------------------------------------------------------
    def full_state(self, model, optimizer) -> dict[str, Any]:
        """FSDP: the gathered ``state_dict`` and ``optimizer_state`` (a collective; whole on rank 0) for
        ``ktransfer.models.checkpoint.save_checkpoint``; else nothing (it reads the model and optimiser)."""
        if not self.sharded:
            return {}
        from ktransfer.runtime import fsdp

        return {"state_dict": fsdp.full_model_state(model),
                "optimizer_state": fsdp.full_optimizer_state(model, optimizer)}

    def load_optimizer_state(self, model, optimizer, resumed) -> None:
        """Restore a checkpoint's optimiser state (single-process layout; scattered to the shards under FSDP)."""
        if self.sharded:
            from ktransfer.runtime import fsdp

            fsdp.load_optimizer_state(model, optimizer, resumed.optimizer_state)
        else:
            from ktransfer.models import checkpoint as ckpt_lib

            ckpt_lib.restore_optimizer(optimizer, resumed)
