"""A model on a frame table: batched predictions, the scores of the data's ABAW edition, and the challenge's
submission files.

The trainer validates with :func:`predict_dataset` and :func:`score_predictions` (which scores by
:func:`mtanet.metrics.edition_scores`, the rules of the edition the frames were read as); ``mtanet evaluate`` is
:func:`evaluate`: a checkpoint scored on a split, its predictions written in the submission format, or the
submission of a test set's listed videos, which have no labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mtanet import metrics
from mtanet.data import (
    ANNOTATION_DIR,
    IMAGE_DIR,
    SPLITS,
    FrameDataset,
    build_packed_cache,
    detect_edition,
    image_path,
    label_arrays,
    packed_cache_key,
    read_annotation_file,
    read_split,
    video_of,
)
from mtanet.data.loading import BatchedFrames, FrameLoader, collate_batched
from mtanet.errors import ConfigError, DataFormatError, OutputExistsError
from mtanet.models import model_from_checkpoint, probabilities, read_checkpoint
from mtanet.provenance import input_summary, provenance
from mtanet.runtime import json_clean, resolve_device, usable_cores, write_json
from mtanet.tasks import EDITIONS, TASKS, Edition

__all__ = ["predict_dataset", "predict_frames", "frames_edition", "score_predictions", "headline", "train_label_stats",
           "write_submission", "submission_paths", "evaluate", "read_names_list", "listed_frames", "held_out_folds",
           "video_intervals", "va_agreement", "SCORES_FILE"]

#: The summary :func:`evaluate` writes beside the submission files; its ``files`` lists them.
SCORES_FILE = "scores.json"
#: Folders :func:`write_submission` may write (the task folders of every edition).
_SUBMISSION_FOLDERS = frozenset(d for ed in EDITIONS.values() for d in ed.task_dirs.values())


# --------------------------------------------------------------------------------------------------- protocol


def held_out_folds(frames: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Split one held-out table into two folds by video: ``select`` (choose checkpoints, thresholds) and ``report``
    (score once, with those choices).

    For real Aff-Wild2, whose test labels are not public, this is how a score is reported on data nothing was tuned
    on: the validation videos are split in two. A video goes to ``report`` when the first byte of the SHA-256 of its
    name is odd, so the folds depend on the names alone (not on their order, the number of videos or a seed) and
    both people of a two-person video land in the same fold.
    """
    videos = frames["video"].drop_duplicates()
    odd = {v: hashlib.sha256(str(v).encode()).digest()[0] % 2 == 1 for v in videos}
    report = frames["video"].map(odd).astype(bool).to_numpy()
    return {"select": frames[~report], "report": frames[report]}


# --------------------------------------------------------------------------------------------------- prediction


