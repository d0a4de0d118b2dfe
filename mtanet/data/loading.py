"""Adapters between a :class:`mtanet.data.FrameDataset` and torch's ``DataLoader``: whole batches in one fetch.

The DataLoader calls a dataset's ``__getitems__`` with a batch's indices when it has one; these adapters answer with
the finished batch (:meth:`mtanet.data.FrameDataset.batch`, one cache read and batched float arithmetic), and
:func:`collate_batched` passes it through. Training addresses rows with their augmentation keys
(:class:`KeyedBatches` + :class:`KeyedFrames`); evaluation with plain rows (:class:`BatchedFrames`)::

    DataLoader(KeyedFrames(dataset, augment), batch_sampler=KeyedBatches(sampler, seed), collate_fn=collate_batched)
    DataLoader(BatchedFrames(dataset), batch_sampler=row_batches, collate_fn=collate_batched)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import default_collate

from mtanet.data.augment import FaceAugment
from mtanet.data.dataset import FrameDataset
from mtanet.data.sampler import TaskBalancedBatchSampler

__all__ = ["KeyedFrames", "BatchedFrames", "KeyedBatches", "collate_batched"]

#: A row of a FrameDataset with the key its augmentation is seeded from: ``(row, (seed, epoch, batch, slot))``.
KeyedRow = tuple[int, Sequence[int]]


class KeyedFrames:
    """A FrameDataset addressed by ``(row, augmentation key)``: the key reseeds the augmentation before the item."""

    def __init__(self, dataset: FrameDataset, augment: FaceAugment | None):
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: KeyedRow):
        row, key = item
        if self.augment is not None:
            self.augment.reseed(key)
        return self.dataset[row]

    def __getitems__(self, items: Sequence[KeyedRow]):
        """A whole batch at once (the DataLoader's batched fetch): one cache read, batched float arithmetic.

        Returns the collated ``(images, targets, masks)``, equal to collating ``self[item]`` for each item.
        """
        rows = [row for row, _ in items]
        if self.augment is None:  # nothing to reseed: the dataset's own batched fetch
            return self.dataset.batch(rows)
        if self.dataset.transform is self.augment:
            return self.dataset.batch(rows, [key for _, key in items])
        # an augmentation the dataset does not call itself (wrapped in another transform): item by item
        return default_collate([self[item] for item in items])


class BatchedFrames:
    """A FrameDataset whose DataLoader fetches each batch in one call (:meth:`mtanet.data.FrameDataset.batch`)."""

    def __init__(self, dataset: FrameDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        return self.dataset[row]

    def __getitems__(self, rows: Sequence[int]):
        return self.dataset.batch(rows)


def collate_batched(batch: Any) -> Any:
    """The DataLoader's collate_fn for datasets whose ``__getitems__`` returns a finished batch."""
    return batch


class KeyedBatches:
    """The task-balanced sampler's batches, each row paired with its key ``(seed, epoch, batch, global slot)``.

    The slot is the row's position in the global batch (rank ``r`` holds slots ``r, r + R, ...``), so a run on R
    ranks augments exactly as a run on one.
    """

    def __init__(self, sampler: TaskBalancedBatchSampler, seed: int):
        self.sampler = sampler
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[KeyedRow]]:
        s = self.sampler
        for b, rows in enumerate(s, start=s.start_batch):
            yield [(i, (self.seed, s.epoch, b, s.rank + j * s.num_replicas)) for j, i in enumerate(rows)]
