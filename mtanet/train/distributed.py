"""Everything the trainer does differently under ``torchrun``, in one place.

A plain process is a job of one rank: every method below is then a no-op or returns its input, so the trainer reads
the same with one process or many. Under ``torchrun --nproc_per_node N`` each rank takes its slice of the same global
batch, gradients of the model are averaged by DistributedDataParallel, and this class averages what lives outside
the DDP module (eq. 5's log-variances), sums the loss accumulators, gathers validation predictions and RNG states,
and broadcasts BatchNorm statistics (kept per rank while training, rank 0's at every epoch end) and results.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Distributed"]

T = TypeVar("T")


@dataclasses.dataclass
class Distributed:
    """Where this process sits in a torchrun job (all defaults: a plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def start(self, cuda: bool) -> None:
        """Join the process group: NCCL on GPUs, gloo on CPU; a long timeout so a slow rank-0 epoch end never trips
        the others."""
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
            self.owns_group = True

    def stop(self) -> None:
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def main_first(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, then on the other ranks once rank 0 is done (a cache written once, read by all)."""
        if self.main:
            value = make()
        self.barrier()
        if not self.main:
            value = make()
        return value

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.active:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def average_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average the gradients of parameters outside the DDP module (eq. 5's ``s``)."""
        if self.active:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

    def ranks_where(self, flag: torch.Tensor) -> list[int]:
        """The ranks whose ``flag`` (a boolean scalar tensor) is true, known on every rank: so that every rank stops
        together, and each can say which rank stopped them."""
        if not self.active:
            return [0] if bool(flag) else []
        flags = torch.zeros(self.world, device=flag.device)
        flags[self.rank] = flag.float()
        dist.all_reduce(flags)
        return [rank for rank, value in enumerate(flags.tolist()) if value]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def shard(self, n: int) -> np.ndarray:
        """This rank's items of ``range(n)``: every ``world``-th from ``rank``."""
        return np.arange(n)[self.rank:: self.world]

    def gather_predictions(self, indices: np.ndarray, pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every rank's predictions of its :meth:`shard`, back in item order (on every rank)."""
        if not self.active:
            return pred
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (indices, pred))
        order = np.argsort(np.concatenate([p[0] for p in parts]))
        return {t: np.concatenate([p[1][t] for p in parts])[order] for t in pred}

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order."""
        if not self.active:
            return [obj]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def sync_buffers(self, model: nn.Module) -> None:
        """BatchNorm statistics are per rank under DDP; take rank 0's everywhere, so validation, checkpoints and
        every rank's model agree."""
        if self.active:
            for buf in model.buffers():
                dist.broadcast(buf, 0)

    def from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def weight_spread(self, model: nn.Module) -> dict[str, Any] | None:
        """Under DDP, the largest difference of any weight across ranks (which must be 0): measured, not assumed."""
        if not self.active:
            return None
        flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return {"world_size": self.world, "backend": dist.get_backend(),
                "max_abs_weight_diff_across_ranks": float((hi - lo).abs().max())}
