"""Adapters between a :class:`mtanet.data.FrameDataset` and torch's ``DataLoader``: whole batches in one fetch.

The DataLoader calls a dataset's ``__getitems__`` with a batch's indices when it has one; these adapters answer with
the finished batch (:meth:`mtanet.data.FrameDataset.batch`, one cache read and batched float arithmetic), and
:func:`collate_batched` passes it through. Training addresses rows with their augmentation keys
(:class:`KeyedBatches` + :class:`KeyedFrames`); evaluation with plain rows (:class:`BatchedFrames`)::

    FrameLoader(KeyedFrames(dataset, augment), batch_sampler=KeyedBatches(sampler, seed), collate_fn=collate_batched)
    FrameLoader(BatchedFrames(dataset), batch_sampler=row_batches, collate_fn=collate_batched)

:class:`FrameLoader` is torch's ``DataLoader`` that raises an error a worker process met (a corrupt jpg) as itself,
the :class:`mtanet.errors.DataFormatError` naming the file, where torch's own would raise a ``RuntimeError`` holding
the worker's traceback (see :class:`WorkerFailure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, default_collate, get_worker_info

from mtanet.data.augment import FaceAugment
from mtanet.data.dataset import FrameDataset
from mtanet.data.sampler import TaskBalancedBatchSampler
from mtanet.errors import MtanetError

__all__ = ["KeyedFrames", "BatchedFrames", "KeyedBatches", "collate_batched", "FrameLoader", "WorkerFailure"]

#: A row of a FrameDataset with the key its augmentation is seeded from: ``(row, (seed, epoch, batch, slot))``.
KeyedRow = tuple[int, Sequence[int]]


class WorkerFailure:
    """The place of a batch whose fetch in a DataLoader worker process met an error a user can fix (an
    :class:`~mtanet.errors.MtanetError` such as a corrupt jpg, or an :class:`OSError` such as an unreadable file).

    torch carries a worker's exception to the main process as its class and formatted traceback, and rebuilds it by
    calling the class with that one string; a class that needs other arguments (``DataFormatError(path, line,
    message)``) becomes a ``RuntimeError`` whose message is the worker's traceback. The adapters below return the
    error itself instead (pickled whole, :class:`~mtanet.errors.DataFormatError` by its ``__reduce__``), and
    :class:`FrameLoader` raises it in the main process, so the user sees the error's own one line.
    """

    def __init__(self, error: BaseException):
        self.error = error

    def __iter__(self):
        """Unpacking it as a batch raises the error: a plain ``DataLoader`` over these adapters fails as loudly."""
        raise self.error


def _fetch(fetch: Callable[[], Any]) -> Any:
    """``fetch()``; in a worker process, a user error is returned as a :class:`WorkerFailure` rather than raised."""
    if get_worker_info() is None:  # the main process: errors propagate as they are
        return fetch()
    try:
        return fetch()
    except (MtanetError, OSError) as err:
        return WorkerFailure(err)


class FrameLoader(DataLoader):
    """torch's ``DataLoader`` that raises the error of a :class:`WorkerFailure` batch as itself (see there)."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch


class KeyedFrames:
    """A FrameDataset addressed by ``(row, augmentation key)``: the key reseeds the augmentation before the item.

    With ``uint8=True`` a batch is ``(images, factors, targets, masks)``: uint8 images (the augmented crops, or the
    decoded images without augmentation) and the photometric factors (``None`` without augmentation), which
    :func:`mtanet.data.augment.finish_on_device` turns into the float batch on the GPU. The worker then does only the
    uint8 work (decode or cache read, crop, flip, resize) and ships a quarter of the bytes; the result equals the
    float batch up to rounding (tested).
    """

    def __init__(self, dataset: FrameDataset, augment: FaceAugment | None, *, uint8: bool = False):
        self.dataset = dataset
        self.augment = augment
        self.uint8 = uint8

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: KeyedRow):
        row, key = item
        if self.augment is not None:
            self.augment.reseed(key)
        return self.dataset[row]

    def __getitems__(self, items: Sequence[KeyedRow]):
        """A whole batch at once (the DataLoader's batched fetch): one cache read, batched float arithmetic.

        Returns the collated ``(images, targets, masks)``, equal to collating ``self[item]`` for each item (in a
        worker process, a :class:`WorkerFailure` for an error a user can fix).
        """
        return _fetch(lambda: self._batch(items))

    def _batch(self, items: Sequence[KeyedRow]):
        rows = [row for row, _ in items]
        if self.uint8:
            if self.augment is None:
                stacked = self.dataset._stacked(rows)
                if stacked is not None:
                    return (stacked, None, *self.dataset.labels(rows))
            elif self.dataset.transform is self.augment:
                crops, factors = self.augment.batch_uint8(self.dataset.load_images(rows), [key for _, key in items])
                return (crops, factors, *self.dataset.labels(rows))
            # jpgs of different sizes, or an augmentation wrapped in another transform: the float batch below
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
        """The collated batch of ``rows`` (in a worker process, a :class:`WorkerFailure` for a user's error)."""
        return _fetch(lambda: self.dataset.batch(rows))


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
