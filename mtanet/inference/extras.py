"""What a model carries besides its weights, read the same way by prediction and by export.

A :func:`~mtanet.models.save_checkpoint` file (or an exported ONNX model's metadata) may say which AU and expression
names its heads predict, the tuned per-AU decision thresholds, the alignment template and the crop side it was
trained at. :func:`checkpoint_extras` reads them, :func:`label_names` fills in the names it does not carry, and
:func:`resolve_au_thresholds` decides which thresholds apply and says where they came from. Both
:class:`mtanet.inference.predictor.Predictor` and :func:`mtanet.inference.onnx.export_checkpoint` use these, so the
two never disagree and never import each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtanet.errors import ConfigError
from mtanet.models import MTANet, model_from_checkpoint, read_checkpoint
from mtanet.tasks import AU_NAMES_2020, AU_NAMES_2021, EDITIONS, EXPR_NAMES_2020, EXPR_NAMES_2022

__all__ = [
    "CHECKPOINT_EXTRAS",
    "CROP_SIZE",
    "DEFAULT_AU_THRESHOLD",
    "au_threshold_values",
    "checkpoint_extras",
    "label_names",
    "load_checkpoint",
    "resolve_au_thresholds",
]

#: Keys of a checkpoint's extra dict that prediction reads (all optional). ``image_size`` may also come from the
#: ``train_config`` dict that :mod:`mtanet.train` saves: the side the model was trained at (crops are resized to it).
CHECKPOINT_EXTRAS: tuple[str, ...] = (
    "au_thresholds", "au_names", "expr_names", "edition", "align_template", "image_size")

#: The AU decision threshold of a model that carries no tuned ones.
DEFAULT_AU_THRESHOLD = 0.5

#: Side of the aligned face crops (Aff-Wild2's ``cropped_aligned``), and the model input side unless it says another.
CROP_SIZE = 112


def checkpoint_extras(path: str | os.PathLike) -> dict[str, Any]:
    """The prediction-related extras of a :func:`~mtanet.models.save_checkpoint` file (the keys of
    :data:`CHECKPOINT_EXTRAS` that are present), read without building the model (tensors memory-mapped), once the
    file's digest matches (:func:`mtanet.models.read_checkpoint`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file cannot be read, was changed after it was written, or is not an MTANet checkpoint.
    """
    return _extras(read_checkpoint(path, mmap=True))


def _extras(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    extras = {k: ckpt[k] for k in CHECKPOINT_EXTRAS if k in ckpt}
    train_config = ckpt.get("train_config")
    if "image_size" not in extras and isinstance(train_config, Mapping) and train_config.get("image_size"):
        extras["image_size"] = int(train_config["image_size"])
    return extras


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[MTANet, dict[str, Any]]:
    """An :func:`~mtanet.models.load_model` model (eval mode) and :func:`checkpoint_extras` of its file, read once
    (its digest checked once)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, map_location), _extras(ckpt)


def label_names(num_outputs: Mapping[str, int], extras: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """AU and expression names: from the checkpoint when it says, else the ABAW edition that has that many."""
    k, c = num_outputs.get("au", 0), num_outputs.get("expr", 0)
    edition = EDITIONS.get(str(extras.get("edition", "")))
    au = list(extras.get("au_names") or (edition.au_names if edition else
                                          {8: AU_NAMES_2020, 12: AU_NAMES_2021}.get(k, [f"AU_{i}" for i in range(k)])))
    expr = list(extras.get("expr_names") or (edition.expr_names if edition else {
        7: EXPR_NAMES_2020, 8: EXPR_NAMES_2022}.get(c, [f"class_{i}" for i in range(c)])))
    if len(au) != k or len(expr) != c:
        raise ConfigError(f"label names ({len(au)} AUs, {len(expr)} expressions) do not fit the model's heads "
                          f"({k} AU outputs, {c} expression outputs)")
    return au, expr


def au_threshold_values(value: Any, au_names: Sequence[str]) -> np.ndarray:
    """Per-AU decision thresholds from a list, array, tensor or ``{AU name: threshold}`` dict (one value is
    repeated for every AU); each must lie in (0, 1)."""
    if isinstance(value, Mapping):
        missing = [n for n in au_names if n not in value]
        if missing:
            raise ConfigError(f"au_thresholds has no value for {missing}")
        value = [value[n] for n in au_names]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(len(au_names), float(arr[0]))
    if arr.size != len(au_names) or not np.all((arr > 0) & (arr < 1)):
        raise ConfigError(f"au_thresholds must be {len(au_names)} values in (0, 1), got {arr.tolist()}")
    return arr


def resolve_au_thresholds(au_names: Sequence[str], override: Any = None,
                          stored: Any = None) -> tuple[np.ndarray, str]:
    """The AU thresholds that apply and where they came from.

    ``override`` (given by the caller) wins, source ``"argument"``; else ``stored`` (the checkpoint's or the ONNX
    model's ``au_thresholds``), source ``"checkpoint"``; else :data:`DEFAULT_AU_THRESHOLD` for every AU, with a
    source that starts with ``"default"`` and says the model carries no tuned thresholds.
    """
    if override is not None:
        return au_threshold_values(override, au_names), "argument"
    if stored is not None:
        return au_threshold_values(stored, au_names), "checkpoint"
    return (np.full(len(au_names), DEFAULT_AU_THRESHOLD),
            f"default {DEFAULT_AU_THRESHOLD} (the model carries no tuned au_thresholds)")
