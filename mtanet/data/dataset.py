"""Feeding a frame table to a model: the torch dataset over the frames that have an image, and its packed cache.

:class:`FrameDataset` is the one place where images become model input: an item (``dataset[i]``) and a whole batch
(:meth:`FrameDataset.batch`, what the training and evaluation loaders fetch) go through the same scaling and resizing,
and a batch equals its collated items bit for bit (tested).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from mtanet.data.table import decode_image_file, label_arrays
from mtanet.errors import DataFormatError
from mtanet.runtime import atomic_path
from mtanet.tasks import TASKS

__all__ = ["FrameDataset", "build_packed_cache", "packed_cache_key"]


class FrameDataset:
    """A torch map-style dataset over the frames that have an image.

    Item ``i`` is ``(image, targets, masks)``: a float32 (3, S, S) tensor in [0, 1], and dicts keyed by task
    (``va`` float (2,), ``au`` float (K,), ``expr`` int64 ()) with a bool mask per task saying whether the target
    is a label. Rows without a jpg are dropped here: they stay in the table for scoring, but are never fed.

    Args:
        frames: a frame table from :func:`mtanet.data.load_frames`.
        root: the dataset root the ``image`` paths are relative to.
        au_names: the AU columns, in head order.
        image_size: side of the square the model sees; crops are 112 px, other sizes are resized (antialiased).
        transform: optional callable on the uint8 (3, H, W) tensor before scaling (augmentation), returning a
            (3, H', W') image on the 0-255 scale (a :class:`mtanet.data.FaceAugment`).
        packed: optional uint8 array (N, 112, 112, 3) aligned with the image rows of ``frames`` (see
            :func:`build_packed_cache`), read instead of the jpgs.
    """

    def __init__(self, frames: pd.DataFrame, root: str | os.PathLike[str], au_names: Sequence[str], *,
                 image_size: int = 112, transform: Any = None, packed: np.ndarray | None = None):
        self.frames = frames[frames["image"] != ""].reset_index(drop=True)
        self.root = Path(root)
        self.au_names = tuple(au_names)
        self.image_size = image_size
        self.transform = transform
        self.packed = packed
        if packed is not None and len(packed) != len(self.frames):
            raise ValueError(f"packed cache has {len(packed)} images, the table {len(self.frames)}: rebuild it")
        self.targets, self.masks = label_arrays(self.frames, self.au_names)
        self.paths = self.frames["image"].tolist()

    def __len__(self) -> int:
        return len(self.frames)

    # ------------------------------------------------------------------------------------------- images

    def load_image(self, i: int) -> torch.Tensor:
        """The uint8 (3, H, W) image of row ``i``, from the packed cache or its jpg."""
        if self.packed is not None:
            return torch.from_numpy(np.array(self.packed[i])).permute(2, 0, 1)  # a copy: the memmap is read-only
        return decode_image_file(self.root / self.paths[i])

    def _packed_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """uint8 (B, 3, H, W) of ``rows`` from the packed cache in one read, in its channels-last layout."""
        return torch.from_numpy(np.asarray(self.packed[np.asarray(rows, dtype=np.int64)])).permute(0, 3, 1, 2)

    def load_images(self, rows: Sequence[int]) -> list[torch.Tensor]:
        """The uint8 (3, H, W) images of ``rows``; from the packed cache in one read (one copy, not one per row)."""
        if self.packed is not None:
            return list(self._packed_rows(rows).unbind(0))
        return [decode_image_file(self.root / self.paths[i]) for i in rows]

    def _stacked(self, rows: Sequence[int]) -> torch.Tensor | None:
        """uint8 (B, 3, H, W) of ``rows``, or ``None`` when their jpgs differ in size (each is then resized alone)."""
        if self.packed is not None:
            return self._packed_rows(rows)
        decoded = self.load_images(rows)
        if len({tuple(im.shape) for im in decoded}) > 1:
            return None
        return torch.stack(decoded)

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """Float (B, 3, H, W) images at ``image_size`` (bilinear, antialiased; untouched when already that size).

        The last step of every path, an item's (as a batch of one) and a batch's: one kernel, the same numbers.
        """
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images

    # ------------------------------------------------------------------------------------------- labels

    def labels(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Targets and masks of ``rows`` as batched tensors keyed by task (what collating the items gives)."""
        rows = np.asarray(rows, dtype=np.int64)
        targets = {t: torch.from_numpy(self.targets[t][rows]) for t in ("va", "au", "expr")}
        masks = {t: torch.from_numpy(self.masks[t][rows]) for t in TASKS}
        return targets, masks

    # ------------------------------------------------------------------------------------------- items and batches

    def __getitem__(self, i: int):
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        image = self._resized(image.float().div_(255.0)[None])[0]
        targets = {"va": torch.from_numpy(self.targets["va"][i]), "au": torch.from_numpy(self.targets["au"][i]),
                   "expr": torch.tensor(self.targets["expr"][i])}
        masks = {t: torch.tensor(bool(self.masks[t][i])) for t in TASKS}
        return image, targets, masks

    def item(self, i: int, key: Sequence[int] | None = None):
        """Item ``i``, the transform first reseeded from ``key`` when one is given (``transform.reseed(key)``)."""
        if key is not None and self.transform is not None:
            self.transform.reseed(key)
        return self[i]

    def batch(self, rows: Sequence[int], keys: Sequence[Sequence[int]] | None = None):
        """Items ``rows`` already collated: ``(images (B, 3, S, S), targets, masks)``, equal to collating them.

        ``keys``, one per row, reseed the transform before each item (see :meth:`item`), as the trainer does with
        :class:`mtanet.data.FaceAugment`: the batch then equals ``[self.item(r, k) for r, k in zip(rows, keys)]``
        collated.

        This is where every batch is assembled. Without a transform the scaling and resizing run once for the whole
        batch (on the packed cache's channels-last layout, the per-item path's kernel, so the numbers are the same bit
        for bit; tested). With keys and a transform that augments a batch at once (``transform.batch(images, keys)``,
        float in [0, 1], as FaceAugment's), the crops run per image and the float arithmetic once for the batch. With
        another transform, or jpgs of different sizes (each is resized on its own), the items are collated one by one.
        """
        images = None
        if self.transform is None:
            stacked = self._stacked(rows)
            if stacked is not None:
                images = stacked.float().div_(255.0)
        elif keys is not None and callable(getattr(self.transform, "batch", None)):
            images = self.transform.batch(self.load_images(rows), keys)
        if images is None:
            keys = keys if keys is not None else [None] * len(rows)
            return default_collate([self.item(i, key) for i, key in zip(rows, keys)])
        return (self._resized(images).contiguous(), *self.labels(rows))