def _eval_loader(dataset: FrameDataset, indices: np.ndarray, batch_size: int, num_workers: int, pin: bool):
    batches = [indices[i: i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    # a generator of its own, so predicting never draws from (and shifts) the global torch RNG
    return FrameLoader(BatchedFrames(dataset), batch_sampler=batches, collate_fn=collate_batched,
                       num_workers=num_workers, pin_memory=pin, generator=torch.Generator().manual_seed(0))


def predict_dataset(model, dataset: FrameDataset, indices: np.ndarray, *, batch_size: int, device: torch.device,
                    num_workers: int = 0, amp: bool = False, channels_last: bool = False, progress: bool = False,
                    desc: str = "predict") -> dict[str, np.ndarray]:
    """Outputs of ``model`` on the items ``indices`` of a FrameDataset: VA values, AU and EXPR probabilities."""
    tasks = list(model.heads.keys())
    out: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    was_training = model.training
    model.eval()
    loader = _eval_loader(dataset, indices, batch_size, num_workers, device.type == "cuda")
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for images, _, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                pred = probabilities({t: p.float() for t, p in model(images).items()})
                for t in tasks:
                    out[t].append(pred[t].cpu().numpy())
    finally:
        model.train(was_training)
    widths = {t: model.heads[t].out_features for t in tasks}
    return {t: np.concatenate(v) if v else np.zeros((0, widths[t]), np.float32) for t, v in out.items()}


def _au_columns(frames: pd.DataFrame) -> list[str]:
    return [c for c in frames.columns if re.fullmatch(r"AU\d+", str(c))]


def predict_frames(model, frames: pd.DataFrame, root: str | os.PathLike[str], *, image_size: int = 112,
                   batch_size: int = 64, device=None, num_workers: int = 0, amp: bool | None = None,
                   channels_last: bool | None = None, packed: np.ndarray | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Batched inference over a frame table.

    Args:
        model: an :class:`mtanet.models.MTANet` (its mode is restored afterwards).
        frames: a frame table from :func:`mtanet.data.load_frames` (any subset of its rows).
        root: the dataset root the ``image`` paths are relative to.
        image_size: input side the model was trained at (a trainer checkpoint's ``train_config["image_size"]``).
        batch_size: images per forward pass.
        device: where to run; default: where the model's parameters are.
        num_workers: data loader processes decoding the jpgs.
        amp, channels_last: bfloat16 autocast and channels-last input; ``None``: on when ``device`` is CUDA.
        packed: optional uint8 cache aligned with the image rows (:func:`mtanet.data.build_packed_cache`).
        cache_dir: a folder for that cache instead: built on the first call for these very images (named by
            :func:`mtanet.data.packed_cache_key`), reused by every later call, so scoring many checkpoints on one split
            (a sweep) decodes its jpgs once.
        progress: show a progress bar.

    Returns:
        ``{task: array}`` for each head of the model, aligned with the rows of ``frames``: ``va`` (N, 2) in [-1, 1],
        ``au`` (N, K) sigmoid probabilities, ``expr`` (N, C) softmax probabilities; NaN on rows without an image.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cuda = device.type == "cuda"
    dataset = FrameDataset(frames, root, _au_columns(frames), image_size=image_size, packed=packed)
    if packed is None and cache_dir is not None and len(dataset):
        dataset.packed = build_packed_cache(dataset, Path(cache_dir) / f"frames-{packed_cache_key(dataset)}.npy")
    pred = predict_dataset(model, dataset, np.arange(len(dataset)), batch_size=batch_size, device=device,
                           num_workers=num_workers, amp=cuda if amp is None else amp,
                           channels_last=cuda if channels_last is None else channels_last, progress=progress)
    has_image = (frames["image"] != "").to_numpy()
    out = {}
    for t, p in pred.items():
        full = np.full((len(frames), p.shape[1]), np.nan, dtype=np.float32)
        full[has_image] = p
        out[t] = full
    return out


# --------------------------------------------------------------------------------------------------- scores


def frames_edition(frames: pd.DataFrame, preds: Mapping[str, np.ndarray] | None = None) -> str:
    """The edition a frame table was read as (``frames.attrs["edition"]``, set by :func:`mtanet.data.read_split`);
    for a table that lost its attrs, the edition whose label set has the table's AU columns and the expression
    head's width (8 AUs: 2020; 12 AUs and 8 expressions: 2022; else 2021)."""
    name = frames.attrs.get("edition") if hasattr(frames, "attrs") else None
    if name:
        return str(name)
    n_au = len(_au_columns(frames))
    n_expr = preds["expr"].shape[1] if preds is not None and "expr" in preds else None
    if n_au == len(EDITIONS["2020"].au_names) or (n_au == 0 and n_expr in (None, 7)):
        return "2020"
    return "2022" if n_expr == len(EDITIONS["2022"].expr_names) else "2021"


def _score_targets(frames: pd.DataFrame) -> dict[str, np.ndarray | None]:
    """Each task's labels as the scores read them (sentinels kept: the score functions know them); ``au`` is None
    for a table without AU columns."""
    au_cols = _au_columns(frames)
    return {"va": frames[["valence", "arousal"]].to_numpy(np.float64),
            "au": frames[au_cols].to_numpy(np.int64) if au_cols else None,
            "expr": frames["expression"].to_numpy(np.int64)}


def score_predictions(frames: pd.DataFrame, preds: Mapping[str, np.ndarray], *,
                      thresholds: Sequence[float] | np.ndarray | None = None,
                      require_image: bool = True, edition: str | Edition | None = None) -> dict[str, Any]:
    """Scores of predictions aligned with the rows of ``frames``, as the data's edition defines them
    (:func:`mtanet.metrics.edition_scores`).

    Scored rows are those with a label for the task and (``require_image=True``, as in training) an image; with
    ``require_image=False`` every labeled row is scored, which needs predictions on face-less rows too (see
    :func:`write_submission`'s fill rule).

    Args:
        edition: the edition whose rules score; default :func:`frames_edition` (the table's own).

    Returns:
        ``edition``, ``rule``, ``scoring`` (the rule in words), ``va``, ``au`` (at 0.5, the headline AU score),
        ``au_tuned`` (the AU score with ``thresholds``, or with per-AU thresholds tuned on these very frames by
        :func:`mtanet.metrics.tune_au_thresholds` when ``thresholds`` is None: optimistic, since tuned and scored
        on the same data), ``expr``, each with its ``edition``; ``combined`` (the edition's combined score: the
        multi-task sum from 2022, the mean of the task scores before) and ``mean`` (the mean of the headline scores
        of the tasks present, in every edition). A task without labeled rows is left out.
    """
    ed = edition if edition is not None else frames_edition(frames, preds)
    keep = (frames["image"] != "").to_numpy() if require_image else np.ones(len(frames), dtype=bool)
    targets = _score_targets(frames)
    masks = {t: keep for t in TASKS}
    out = metrics.edition_scores(ed, preds, targets, masks, au_thresholds=0.5)
    if "au" in out:
        y, p = targets["au"][keep], preds["au"][keep]
        th = metrics.tune_au_thresholds(y, p) if thresholds is None else np.asarray(thresholds, np.float64)
        tuned = metrics.edition_scores(ed, {"au": p}, {"au": y}, au_thresholds=th)["au"]
        out = {**{k: v for k, v in out.items() if k not in ("expr", "mean", "combined")}, "au_tuned": tuned,
               **{k: out[k] for k in ("expr", "mean", "combined") if k in out}}
    return json_clean(out)


def video_intervals(frames: pd.DataFrame, preds: Mapping[str, np.ndarray], *,
                    thresholds: float | Sequence[float] | np.ndarray = 0.5, n_boot: int = 200, alpha: float = 0.05,
                    seed: int = 0, edition: str | Edition | None = None) -> dict[str, dict[str, Any]]:
    """A video-level bootstrap interval of each task's headline score (:func:`mtanet.metrics.bootstrap_ci`).

    Which videos happen to form the evaluation split moves a score about as much as the seed does (frames of one
    video are strongly correlated, so only whole videos are resampled). The rows scored are those
    :func:`score_predictions` scores: a label for the task, an image and a prediction.

    Returns:
        ``{task: {"score", "low", "high", "n_boot", "n_skipped", "videos"}}`` for every task with predictions and
        labeled rows; ``score`` equals :func:`score_predictions`'s headline (the AU score at ``thresholds``).
    """
    ed = edition if edition is not None else frames_edition(frames, preds)
    targets = _score_targets(frames)
    _, masks = label_arrays(frames, _au_columns(frames))
    has_image = (frames["image"] != "").to_numpy()
    names = frames["name"].to_numpy()
    out: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        if task not in preds or targets[task] is None:
            continue
        pred = np.asarray(preds[task])
        predicted = ~np.isnan(pred.reshape(len(pred), -1)).any(axis=1)
        rows = masks[task] & has_image & predicted
        if not rows.any():
            continue

        def score(t: np.ndarray, p: np.ndarray, task: str = task) -> dict[str, Any]:
            return metrics.edition_scores(ed, {task: p}, {task: t}, au_thresholds=thresholds)[task]

        ci = metrics.bootstrap_ci(score, targets[task][rows], pred[rows], names[rows], n_boot=n_boot, alpha=alpha,
                                  seed=seed)
        out[task] = {**ci, "videos": int(len(np.unique(names[rows])))}
    return json_clean(out)


def va_agreement(frames: pd.DataFrame, va_pred: np.ndarray, noise_free: np.ndarray | None = None) -> pd.DataFrame:
    """Where predicted valence and arousal agree with the labels: over all frames, between videos and within them.

    One row per dimension, columns ``frames``: Pearson r with the annotations over every labelled frame;
    ``noise_free``: r with the noise-free values behind them (the synthetic twin's, when given); ``between_videos``:
    r of the per-video means (which videos run high or low: on new people this is each person's resting state);
    ``within_videos``: median over videos of the r inside each video (the changes a face shows). A network that
    learned its training people's annotation traces agrees with the annotations there more than with the noise-free
    values, and its between-video r drops on new people.

    Args:
        frames: a frame table (its ``name``, ``image``, ``valence``, ``arousal`` columns).
        va_pred: ``(len(frames), 2)`` predictions, NaN where none.
        noise_free: ``(len(frames), 2)`` noise-free values, or None.
    """
    pred = np.asarray(va_pred, dtype=np.float64)
    labels = frames[["valence", "arousal"]].to_numpy(dtype=np.float64)
    rows = (frames["image"] != "").to_numpy() & np.isfinite(labels).all(axis=1) & np.isfinite(pred).all(axis=1)
    names = frames["name"].to_numpy()[rows]
    y, p = labels[rows], pred[rows]
    z = None if noise_free is None else np.asarray(noise_free, dtype=np.float64)[rows]

    def r(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")

    videos = list(dict.fromkeys(names))
    lines = {}
    for j, dim in enumerate(("valence", "arousal")):
        means = np.array([[y[names == v, j].mean(), p[names == v, j].mean()] for v in videos]).reshape(-1, 2)
        within = [r(y[names == v, j], p[names == v, j]) for v in videos]
        lines[dim] = {"frames": r(y[:, j], p[:, j]),
                      "noise_free": float("nan") if z is None else r(z[:, j], p[:, j]),
                      "between_videos": r(means[:, 0], means[:, 1]),
                      "within_videos": float(np.nanmedian(within)) if np.isfinite(within).any() else float("nan"),
                      "videos": len(videos)}
    return pd.DataFrame(lines).T.astype({"videos": int})


def headline(scores: Mapping[str, Any], *, with_edition: bool = False) -> dict[str, Any]:
    """The single numbers of a :func:`score_predictions` dict: ``va``, ``au`` (at 0.5), ``au_tuned``, ``expr``,
    ``mean``; with ``with_edition``, ``edition`` first and ``combined`` (the edition's combined score) last, since
    the numbers of two editions are not comparable (except VA)."""
    out: dict[str, Any] = {"edition": scores.get("edition")} if with_edition else {}
    out.update({k: (scores[k]["score"] if isinstance(scores.get(k), Mapping) else None)
                for k in ("va", "au", "au_tuned", "expr")})
    out["mean"] = scores.get("mean")
    if with_edition:
        out["combined"] = scores["combined"]["score"] if isinstance(scores.get("combined"), Mapping) else None
    return out


def train_label_stats(frames: pd.DataFrame, au_names: Sequence[str], n_expr: int) -> dict[str, Any]:
    """Training-set constants used where a name has no face at all: mean VA, AU prevalence, majority expression."""
    targets, masks = label_arrays(frames, au_names)
    out: dict[str, Any] = {"va_mean": None, "au_prevalence": None, "expr_majority": None}
    if masks["va"].any():
        out["va_mean"] = targets["va"][masks["va"]].mean(axis=0).tolist()
    if masks["au"].any():
        out["au_prevalence"] = targets["au"][masks["au"]].mean(axis=0).tolist()
    if masks["expr"].any():
        out["expr_majority"] = int(np.bincount(targets["expr"][masks["expr"]], minlength=n_expr).argmax())
    return out


# --------------------------------------------------------------------------------------------------- submission


def _fill(values: np.ndarray, has: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Fill rows without a prediction: from the previous row that has one, leading rows from the first one; all
    rows from ``fallback`` when no row has one."""
    if not has.any():
        return np.tile(fallback, (len(values), 1)).astype(np.float32)
    idx = np.where(has, np.arange(len(has)), -1)
    idx = np.maximum.accumulate(idx)  # last row with a prediction at or before each row
    idx[idx < 0] = int(np.argmax(has))  # rows before the first face take the first face's
    return values[idx]


def _submission_names(frames: pd.DataFrame, task: str, split: str) -> list[str]:
    return sorted(frames.loc[frames[f"split_{task}"] == split, "name"].unique())


def submission_paths(frames: pd.DataFrame, tasks: Sequence[str], split: str, edition,
                     lengths: Mapping[str, int] | None = None) -> list[str]:
    """The files :func:`write_submission` writes for ``tasks``, as ``<task folder>/<name>.txt`` relative to its
    ``out_dir``, sorted."""
    return sorted(f"{edition.task_dirs[t]}/{name}.txt" for t in tasks
                  for name in (sorted(lengths) if lengths is not None else _submission_names(frames, t, split)))


def write_submission(frames: pd.DataFrame, preds: Mapping[str, np.ndarray], out_dir: str | os.PathLike[str],
                     root: str | os.PathLike[str], *, split: str = "val", edition=None,
                     au_thresholds: Sequence[float] | float = 0.5,
                     fallback: Mapping[str, Any] | None = None,
                     lengths: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Write per-frame predictions in the ABAW submission format.

    One file per name per task, ``<out_dir>/<task folder>/<name>.txt``, where the task folders are the edition's
    annotation folders (ABAW 2020: ``VA_Set``, ``AU_Set``, ``EXPR_Set``). Each file has the header of the
    annotation files (``valence,arousal``; the edition's AU names, ``AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25`` in 2020;
    ``Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise``) and one line per frame 1..N, where N is the number of
    lines of that name's annotation file for the task: VA as two floats in [-1, 1] (6 decimals), AU as 0/1 per AU
    (probability >= the AU's threshold), EXPR as the index of the most probable class.

    The names written for a task are those whose annotation file of that task lies in ``split``; with ``lengths``
    (a test set's list, which has no annotation files), every name of ``lengths`` for every task, with N its value.

    Fill rule for frames without a face (no jpg, so no prediction): the prediction of the previous frame that has a
    face (forward fill); frames before the first face take the first face's (backward fill). A name without any
    face gets the training-set constants of ``fallback``: mean valence-arousal, the AU prevalences thresholded like
    the predictions, the majority expression.

    Args:
        frames: the frame table of ``split`` (all rows of the names).
        preds: :func:`predict_frames` output aligned with ``frames`` (NaN on rows without an image).
        out_dir: folder to write.
        root: the dataset root (annotation files give N).
        split: the split the names come from.
        edition: an :class:`mtanet.tasks.Edition`; default: detected from ``root``.
        au_thresholds: one threshold or one per AU.
        fallback: ``{"va_mean", "au_prevalence", "expr_majority"}`` (a trainer checkpoint's ``train_label_stats``).
        lengths: ``{name: number of frames}``: write these names with that many lines, reading no annotation.

    Returns:
        ``{task: {"folder", "files", "lines", "filled", "names_without_face", "paths"}}`` (``paths``: the files
        written, relative to ``out_dir``, as :func:`submission_paths` gives them) and ``filled_preds``:
        ``{task: array}`` aligned with ``frames`` with every row filled (rows past N stay NaN).
    """
    ed = edition or detect_edition(root)
    out_dir, root = Path(out_dir), Path(root)
    fallback = dict(fallback or {})
    summary: dict[str, Any] = {}
    filled_preds = {t: np.full_like(p, np.nan, dtype=np.float32) for t, p in preds.items()}
    rows_of = frames.groupby("name", sort=False).indices
    for task, p in preds.items():
        folder = out_dir / ed.task_dirs[task]
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted(lengths) if lengths is not None else _submission_names(frames, task, split)
        width = p.shape[1]
        if task == "va":
            header, fb = "valence,arousal", np.asarray(fallback.get("va_mean") or [0.0, 0.0], np.float32)
        elif task == "au":
            header, fb = ",".join(ed.au_names), np.asarray(fallback.get("au_prevalence") or [0.0] * width,
                                                           np.float32)
            th = np.broadcast_to(np.asarray(au_thresholds, np.float64), (width,))
        else:
            header = ",".join(ed.expr_names)
            fb = np.zeros(width, np.float32)
            fb[int(fallback.get("expr_majority") or 0)] = 1.0
        info = {"folder": ed.task_dirs[task], "files": 0, "lines": 0, "filled": 0, "names_without_face": [],
                "paths": []}
        for name in names:
            if lengths is not None:
                n = int(lengths[name])
            else:
                path = root / "annotations" / ed.task_dirs[task] / ed.split_dirs[split] / f"{name}.txt"
                n = len(read_annotation_file(path, task)[1])
            rows = np.sort(rows_of[name]) if name in rows_of else np.zeros(0, dtype=np.int64)
            f = frames["frame"].to_numpy()[rows]
            inside = f <= n
            rows, f = rows[inside], f[inside]
            values = np.full((n, width), np.nan, np.float32)
            values[f - 1] = p[rows]
            has = np.isfinite(values).all(axis=1)
            full = _fill(values, has, fb)
            filled_preds[task][rows] = full[f - 1]
            if task == "va":
                lines = [f"{v:.6f},{a:.6f}" for v, a in np.clip(full, -1.0, 1.0)]
            elif task == "au":
                lines = [",".join(map(str, r)) for r in (full >= th).astype(np.int64)]
            else:
                lines = [str(int(c)) for c in full.argmax(axis=1)]
            (folder / f"{name}.txt").write_text(header + "\n" + "\n".join(lines) + "\n")
            info["paths"].append(f"{ed.task_dirs[task]}/{name}.txt")
            info["files"] += 1
            info["lines"] += n
            info["filled"] += int((~has).sum())
            if not has.any():
                info["names_without_face"].append(name)
        summary[task] = info
    summary["filled_preds"] = filled_preds
    return summary


# --------------------------------------------------------------------------------------------------- a checkpoint


def evaluate(checkpoint: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None = None,
             split: str = "val", output_dir: str | os.PathLike[str] = "eval", batch_size: int = 64,
             device: str = "auto", num_workers: int = 0, threads: int | None = None,
             au_thresholds: str = "saved", image_size: int | None = None, progress: bool = True,
             names: str | os.PathLike[str] | None = None, edition: str | None = None) -> dict[str, Any]:
    """Score a checkpoint on a split as the data's edition defines it and write its predictions in the submission
    format; or, with ``names``, write the submission of a test set's listed videos, which have no labels.

    Writes ``<output_dir>/scores.json`` and the files of :func:`write_submission` (``VA_Set/``, ``AU_Set/``,
    ``EXPR_Set/`` for ABAW 2020 and 2021; ``VA_Estimation_Challenge/``, ... for 2022+). Scores
    (:func:`score_predictions`, by the rules of the edition of ``data_root``: :func:`mtanet.metrics.edition_scores`)
    come twice: ``scores`` over the labeled frames that have an image (as during training; ``au`` at 0.5,
    ``au_tuned`` with the AU thresholds used for the files), and ``scores_all_frames`` over every labeled frame with
    the filled predictions of the files, which is what the challenge's scorer sees. ``edition`` and ``scoring`` name
    the edition and its rules at the top and inside every score; ``headline`` starts with the edition. ``files``
    lists every submission file written (``VA_Set/<name>.txt``, ...); ``provenance`` is the block of
    :func:`mtanet.provenance.provenance` (checkpoint SHA-256, thresholds, version, commit, device, input).

    Test submissions (``names``, ``split="test"``): ``names`` is a text file with one crop folder name per line
    (``<name>`` or ``<name>,<frames>``; blank lines and lines starting with ``#`` are skipped). Each name's frames are
    read from ``cropped_aligned/<name>/`` alone: no annotation is needed or read. A file gets one line per frame
    1..N, N the line's ``<frames>`` when given (the video's frame count), else the highest frame number with a jpg;
    frames without a jpg (no face) are filled by :func:`write_submission`'s rule: the previous frame's prediction,
    the first face's before it, the training constants for a name without any face. ``scores`` is then ``null``.

    An output folder used before: what an earlier evaluate wrote there (the files its ``scores.json`` lists, and that
    ``scores.json``) is removed just before the new files are written, so the submission folders hold exactly the
    files the new ``scores.json`` lists, never an earlier split's beside them. A folder whose submission folders hold
    any other file, or whose ``scores.json`` lists no files (not written by evaluate, or by a version before the
    list), is refused before anything is computed, and nothing in it is deleted. Files outside the submission folders
    (a training run's checkpoints, say) are never touched. If writing fails, the files of this call are removed:
    the folder then holds no submission at all rather than part of one.

    Args:
        checkpoint: a trainer checkpoint (``best_*.pt``, ``last.pt``) or any :func:`mtanet.models.save_checkpoint`
            file.
        data_root: the Aff-Wild2 root; default: the training run's (``train_config["data_root"]``).
        split: ``"train"``, ``"val"`` or ``"test"`` (``test`` is scored like ``val`` when the root has ``Test_Set``
            annotations; with ``names`` it needs none).
        au_thresholds: ``"saved"`` (the checkpoint's tuned thresholds; 0.5 when it has none) or ``"0.5"``, the
            thresholds that binarise AU predictions in the files and in ``au_tuned``.
        image_size: input side; default: the training run's (112 when unknown).
        threads: torch CPU threads while evaluating (default: all cores); restored afterwards.
        names: the list of test videos (see above); only with ``split="test"``.
        edition: with ``names``, the edition of the files when the root has no annotations to tell it (default:
            the checkpoint's ``edition``, else the one whose label sets have the heads' widths).

    Raises:
        ConfigError: no data root was given and the checkpoint names none; a head that does not fit the data's
            edition; an unknown ``au_thresholds``; ``names`` missing, empty, naming a video without a crop folder,
            twice the same name, or given with a split other than test.
        CheckpointError: the file is not a readable checkpoint.
        DataFormatError: ``split`` has no frame with both an image and a label of one of the checkpoint's tasks
            (its score would be null); the message names the task's annotation folder.
        OutputExistsError: ``output_dir`` holds submission files that no earlier evaluate's ``scores.json`` lists.
    """
    if au_thresholds not in ("saved", "0.5"):
        raise ConfigError(f"au_thresholds must be 'saved' or '0.5', got {au_thresholds!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if names is not None and split != "test":
        raise ConfigError(f"--names lists the videos of a test set: use it with --split test, not {split}")
    if edition is not None and str(edition) not in EDITIONS:
        raise ConfigError(f"edition must be one of {', '.join(EDITIONS)}, got {edition!r}")
    dev = resolve_device(device)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cores())
    try:
        return _evaluate(Path(checkpoint), dev, data_root, split, Path(output_dir), batch_size, num_workers,
                         au_thresholds, image_size, progress, None if names is None else Path(names), edition)
    finally:
        torch.set_num_threads(saved_threads)


def read_names_list(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> dict[str, int | None]:
    """The videos of a test list: ``{name: frames or None}`` in file order (see :func:`evaluate`).

    Raises:
        ConfigError: the file is missing or unreadable, lists no name, lists a name twice, has a line that is not
            ``<name>`` or ``<name>,<frames>`` (frames a positive integer), or names a video without a
            ``cropped_aligned/<name>/`` folder; the message names the file and line.
    """
    path, root = Path(path), Path(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"--names {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--names {path}: cannot be read ({err})") from None
    out: dict[str, int | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, frames = (part.strip() for part in line.partition(","))
        where = f"--names {path}:{number}"
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"{where}: {line!r} is not a video name (one crop folder name per line)")
        n: int | None = None
        if frames:
            if not re.fullmatch(r"\d+", frames) or int(frames) < 1:
                raise ConfigError(f"{where}: the frame count {frames!r} of {name} is not a positive integer")
            n = int(frames)
        if name in out:
            raise ConfigError(f"{where}: {name} is listed twice")
        if not (root / IMAGE_DIR / name).is_dir():
            raise ConfigError(f"{where}: unknown name {name}: {root / IMAGE_DIR / name} is not a folder")
        out[name] = n
    if not out:
        raise ConfigError(f"--names {path}: lists no video name (one crop folder name per line)")
    return out


_JPG_RE = re.compile(r"^(\d{5,})\.jpg$")


def listed_frames(root: str | os.PathLike[str], names: Mapping[str, int | None],
                  edition: Edition) -> tuple[pd.DataFrame, dict[str, int]]:
    """A frame table of the listed videos built from their ``cropped_aligned`` folders alone (every label missing,
    every ``split_*`` ``"test"``), and each name's number of frames: the list's, else the highest jpg number.

    Raises:
        ConfigError: a list's frame count below a jpg's frame number (the list or the folder is wrong).
    """
    root = Path(root)
    pieces, lengths = [], {}
    for name, given in names.items():
        numbers = sorted(int(m.group(1)) for e in os.scandir(root / IMAGE_DIR / name)
                         if (m := _JPG_RE.match(e.name)) and int(m.group(1)) >= 1)
        last = numbers[-1] if numbers else 0
        if given is not None and given < last:
            raise ConfigError(f"--names gives {name} {given} frames but {IMAGE_DIR}/{name} holds frame {last}")
        n = given if given is not None else last
        lengths[name] = n
        if n == 0:
            continue  # no jpg and no count: an empty file would be written; see evaluate's check
        has = np.zeros(n, dtype=bool)
        has[np.asarray(numbers, dtype=np.int64) - 1] = True
        frame = np.arange(1, n + 1)
        pieces.append(pd.DataFrame({
            "name": name, "video": video_of(name), "frame": frame,
            "image": [image_path(name, int(f)) if h else "" for f, h in zip(frame, has)]}))
    frames = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(
        {"name": pd.Series(dtype=object), "video": pd.Series(dtype=object), "frame": pd.Series(dtype=np.int64),
         "image": pd.Series(dtype=object)})
    for t in TASKS:
        frames[f"split_{t}"] = "test"
    frames["valence"] = np.nan
    frames["arousal"] = np.nan
    frames["expression"] = np.int16(-1)
    for au in edition.au_names:
        frames[au] = np.int16(-1)
    frames.attrs["edition"] = edition.name
    frames.attrs["split"] = "test"
    return frames, lengths


def _listed_edition(root: Path, ckpt: Mapping[str, Any], num_outputs: Mapping[str, int],
                    edition: str | None) -> Edition:
    """The edition of a test submission: the root's when it has annotations, else ``edition``, the checkpoint's,
    or the one whose label sets have the heads' widths."""
    if (root / ANNOTATION_DIR).is_dir():
        return detect_edition(root)
    name = edition or ckpt.get("edition")
    if name in EDITIONS:
        return EDITIONS[name]
    for ed in EDITIONS.values():
        if all(ed.num_outputs[t] == n for t, n in num_outputs.items() if t != "va"):
            return ed
    raise ConfigError(f"no ABAW edition has heads {dict(num_outputs)}; pass the edition (--edition)")


def _provenance(checkpoint: Path, ckpt: Mapping[str, Any], dev: torch.device, th: np.ndarray, th_source: str,
                root: Path, **counts: Any) -> dict[str, Any]:
    return provenance(checkpoint=checkpoint, checkpoint_digest=ckpt.get("digest"), runtime="torch", device=str(dev),
                      detector=None, alignment={"template": "the dataset's cropped_aligned crops (no detection)"},
                      au_thresholds=th, au_threshold_source=th_source,
                      input=input_summary(root, kind="dataset root", **counts))


def _thresholds(ckpt: Mapping[str, Any], au_thresholds: str, edition: Edition) -> tuple[np.ndarray, str]:
    if au_thresholds == "saved" and ckpt.get("au_thresholds") is not None:
        return np.asarray(ckpt["au_thresholds"], np.float64), "checkpoint (tuned on validation)"
    why = "asked for (--au-thresholds 0.5)" if au_thresholds == "0.5" else "the checkpoint carries no tuned ones"
    return np.full(len(edition.au_names), 0.5), f"0.5 for every AU: {why}"


def _evaluate(checkpoint: Path, dev: torch.device, data_root, split: str, out: Path, batch_size: int,
              num_workers: int, au_thresholds: str, image_size: int | None, progress: bool,
              names_file: Path | None, edition: str | None) -> dict[str, Any]:
    previous = _previous_outputs(out)  # refused here, before minutes of predicting
    ckpt = read_checkpoint(checkpoint)  # checked against its digest once, then built from the same bytes
    model = model_from_checkpoint(ckpt, map_location=dev)
    train_cfg = ckpt.get("train_config") or {}
    root = data_root or train_cfg.get("data_root")
    if not root:
        raise ConfigError(f"{checkpoint} names no data root; pass data_root (--data-root) to score it")
    root = Path(root).expanduser()
    size = image_size or train_cfg.get("image_size", 112)
    if names_file is not None:
        return _submit_listed(checkpoint, ckpt, model, dev, root, names_file, edition, out, previous, size,
                              batch_size, num_workers, au_thresholds, progress)
    table = read_split(root, split)
    frames = table.frames
    for t, n in model.config["num_outputs"].items():
        if n != table.edition.num_outputs[t]:
            raise ConfigError(f"the checkpoint's {t} head has {n} outputs, the data's edition "
                              f"{table.edition.name} {table.edition.num_outputs[t]}")
    _, masks = label_arrays(frames, _au_columns(frames))
    has_image = (frames["image"] != "").to_numpy()
    for t in model.config["num_outputs"]:
        if not (masks[t] & has_image).any():
            folder = root / ANNOTATION_DIR / table.edition.task_dirs[t] / table.edition.split_dirs[split]
            hint = ("; for a test set without labels pass the list of its videos (--names LIST)"
                    if split == "test" else "")
            raise DataFormatError(folder, None, f"no {split} frame has both an image and a label for {t}, so the "
                                                f"checkpoint's {t} head could not be scored; add {t} labels there "
                                                f"or evaluate another split{hint}")
    th, th_source = _thresholds(ckpt, au_thresholds, table.edition)
    fallback = ckpt.get("train_label_stats")
    if fallback is None:
        fallback = train_label_stats(read_split(root, "train").frames, table.edition.au_names,
                                     len(table.edition.expr_names))
    preds = predict_frames(model, frames, root, image_size=size, batch_size=batch_size, device=dev,
                           num_workers=num_workers, progress=progress)
    planned = [out / rel for rel in submission_paths(frames, list(preds), split, table.edition)]
    _remove_outputs(out, previous)
    try:
        sub = write_submission(frames, preds, out, root, split=split, edition=table.edition, au_thresholds=th,
                               fallback=fallback)
        filled = sub.pop("filled_preds")
        files = sorted(rel for t in preds for rel in sub[t].pop("paths"))
        scores = score_predictions(frames, preds, thresholds=th if "au" in preds else None, edition=table.edition)
        if "au" in filled:
            filled["au"] = (filled["au"] >= th).astype(np.float32)  # the files hold decisions, not probabilities
        all_frames = score_predictions(frames, filled, thresholds=th if "au" in filled else None,
                                       require_image=False, edition=table.edition)
        result = json_clean({
            "edition": table.edition.name, "scoring": scores.get("scoring"),
            "checkpoint": str(checkpoint), "data_root": str(root), "split": split, "image_size": size,
            "au_thresholds": th.tolist(), "au_threshold_source": th_source, "scores": scores,
            "headline": headline(scores, with_edition=True), "scores_all_frames": all_frames,
            "headline_all_frames": headline(all_frames, with_edition=True), "submission": sub, "files": files,
            "provenance": _provenance(checkpoint, ckpt, dev, th, th_source, root, split=split, frames=len(frames),
                                      images=int(has_image.sum())),
        })
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SCORES_FILE, result)  # last: a scores.json means a complete submission
    except BaseException:
        _remove_outputs(out, planned)
        raise
    return result


def _submit_listed(checkpoint: Path, ckpt: Mapping[str, Any], model, dev: torch.device, root: Path,
                   names_file: Path, edition: str | None, out: Path, previous: list[Path], size: int,
                   batch_size: int, num_workers: int, au_thresholds: str, progress: bool) -> dict[str, Any]:
    """The submission of a test list: every frame of the listed videos, from their crop folders alone."""
    listed = read_names_list(names_file, root)
    heads = dict(model.config["num_outputs"])
    ed = _listed_edition(root, ckpt, heads, edition)
    for t, n in heads.items():
        if n != ed.num_outputs[t]:
            raise ConfigError(f"the checkpoint's {t} head has {n} outputs, edition {ed.name} {ed.num_outputs[t]}")
    frames, lengths = listed_frames(root, listed, ed)
    empty = [name for name, n in lengths.items() if n == 0]
    if empty:
        raise ConfigError(f"--names {names_file}: {IMAGE_DIR}/{empty[0]} holds no frame jpg and the list gives no "
                          f"frame count for it (write '{empty[0]},<frames>')")
    th, th_source = _thresholds(ckpt, au_thresholds, ed)
    fallback = ckpt.get("train_label_stats")
    fallback_source = "checkpoint's train_label_stats"
    if fallback is None:
        try:
            fallback = train_label_stats(read_split(root, "train", edition=ed).frames, ed.au_names,
                                         len(ed.expr_names))
            fallback_source = f"training labels of {root}"
        except (DataFormatError, OSError):
            fallback, fallback_source = None, "none: VA 0, every AU 0, Neutral"
    preds = predict_frames(model, frames, root, image_size=size, batch_size=batch_size, device=dev,
                           num_workers=num_workers, progress=progress)
    planned = [out / rel for rel in submission_paths(frames, list(preds), "test", ed, lengths)]
    _remove_outputs(out, previous)
    try:
        sub = write_submission(frames, preds, out, root, split="test", edition=ed, au_thresholds=th,
                               fallback=fallback, lengths=lengths)
        sub.pop("filled_preds")
        files = sorted(rel for t in preds for rel in sub[t].pop("paths"))
        has_image = int((frames["image"] != "").sum())
        result = json_clean({
            "edition": ed.name, "scoring": None, "checkpoint": str(checkpoint), "data_root": str(root),
            "split": "test", "names_file": str(names_file), "names": list(listed), "frames": lengths,
            "image_size": size, "au_thresholds": th.tolist(), "au_threshold_source": th_source,
            "fill_rule": "frames without a jpg take the previous frame's prediction (the first face's before it); "
                         f"a name without any face takes the training constants ({fallback_source})",
            "scores": None, "headline": None, "submission": sub, "files": files,
            "provenance": _provenance(checkpoint, ckpt, dev, th, th_source, root, split="test",
                                      names_file=str(names_file), names=len(listed), frames=int(len(frames)),
                                      images=has_image),
        })
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SCORES_FILE, result)  # last: a scores.json means a complete submission
    except BaseException:
        _remove_outputs(out, planned)
        raise
    return result


def _is_submission_path(rel: Any) -> bool:
    """Whether ``rel`` names a file :func:`write_submission` writes: ``<a task folder of an edition>/<name>.txt``."""
    if not isinstance(rel, str):
        return False
    parts = PurePosixPath(rel).parts
    return (len(parts) == 2 and parts[0] in _SUBMISSION_FOLDERS and parts[1].endswith(".txt")
            and not parts[1].startswith(".") and "\\" not in rel)


def _previous_outputs(out: Path) -> list[Path]:
    """What an earlier :func:`evaluate` wrote into ``out`` and this one replaces: the files its ``scores.json``
    lists, then that ``scores.json``. Raises :class:`OutputExistsError` (nothing deleted) when ``scores.json`` lists
    no files or the submission folders hold anything it does not list."""
    scores = out / SCORES_FILE
    listed: list[str] = []
    if scores.exists() or scores.is_symlink():
        try:
            listed = json.loads(scores.read_text()).get("files")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            listed = None
        if not isinstance(listed, list) or not all(_is_submission_path(rel) for rel in listed):
            raise OutputExistsError(f"{scores} was not written by this version of mtanet evaluate (it lists no "
                                    "submission files); nothing was deleted: remove it or choose another output "
                                    "folder")
    ours = {out / rel for rel in listed}
    for name in _SUBMISSION_FOLDERS:
        folder = out / name
        if not (folder.exists() or folder.is_symlink()):
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise OutputExistsError(f"{folder} is where submission files go but is not a folder of them; nothing "
                                    "was deleted: remove it or choose another output folder")
        foreign = sorted(entry.name for entry in folder.iterdir() if entry not in ours)
        if foreign:
            more = f" and {len(foreign) - 1} other entries" if len(foreign) > 1 else ""
            raise OutputExistsError(f"{folder} holds {foreign[0]}{more} that no earlier mtanet evaluate listed in "
                                    f"{scores}; nothing was deleted: remove them or choose another output folder")
    return sorted(ours) + ([scores] if listed or scores.exists() else [])


def _remove_outputs(out: Path, paths: Sequence[Path]) -> None:
    """Remove ``paths`` (files of an evaluate) and the submission folders they leave empty."""
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in paths if path.parent != out}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
