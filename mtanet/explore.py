"""Summaries of a frame table for the data-exploration chapter (the chapter only plots what these return).

Every function takes frame tables from :func:`mtanet.data.load_frames` and returns a DataFrame or arrays, so the
numbers the book shows are tested like the rest of the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mtanet.data import decode_image_file, label_arrays
from mtanet.tasks import TASKS


def label_masks(frames: pd.DataFrame, au_names: Sequence[str]) -> pd.DataFrame:
    """One bool column per task: is this frame labeled for it."""
    _, masks = label_arrays(frames, au_names)
    return pd.DataFrame(masks, index=frames.index)


def split_summary(tables: dict[str, pd.DataFrame], au_names: Sequence[str]) -> pd.DataFrame:
    """Names (videos per person), labeled frames and labeled frames with an image, per task and split."""
    rows = []
    for split, frames in tables.items():
        masks = label_masks(frames, au_names)
        has_image = frames["image"] != ""
        for task in TASKS:
            labeled = masks[task]
            rows.append({"task": task, "split": split, "names": frames.loc[labeled, "name"].nunique(),
                         "labeled_frames": int(labeled.sum()), "labeled_with_image": int((labeled & has_image).sum())})
    return pd.DataFrame(rows).set_index(["task", "split"])


def task_combinations(frames: pd.DataFrame, au_names: Sequence[str]) -> pd.Series:
    """How many frames carry each combination of task labels (e.g. ``va+expr``); ``none`` for image-only rows."""
    masks = label_masks(frames, au_names)
    keys = masks.apply(lambda r: "+".join(t for t in TASKS if r[t]) or "none", axis=1)
    return keys.value_counts()


def expression_distribution(frames: pd.DataFrame, expr_names: Sequence[str]) -> pd.Series:
    """Labeled frames per expression class, in header order (classes never seen count 0)."""
    labeled = frames["expression"][frames["expression"] >= 0].to_numpy()
    counts = np.bincount(labeled, minlength=len(expr_names))
    return pd.Series(counts, index=list(expr_names), name="frames")


def au_prevalence(frames: pd.DataFrame, au_names: Sequence[str]) -> pd.Series:
    """Share of AU-labeled frames on which each AU is present."""
    au = frames[list(au_names)].to_numpy()
    labeled = au[(au >= 0).all(axis=1)]
    if len(labeled) == 0:
        return pd.Series(np.nan, index=list(au_names))
    return pd.Series(labeled.mean(axis=0), index=list(au_names), name="prevalence")


def au_cooccurrence(frames: pd.DataFrame, au_names: Sequence[str]) -> pd.DataFrame:
    """P(column AU present | row AU present) over AU-labeled frames; NaN for an AU that never occurs."""
    au = frames[list(au_names)].to_numpy()
    labeled = au[(au >= 0).all(axis=1)].astype(float)
    both = labeled.T @ labeled
    present = np.diag(both)
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = both / present[:, None]
    return pd.DataFrame(conditional, index=list(au_names), columns=list(au_names))


def sequence_lengths(frames: pd.DataFrame) -> pd.DataFrame:
    """Per name: frames (last frame number), frames with an image, and the share of frames without a face."""
    g = frames.groupby("name", sort=True)
    out = pd.DataFrame({"frames": g["frame"].max(), "images": g["image"].apply(lambda s: int((s != "").sum()))})
    out["no_face_share"] = 1.0 - out["images"] / out["frames"]
    return out


def sample_rows(frames: pd.DataFrame, n: int, *, seed: int = 0, au_names: Sequence[str] = ()) -> pd.DataFrame:
    """``n`` frames with an image, spread over names, preferring frames labeled for several tasks."""
    with_image = frames[frames["image"] != ""]
    if with_image.empty:
        return with_image
    masks = label_masks(with_image, au_names) if au_names else None
    weight = masks.sum(axis=1).to_numpy() + 1.0 if masks is not None else np.ones(len(with_image))
    rng = np.random.default_rng(seed)
    take = rng.choice(len(with_image), size=min(n, len(with_image)), replace=False, p=weight / weight.sum())
    return with_image.iloc[np.sort(take)]


def load_images(root: str | os.PathLike[str], rel_paths: Sequence[str], size: int | None = None) -> np.ndarray:
    """Decode jpgs to an (N, H, W, 3) uint8 array (optionally resized to ``size``, in batches)."""
    import torch
    import torch.nn.functional as F

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
    from sklearn.linear_model import Ridge, RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mtanet import metrics

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
