"""Batches in which every task has labels: the task-balanced sampler of the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from mtanet.errors import ConfigError
from mtanet.tasks import TASKS

__all__ = ["TaskBalancedBatchSampler"]


class TaskBalancedBatchSampler:
    """Batches in which every task has labels, despite incomplete labels.

    Aff-Wild2's tasks label different videos, so uniform sampling gives batches where a task has few or no labels and
    its loss (and CCC in particular, a batch statistic) is noisy or undefined. Each batch here is built from equal
    shares, one per task, each drawn from the frames labeled for that task (a frame labeled for several tasks counts
    for all of them, so the shares overlap in labels). Each task's pool is shuffled per epoch and walked without
    replacement, restarting when exhausted, so small pools are revisited more often than large ones.

    An epoch is ``num_batches`` batches (default: as many as cover the largest pool once). Deterministic given
    ``seed`` and the epoch; ``state_dict`` records the position so a resumed run draws the same batches. Under
    DistributedDataParallel give ``num_replicas``/``rank``: every rank draws the same global batch and keeps its own
    slice of it, so ranks never see the same frame in one step.

    Raises:
        ConfigError: a task has no labeled frame, ``batch_size`` is smaller than the number of tasks (a batch could
            not hold every task), or it does not split evenly across ``num_replicas``.
    """

    def __init__(self, masks: dict[str, np.ndarray], batch_size: int, *, tasks: Sequence[str] = TASKS,
                 num_batches: int | None = None, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.tasks = tuple(t for t in tasks if t in masks)
        self.pools = {t: np.flatnonzero(masks[t]) for t in self.tasks}
        empty = [t for t, p in self.pools.items() if p.size == 0]
        if empty:
            kept = [t for t in self.tasks if t not in empty]
            raise ConfigError(f"no labeled frame (with an image) for task(s) {', '.join(empty)}: train without them "
                              f"(tasks={','.join(kept) or '...'}, CLI --tasks) or check the annotations")
        if batch_size < len(self.tasks):
            raise ConfigError(f"batch_size {batch_size} is smaller than the number of tasks {len(self.tasks)}: every "
                              f"batch holds a share of each task; use batch_size >= {len(self.tasks)}")
        if batch_size % num_replicas:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {num_replicas} processes (DDP "
                              "ranks); use a multiple of it")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        largest = max(p.size for p in self.pools.values())
        self.num_batches = num_batches or max(1, math.ceil(largest * len(self.tasks) / batch_size))
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shares(self) -> dict[str, int]:
        base, extra = divmod(self.batch_size, len(self.tasks))
        return {t: base + (i < extra) for i, t in enumerate(self.tasks)}

    def global_batches(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        orders = {t: rng.permutation(p) for t, p in self.pools.items()}
        cursor = {t: 0 for t in self.tasks}
        shares = self.shares()
        for _ in range(self.num_batches):
            parts = []
            for t in self.tasks:
                take = []
                need = shares[t]
                while need:
                    if cursor[t] >= orders[t].size:
                        orders[t] = rng.permutation(self.pools[t])
                        cursor[t] = 0
                    chunk = orders[t][cursor[t]: cursor[t] + need]
                    cursor[t] += chunk.size
                    need -= chunk.size
                    take.append(chunk)
                parts.append(np.concatenate(take))
            batch = np.concatenate(parts)
            yield batch[rng.permutation(batch.size)]

    def __iter__(self) -> Iterator[list[int]]:
        for b, batch in enumerate(self.global_batches()):
            if b < self.start_batch:
                continue
            yield batch[self.rank:: self.num_replicas].tolist()
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int], batches_done: int = 0) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.start_batch = batches_done
