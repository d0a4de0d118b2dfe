"""Aff-Wild2 (real or synthetic) as one frame table, and that table fed to a model.

- :mod:`mtanet.data.table`: the reader. :func:`load_frames` / :func:`read_split` read a root in the ABAW layout into
  one pandas table, a row per (name, frame); problems raise :class:`DataFormatError` naming file and line, or are
  counted in a :class:`LoadReport`.
- :mod:`mtanet.data.dataset`: :class:`FrameDataset` (images and labels as tensors, item by item or a batch at once)
  and :func:`build_packed_cache` (named after :func:`packed_cache_key`).
- :mod:`mtanet.data.sampler`: :class:`TaskBalancedBatchSampler`, batches in which every task has labels.
- :mod:`mtanet.data.augment`: :class:`FaceAugment`, reproducible augmentation of the crops.
- :mod:`mtanet.data.loading`: the DataLoader adapters that fetch whole batches (:class:`KeyedFrames`,
  :class:`BatchedFrames`, :class:`KeyedBatches`, :func:`collate_batched`) and :class:`FrameLoader`, the DataLoader
  that raises a worker's error as itself.
"""

from __future__ import annotations

from mtanet.data.augment import FaceAugment
from mtanet.data.dataset import FrameDataset, build_packed_cache, packed_cache_key
from mtanet.data.loading import (
    BatchedFrames,
    FrameLoader,
    KeyedBatches,
    KeyedFrames,
    WorkerFailure,
    collate_batched,
)
from mtanet.data.sampler import TaskBalancedBatchSampler
from mtanet.data.table import (
    ANNOTATION_DIR,
    IMAGE_DIR,
    SKIP_KINDS,
    SPLITS,
    DataFormatError,
    FrameTable,
    LoadReport,
    annotation_fingerprint,
    decode_image_file,
    detect_edition,
    image_path,
    label_arrays,
    load_frames,
    parse_annotation_text,
    read_annotation_file,
    read_split,
    video_of,
)

__all__ = [
    "SPLITS",
    "IMAGE_DIR",
    "ANNOTATION_DIR",
    "SKIP_KINDS",
    "DataFormatError",
    "LoadReport",
    "FrameTable",
    "detect_edition",
    "parse_annotation_text",
    "read_annotation_file",
    "image_path",
    "video_of",
    "read_split",
    "load_frames",
    "annotation_fingerprint",
    "label_arrays",
    "decode_image_file",
    "FrameDataset",
    "build_packed_cache",
    "packed_cache_key",
    "TaskBalancedBatchSampler",
    "FaceAugment",
    "KeyedFrames",
    "BatchedFrames",
    "KeyedBatches",
    "collate_batched",
    "FrameLoader",
    "WorkerFailure",
]
