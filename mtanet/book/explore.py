"""What only the data-exploration chapter computes: decoded face grids and the raw-pixel baseline.

The frame-table statistics the chapter plots are library code, in :mod:`mtanet.data.stats`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mtanet import metrics
from mtanet.data import decode_image_file, label_arrays
from mtanet.tasks import TASKS

__all__ = ["load_images", "pixel_baseline", "pixel_features"]


def load_images(root: str | os.PathLike[str], rel_paths: Sequence[str], size: int | None = None) -> np.ndarray:
    """Decode jpgs to an (N, H, W, 3) uint8 array (optionally resized to ``size``, in batches)."""
    if not len(rel_paths):
        return np.zeros((0, size or 112, size or 112, 3), np.uint8)
    images = torch.stack([decode_image_file(Path(root) / rel) for rel in rel_paths])
    if size is not None and images.shape[-1] != size:
        chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
                  for chunk in images.split(512)]
        images = torch.cat(chunks).round().clamp(0, 255).byte()
    return images.permute(0, 2, 3, 1).numpy()


def pixel_features(root: str | os.PathLike[str], frames: pd.DataFrame, side: int = 32) -> np.ndarray:
    """Raw-pixel features: grayscale, downsampled to ``side`` x ``side``, flattened, in [0, 1]."""
    images = load_images(root, frames["image"].tolist(), size=side).astype(np.float32) / 255.0
    gray = images @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return gray.reshape(len(frames), -1)


def pixel_baseline(root: str | os.PathLike[str], train: pd.DataFrame, val: pd.DataFrame, au_names: Sequence[str],
                   *, num_expressions: int = 7, side: int = 32, max_frames: int = 3000, alpha: float = 100.0,
                   seed: int = 0) -> dict[str, dict]:
    """Linear models on raw pixels, scored on validation with the ABAW 2020 scores.

    Linear least-squares models (closed form, so fast and free of convergence issues): ridge regression for
    valence-arousal (clipped to [-1, 1]), a ridge classifier for expressions, and a ridge classifier per AU (its
    decision squashed to a probability, so 0.5 is the decision boundary). Each task trains on up to ``max_frames`` of its labeled training frames with images
    (subsampled with ``seed``) and is scored on up to ``max_frames`` validation frames. This is the floor that shows
    the data is not trivially easy: a CNN should beat it by a wide margin.
    """
    rng = np.random.default_rng(seed)
    results: dict[str, dict] = {}
    chosen: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    features: dict[str, np.ndarray] = {}
    for split, frames in (("train", train), ("val", val)):
        with_image = frames[frames["image"] != ""]
        targets, masks = label_arrays(with_image, au_names)
        for task in TASKS:
            idx = np.flatnonzero(masks[task])
            if len(idx) > max_frames:
                idx = np.sort(rng.choice(idx, max_frames, replace=False))
            chosen[split, task] = idx, targets[task][idx]
        # decode each frame once, whichever tasks selected it
        needed = np.unique(np.concatenate([chosen[split, t][0] for t in TASKS]))
        x = np.zeros((len(with_image), side * side), dtype=np.float32)
        x[needed] = pixel_features(root, with_image.iloc[needed], side)
        features[split] = x
    for task in TASKS:
        parts = {split: (features[split][chosen[split, task][0]], chosen[split, task][1]) for split in ("train", "val")}
        (x_train, y_train), (x_val, y_val) = parts["train"], parts["val"]
        if len(x_train) == 0 or len(x_val) == 0:
            continue
        if task == "va":
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_train, y_train)
            results[task] = metrics.va_score(y_val, np.clip(model.predict(x_val), -1, 1))
        elif task == "expr":
            model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha)).fit(x_train, y_train.astype(int))
            scores = np.full((len(x_val), num_expressions), -1e9)  # classes unseen in training never win
            decision = model.decision_function(x_val)
            scores[:, model.classes_] = decision if decision.ndim == 2 else np.stack([-decision, decision], 1)
            results[task] = metrics.expr_score(y_val.astype(int), scores, num_classes=scores.shape[1])
        else:
            # one least-squares classifier per AU on {-1, +1} targets; a positive decision means present
            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_train, 2.0 * y_train - 1.0)
            probs = 1.0 / (1.0 + np.exp(-4.0 * model.predict(x_val)))
            results[task] = metrics.au_score(y_val.astype(int), probs)
    return results