def packed_cache_key(dataset: FrameDataset) -> str:
    """A name for the packed cache of ``dataset`` that changes whenever its images may have: a digest of the root's
    resolved path and, image by image in row order, the relative path, size, modification time (ns) and inode.

    So a cache is reused only for the very same files: an image rewritten in place (new mtime), replaced by another
    file (new inode), or another root with the same layout (another path) gets a new cache, never old pixels. Reading
    the pixels themselves would cost most of what the cache saves; file metadata is read in seconds.

    Raises:
        DataFormatError: an image of the table is missing or cannot be read.
    """
    digest = hashlib.sha256(str(dataset.root.resolve()).encode() + b"\0")
    for rel in dataset.paths:
        try:
            st = os.stat(dataset.root / rel)
        except OSError as err:
            raise DataFormatError(dataset.root / rel, None, f"cannot read image: {err.strerror}") from None
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return digest.hexdigest()[:20]


def build_packed_cache(dataset: FrameDataset, path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every image of ``dataset`` once into a uint8 memory-mapped ``.npy`` (N, H, W, 3) at ``path``.

    A later call with the same path and row count opens the existing file: name the file after
    :func:`packed_cache_key`, so that a cache of other images is never reused. The file is written to a temporary name
    of this call and renamed (:func:`mtanet.runtime.atomic_path`), so an interrupted build never leaves a half-filled
    cache that looks complete, and two processes building the same cache at once (sweep runs side by side) each write
    a whole file, of which the rename keeps one of the identical results.
    """
    path = Path(path)
    if path.exists():
        cache = np.load(path, mmap_mode="r")
        if len(cache) == len(dataset):
            return cache
    path.parent.mkdir(parents=True, exist_ok=True)
    first = decode_image_file(dataset.root / dataset.paths[0]) if len(dataset) else None
    h, w = (first.shape[1], first.shape[2]) if first is not None else (112, 112)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(dataset), h, w, 3))
        if hasattr(os, "posix_fallocate"):  # reserve the disk now: a full disk is an OSError here, not a SIGBUS later
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        for i, rel in enumerate(dataset.paths):
            img = decode_image_file(dataset.root / rel)
            if img.shape[1:] != (h, w):
                raise DataFormatError(dataset.root / rel, None,
                                      f"image is {tuple(img.shape[1:])}, the cache holds {(h, w)}")
            out[i] = img.permute(1, 2, 0).numpy()
        out.flush()
        del out
    return np.load(path, mmap_mode="r")
