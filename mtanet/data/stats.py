"""Statistics of a frame table: labeled frames per task and split, label combinations, class and AU frequencies,
AU co-occurrence, sequence lengths, and a sample of frames to show.

Every function takes frame tables from :func:`mtanet.data.load_frames` and returns a DataFrame or a Series, so the
numbers the data chapter shows are tested like the rest of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mtanet.data.table import label_arrays
from mtanet.tasks import TASKS

__all__ = [
    "au_cooccurrence",
    "au_prevalence",
    "expression_distribution",
    "label_masks",
    "sample_rows",
    "sequence_lengths",
    "split_summary",
    "task_combinations",
]


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
