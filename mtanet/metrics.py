"""ABAW scores, computed exactly as the challenge defines them (ABAW2020.md, section 2).

Every score is taken over all valid frames of a split concatenated, never as a mean of per-video scores. Arguments
follow scikit-learn's order: ground truth first, predictions second. Rows whose ground truth carries the "no label"
sentinel are dropped before scoring; predictions are never masked, so a NaN prediction on a labeled row is an error.

Only numpy and scikit-learn are used here, so scoring saved predictions never needs torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from mtanet.tasks import EDITIONS, EXPR_NAMES_2020, EXPR_NAMES_2022, LABEL_SENTINEL, TASKS, Edition

__all__ = [
    "EXPR_F1_WEIGHT", "EXPR_ACC_WEIGHT", "AU_F1_WEIGHT", "AU_ACC_WEIGHT", "DEFAULT_THRESHOLD_GRID", "SCORING_RULES",
    "combine_expr", "combine_au", "ccc", "va_valid_rows", "va_score", "au_score", "tune_au_thresholds",
    "au_score_2022", "expr_score", "expr_score_2022", "scoring_rule", "edition_scores", "bootstrap_ci",
]

#: Weights of the ABAW 2020 combined scores.
EXPR_F1_WEIGHT: float = 0.67
EXPR_ACC_WEIGHT: float = 0.33
AU_F1_WEIGHT: float = 0.5
AU_ACC_WEIGHT: float = 0.5

#: Default threshold grid of :func:`tune_au_thresholds`: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLD_GRID: np.ndarray = np.linspace(0.05, 0.95, 19)


# --------------------------------------------------------------------------------------------------------------------
# validation helpers


def _array(name: str, a: Any, ndim: int, dtype: Any = np.float64) -> np.ndarray:
    """Converts ``a`` to an array of ``ndim`` dimensions or raises a ValueError naming the argument."""
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _same_rows(names: tuple[str, str], a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names[0]} has {a.shape[0]} rows but {names[1]} has {b.shape[0]}")


def _nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"no labeled rows left to score {what} (empty input or every row is unlabeled)")


def _finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values on scored rows")


# --------------------------------------------------------------------------------------------------------------------
# combining formulas (the leaderboard arithmetic)


def combine_expr(f1_macro: float, accuracy: float) -> float:
    """ABAW 2020 EXPR score: ``0.67 * macro-F1 + 0.33 * accuracy`` (any scale, e.g. both in percent)."""
    return EXPR_F1_WEIGHT * f1_macro + EXPR_ACC_WEIGHT * accuracy


def combine_au(f1_mean: float, accuracy: float) -> float:
    """ABAW 2020 AU score: ``0.5 * mean per-AU F1 + 0.5 * accuracy`` (any scale, e.g. both in percent)."""
    return AU_F1_WEIGHT * f1_mean + AU_ACC_WEIGHT * accuracy


# --------------------------------------------------------------------------------------------------------------------
# valence / arousal


def ccc(y_true: Any, y_pred: Any) -> float:
    """Concordance correlation coefficient with population moments (ddof=0).

    ``CCC = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)``.

    The denominator is zero only when both inputs are constant *and* have the same mean, i.e. they are identical;
    that case returns 1.0 (perfect agreement, consistent with ``ccc(x, x) == 1``) instead of NaN. Two constant
    inputs with different means, or one constant input, give 0.0 from the formula itself. The result is clipped to
    [-1, 1] so rounding cannot push it outside the mathematical range.

    Args:
        y_true: ground truth, shape (N,).
        y_pred: predictions, shape (N,).

    Returns:
        The CCC as a Python float.

    Raises:
        ValueError: on shape mismatch, empty or non-finite input.
    """
    x = _array("y_true", y_true, 1)
    y = _array("y_pred", y_pred, 1)
    _same_rows(("y_true", "y_pred"), x, y)
    _nonempty(x.shape[0], "CCC")
    _finite("y_true", x)
    _finite("y_pred", y)
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()  # numpy's default ddof=0: population moments, as the challenge defines them
    cov = np.mean((x - mx) * (y - my))
    denom = vx + vy + (mx - my) ** 2
    if denom == 0.0:
        return 1.0
    return float(np.clip(2.0 * cov / denom, -1.0, 1.0))


def va_valid_rows(y_true: Any) -> np.ndarray:
    """Boolean mask of VA rows that carry a label: every column finite and inside [-1, 1] (the sentinel is -5)."""
    t = _array("y_true", y_true, 2)
    with np.errstate(invalid="ignore"):
        return np.all(np.isfinite(t) & (t >= -1.0) & (t <= 1.0), axis=1)


def va_score(y_true: Any, y_pred: Any) -> dict[str, float]:
    """ABAW 2020 valence-arousal score.

    Args:
        y_true: (N, 2) ground truth, columns valence then arousal. Rows with NaN or any value outside [-1, 1] are
            unlabeled and ignored.
        y_pred: (N, 2) predictions in the same column order.

    Returns:
        ``score`` (mean of the two CCCs, the official score), ``ccc_valence``, ``ccc_arousal`` and ``ccc_sum`` (the
        sum that one team's public code reports; twice ``score``), plus ``n`` the number of scored rows.

    Raises:
        ValueError: on shape mismatch, no labeled row, or non-finite predictions on labeled rows.
    """
    t = _array("y_true", y_true, 2)
    p = _array("y_pred", y_pred, 2)
    if t.shape[1] != 2 or p.shape != t.shape:
        raise ValueError(f"y_true and y_pred must both be (N, 2), got {t.shape} and {p.shape}")
    keep = va_valid_rows(t)
    _nonempty(int(keep.sum()), "VA")
    t, p = t[keep], p[keep]
    _finite("y_pred", p)
    cv = ccc(t[:, 0], p[:, 0])
    ca = ccc(t[:, 1], p[:, 1])
    return {"score": 0.5 * (cv + ca), "ccc_valence": cv, "ccc_arousal": ca, "ccc_sum": cv + ca, "n": int(keep.sum())}


# --------------------------------------------------------------------------------------------------------------------
# action units


def _au_inputs(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates AU arrays and drops unlabeled rows (any -1)."""
    t = _array("y_true", y_true, 2)
    p = _array("y_prob", y_prob, 2)
    if p.shape != t.shape:
        raise ValueError(f"y_true and y_prob must have the same (N, K) shape, got {t.shape} and {p.shape}")
    if t.shape[1] == 0:
        raise ValueError("AU arrays need at least one column")
    if not np.all(np.isin(t, (0, 1, LABEL_SENTINEL))):
        raise ValueError(f"AU y_true values must be 0, 1 or {LABEL_SENTINEL} (unlabeled)")
    keep = np.all(t != LABEL_SENTINEL, axis=1)
    _nonempty(int(keep.sum()), "AU")
    t, p = t[keep].astype(np.int64), p[keep]
    _finite("y_prob", p)
    return t, p


def _thresholds(thresholds: float | Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    th = np.asarray(thresholds, dtype=np.float64)
    if th.ndim == 0:
        th = np.full(k, float(th))
    if th.shape != (k,):
        raise ValueError(f"thresholds must be a scalar or have one value per AU ({k}), got shape {th.shape}")
    return th


def _binarise(p: np.ndarray, th: np.ndarray) -> np.ndarray:
    # ">=" so that a probability exactly at the threshold counts as active (sigmoid(0) == 0.5 is "on")
    return (p >= th).astype(np.int64)


def _f1_per_column(t: np.ndarray, b: np.ndarray) -> np.ndarray:
    # one multilabel call gives the binary F1 of every column; zero_division=0 scores an AU with no positive
    # label and no positive prediction as 0 instead of warning
    return np.asarray(f1_score(t, b, average=None, zero_division=0), dtype=np.float64)


def au_score(
    y_true: Any, y_prob: Any, thresholds: float | Sequence[float] | np.ndarray = 0.5
) -> dict[str, Any]:
    """ABAW 2020 AU score: ``0.5 * mean per-AU F1 + 0.5 * accuracy over all N*K decisions``.

    Args:
        y_true: (N, K) labels in {0, 1}; a row with any -1 is unlabeled and ignored.
        y_prob: (N, K) probabilities (or binary predictions); an AU is active where ``y_prob >= threshold``.
        thresholds: one threshold for all AUs, or one per AU (e.g. from :func:`tune_au_thresholds`).

    Returns:
        ``score``, ``f1_mean``, ``accuracy``, ``f1_per_au`` (list of K floats) and ``thresholds`` (list of K floats).

    Raises:
        ValueError: on shape mismatch, bad labels, no labeled row or non-finite probabilities on labeled rows.
    """
    t, p = _au_inputs(y_true, y_prob)
    th = _thresholds(thresholds, t.shape[1])
    b = _binarise(p, th)
    f1 = _f1_per_column(t, b)
    acc = float(np.mean(b == t))  # flattened over all N*K decisions, not averaged per AU
    f1_mean = float(f1.mean())
    return {
        "score": combine_au(f1_mean, acc),
        "f1_mean": f1_mean,
        "accuracy": acc,
        "f1_per_au": f1.tolist(),
        "thresholds": th.tolist(),
    }


def tune_au_thresholds(y_true: Any, y_prob: Any, grid: Sequence[float] | np.ndarray | None = None, *,
                       objective: str = "f1") -> np.ndarray:
    """Per-AU thresholds that maximise each AU's binary F1 (``objective="f1"``, the 2022+ score) or each AU's
    ``0.5 * F1 + 0.5 * accuracy`` (``objective="abaw2020"``: the ABAW 2020/2021 AU score is the mean of that over the
    AUs, so the per-AU choice maximises the whole score) on the given (validation) data.

    Ties (several thresholds reach the same best F1, e.g. an AU with no positive label where every F1 is 0) go to the
    grid value closest to 0.5, so an AU without signal keeps the untuned decision rule.

    Args:
        y_true: (N, K) labels in {0, 1}; rows with any -1 are ignored.
        y_prob: (N, K) probabilities.
        grid: candidate thresholds; defaults to ``np.linspace(0.05, 0.95, 19)``.

    Returns:
        (K,) float array of thresholds, one per AU.

    Raises:
        ValueError: on bad shapes, an empty grid or no labeled row.
    """
    t, p = _au_inputs(y_true, y_prob)
    g = DEFAULT_THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64).ravel()
    if g.size == 0:
        raise ValueError("grid must contain at least one threshold")
    if objective not in ("f1", "abaw2020"):
        raise ValueError(f"objective must be 'f1' or 'abaw2020', got {objective!r}")
    # (G, K): the objective of every AU at every grid value
    decisions = [_binarise(p, np.full(t.shape[1], th)) for th in g]
    f1 = np.stack([_f1_per_column(t, b) for b in decisions])
    if objective == "abaw2020":
        f1 = 0.5 * f1 + 0.5 * np.stack([(b == t).mean(axis=0) for b in decisions])
    best = f1.max(axis=0)
    dist = np.abs(g - 0.5)[:, None] + np.where(f1 == best, 0.0, np.inf)
    return g[np.argmin(dist, axis=0)].copy()


def au_score_2022(
    y_true: Any, y_prob: Any, thresholds: float | Sequence[float] | np.ndarray = 0.5
) -> dict[str, Any]:
    """ABAW 2022+ AU score: mean binary F1 over the AUs (12 in those editions); not comparable with 2020.

    Args and masking as in :func:`au_score`.

    Returns:
        ``score`` (= ``f1_mean``), ``f1_mean``, ``accuracy`` (over all N*K decisions, for reading only: not part of
        the score), ``f1_per_au`` and ``thresholds``.
    """
    r = au_score(y_true, y_prob, thresholds)
    # accuracy is reported for reading, never part of the 2022+ score
    return {"score": r["f1_mean"], "f1_mean": r["f1_mean"], "accuracy": r["accuracy"], "f1_per_au": r["f1_per_au"],
            "thresholds": r["thresholds"]}


# --------------------------------------------------------------------------------------------------------------------
# expressions


def _expr_inputs(
    y_true: Any, y_pred: Any, num_classes: int | None, default_classes: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates EXPR inputs, turns scores into labels and drops unlabeled (-1) rows."""
    t = np.asarray(y_true)
    if t.ndim != 1:
        raise ValueError(f"y_true must be 1-D class indices, got shape {t.shape}")
    p = np.asarray(y_pred)
    if p.ndim == 2:
        if num_classes is not None and p.shape[1] != num_classes:
            raise ValueError(f"y_pred has {p.shape[1]} score columns but num_classes={num_classes}")
        c = p.shape[1]
        if p.shape[0] > 0:
            _finite("y_pred", p.astype(np.float64))
        p = np.argmax(p, axis=1) if p.shape[0] > 0 else np.zeros(0, dtype=np.int64)
    elif p.ndim == 1:
        c = default_classes if num_classes is None else int(num_classes)
    else:
        raise ValueError(f"y_pred must be (N,) labels or (N, C) scores, got shape {p.shape}")
    if c < 1:
        raise ValueError(f"num_classes must be positive, got {c}")
    _same_rows(("y_true", "y_pred"), t, p)
    if not (np.all(np.mod(t, 1) == 0) and np.all(np.mod(p, 1) == 0)):
        raise ValueError("class labels must be integers")
    t, p = t.astype(np.int64), p.astype(np.int64)
    if np.any((t < LABEL_SENTINEL) | (t >= c)):
        raise ValueError(f"y_true labels must lie in [0, {c - 1}] or be {LABEL_SENTINEL} (unlabeled)")
    keep = t != LABEL_SENTINEL
    _nonempty(int(keep.sum()), "EXPR")
    t, p = t[keep], p[keep]
    if np.any((p < 0) | (p >= c)):
        raise ValueError(f"predicted labels must lie in [0, {c - 1}]")
    return t, p, c


def _expr_parts(t: np.ndarray, p: np.ndarray, c: int) -> tuple[np.ndarray, float]:
    # labels=range(C): a class absent from both truth and predictions still counts (as F1 0) in the macro mean
    f1 = np.asarray(f1_score(t, p, labels=np.arange(c), average=None, zero_division=0), dtype=np.float64)
    return f1, float(np.mean(t == p))


def expr_score(y_true: Any, y_pred: Any, num_classes: int | None = None) -> dict[str, Any]:
    """ABAW 2020 EXPR score: ``0.67 * macro-F1 + 0.33 * accuracy``.

    Args:
        y_true: (N,) class indices; -1 marks an unlabeled row, which is ignored.
        y_pred: (N,) predicted class indices, or (N, C) scores/logits/probabilities (argmax is taken).
        num_classes: number of classes C in the macro mean; defaults to the score width for (N, C) input and to the
            7 classes of ABAW 2020 for label input.

    Returns:
        ``score``, ``f1_macro`` (mean over all C classes), ``accuracy`` and ``f1_per_class`` (list of C floats).

    Raises:
        ValueError: on shape mismatch, labels out of range or no labeled row.
    """
    t, p, c = _expr_inputs(y_true, y_pred, num_classes, len(EXPR_NAMES_2020))
    f1, acc = _expr_parts(t, p, c)
    f1_macro = float(f1.mean())
    return {"score": combine_expr(f1_macro, acc), "f1_macro": f1_macro, "accuracy": acc, "f1_per_class": f1.tolist()}


def expr_score_2022(y_true: Any, y_pred: Any, num_classes: int | None = None) -> dict[str, Any]:
    """ABAW 2022+ EXPR score: plain macro-F1 (8 classes, ``Other`` included by default); not comparable with 2020.

    Args and masking as in :func:`expr_score`; label input defaults to 8 classes.

    Returns:
        ``score`` (= ``f1_macro``), ``f1_macro``, ``accuracy`` and ``f1_per_class``.
    """
    t, p, c = _expr_inputs(y_true, y_pred, num_classes, len(EXPR_NAMES_2022))
    f1, acc = _expr_parts(t, p, c)
    f1_macro = float(f1.mean())
    return {"score": f1_macro, "f1_macro": f1_macro, "accuracy": acc, "f1_per_class": f1.tolist()}


# --------------------------------------------------------------------------------------------------------------------
# every edition as it defines itself

#: The scoring rules, keyed by the first edition that used them (ABAW2020.md section 2): ``"2020"`` (Table I: VA mean
#: CCC, AU 0.5 F1 + 0.5 accuracy, EXPR 0.67 F1 + 0.33 accuracy), ``"2021"`` (the 2020 formulas on 12 AUs and
#: 7 expressions) and ``"2022"`` (every edition from 2022 on: AU mean F1 over 12, EXPR macro-F1 over 8 with
#: ``Other``, and the multi-task sum).
SCORING_RULES: dict[str, str] = {
    "2020": "ABAW 2020: VA mean CCC; AU 0.5*mean F1 + 0.5*accuracy (8 AUs); EXPR 0.67*macro-F1 + 0.33*accuracy "
            "(7 classes)",
    "2021": "ABAW 2021: the 2020 formulas on 12 AUs and 7 expressions",
    "2022": "ABAW 2022+: VA mean CCC; AU mean F1 (12 AUs); EXPR macro-F1 (8 classes with Other); multi-task "
            "P_MTL = VA + AU + EXPR",
}


def scoring_rule(edition: str | Edition) -> str:
    """The key of :data:`SCORING_RULES` that scores ``edition``: an :class:`~mtanet.tasks.Edition` or its name
    (``"2020"``, ``"2021"``, ``"2022"``, a later year, or a reader's ``"<year>-custom"`` edition of another label
    set).

    Raises:
        ValueError: a name that does not start with a year from 2020 on.
    """
    name = edition.name if isinstance(edition, Edition) else str(edition)
    m = re.match(r"(\d{4})(?:\D|$)", name)
    if not m or int(m.group(1)) < 2020:
        raise ValueError(f"cannot score edition {name!r}: expected a name such as 2020, 2021 or 2022")
    year = int(m.group(1))
    return "2020" if year == 2020 else "2021" if year == 2021 else "2022"


def _edition_name(edition: str | Edition) -> str:
    return edition.name if isinstance(edition, Edition) else str(edition)


def _check_width(edition: str | Edition, task: str, width: int) -> None:
    """A known edition's label set must fit the array: 2020 predictions are never scored by 2022 rules."""
    ed = edition if isinstance(edition, Edition) else EDITIONS.get(str(edition))
    if ed is None:
        return
    want = ed.num_outputs[task]
    if width != want:
        raise ValueError(f"edition {ed.name} scores {task} over {want} columns, got {width}")


def _rows(masks: Mapping[str, Any] | None, task: str, n: int) -> np.ndarray:
    if masks is None or masks.get(task) is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(masks[task], dtype=bool).reshape(-1)
    if m.shape[0] != n:
        raise ValueError(f"masks[{task!r}] has {m.shape[0]} rows but the {task} targets have {n}")
    return m


def edition_scores(edition: str | Edition, predictions: Mapping[str, Any], targets: Mapping[str, Any],
                   masks: Mapping[str, Any] | None = None, *,
                   au_thresholds: float | Sequence[float] | np.ndarray = 0.5) -> dict[str, Any]:
    """Every task's score and the combined score, computed the way ``edition``'s challenge defines them.

    Args:
        edition: an :class:`~mtanet.tasks.Edition` or its name (see :func:`scoring_rule`); a known edition's label
            widths are checked (8 or 12 AUs, 7 or 8 expressions), so a model of one edition is never scored by
            another's rules.
        predictions: ``{task: array}``: ``va`` (N, 2) values, ``au`` (N, K) probabilities (or 0/1 decisions),
            ``expr`` (N, C) scores or (N,) class indices. A task missing here or in ``targets`` is left out.
        targets: ``{task: array}`` aligned with the predictions: ``va`` (N, 2), ``au`` (N, K), ``expr`` (N,); the
            "no label" sentinels (VA outside [-1, 1], AU and EXPR -1) mark unlabeled rows.
        masks: optional ``{task: (N,) bool}``: only rows where it is true are scored (use it with the clipped
            targets of :func:`mtanet.data.label_arrays`, whose masks say which rows are labeled).
        au_thresholds: one AU decision threshold or one per AU.

    Returns:
        ``edition`` (its name), ``rule`` (the :data:`SCORING_RULES` key) and ``scoring`` (the rule in words); per
        task present with at least one labeled row, that task's dict (``va``: :func:`va_score`; ``au``:
        :func:`au_score` for 2020 and 2021, :func:`au_score_2022` from 2022; ``expr``: :func:`expr_score` or
        :func:`expr_score_2022`), each with ``edition`` added; ``combined``: ``{"score", "name", "tasks"}``: from
        2022 the multi-task challenge's ``P_MTL = VA + AU + EXPR`` (``None`` unless all three tasks are scored),
        for 2020 and 2021, which rank each task on its own, the mean of the task scores; and ``mean``, the mean of
        the task scores for every edition (what best-checkpoint selection compares).

    Raises:
        ValueError: an unknown edition, widths that do not fit it, or bad arrays (see the task functions).
    """
    name, rule = _edition_name(edition), scoring_rule(edition)
    out: dict[str, Any] = {"edition": name, "rule": rule, "scoring": SCORING_RULES[rule]}
    for task in TASKS:
        if task not in predictions or task not in targets or predictions[task] is None or targets[task] is None:
            continue
        y = np.asarray(targets[task])
        p = np.asarray(predictions[task])
        if p.shape[0] != y.shape[0]:
            raise ValueError(f"{task}: {p.shape[0]} predictions for {y.shape[0]} targets")
        keep = _rows(masks, task, y.shape[0])
        y, p = y[keep], p[keep]
        if task == "va":
            if not va_valid_rows(y).any():
                continue
            result = va_score(y, p)
        elif task == "au":
            _check_width(edition, "au", p.shape[1] if p.ndim == 2 else -1)
            if not (np.asarray(y) >= 0).all(axis=1).any():
                continue
            fn = au_score_2022 if rule == "2022" else au_score
            result = fn(y, p, au_thresholds)
        else:
            if p.ndim == 2:
                _check_width(edition, "expr", p.shape[1])
            if not (y >= 0).any():
                continue
            labeled = y >= 0  # expr_score checks every row of 2-D scores, labeled or not
            y, p = y[labeled], p[labeled]
            classes = None  # 2-D scores: their width
            if p.ndim == 1:
                ed = edition if isinstance(edition, Edition) else EDITIONS.get(name)
                classes = len(ed.expr_names if ed is not None else
                              EXPR_NAMES_2022 if rule == "2022" else EXPR_NAMES_2020)
            fn = expr_score_2022 if rule == "2022" else expr_score
            result = fn(y, p, num_classes=classes)
        out[task] = {**result, "edition": name}
    present = [t for t in TASKS if t in out]
    parts = [out[t]["score"] for t in present]
    out["mean"] = float(np.mean(parts)) if parts else None
    if rule == "2022":
        complete = len(present) == len(TASKS)
        out["combined"] = {"score": float(sum(parts)) if complete else None,
                           "name": "P_MTL = VA mean CCC + AU mean F1 + EXPR macro-F1 (ABAW 2022+ multi-task)"
                                   + ("" if complete else "; needs all three tasks"),
                           "tasks": present}
    else:
        out["combined"] = {"score": out["mean"],
                           "name": f"mean of the task scores (ABAW {rule} ranks each task on its own)",
                           "tasks": present}
    return out


# --------------------------------------------------------------------------------------------------------------------
# uncertainty of a score


def bootstrap_ci(
    score_fn: Callable[[np.ndarray, np.ndarray], dict[str, Any]],
    y_true: Any,
    y_pred: Any,
    groups: Any,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    key: str = "score",
) -> dict[str, Any]:
    """Percentile bootstrap interval of a score, resampling whole videos with replacement.

    Frames of one video are strongly correlated, so resampling frames would give far too narrow intervals; each
    replicate draws as many videos as there are, with replacement, and scores all their rows concatenated.

    Args:
        score_fn: one of the score functions above (or any ``f(y_true, y_pred) -> dict``); use
            ``functools.partial`` to fix extra arguments such as AU thresholds.
        y_true: ground truth, first axis = rows.
        y_pred: predictions, first axis = rows.
        groups: (N,) video name (or any hashable id) of each row.
        n_boot: number of replicates.
        alpha: two-sided level; the interval is the ``alpha/2`` and ``1 - alpha/2`` quantiles.
        seed: seed of the resampling; the same seed gives the same interval.
        key: which entry of ``score_fn``'s dict to bootstrap.

    Returns:
        ``score`` (on the full data), ``low``, ``high``, ``n_boot`` (replicates actually scored) and ``n_skipped``
        (replicates in which ``score_fn`` raised ValueError, e.g. every drawn video unlabeled for the task).

    Raises:
        ValueError: on mismatched lengths, bad ``n_boot``/``alpha`` or when no replicate could be scored.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    g = np.asarray(groups)
    if t.ndim == 0 or p.ndim == 0 or g.ndim != 1:
        raise ValueError("y_true and y_pred need a row axis and groups must be 1-D")
    if not (t.shape[0] == p.shape[0] == g.shape[0]):
        raise ValueError(f"row counts differ: y_true {t.shape[0]}, y_pred {p.shape[0]}, groups {g.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("no rows to bootstrap")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")

    point = float(score_fn(t, p)[key])

    # row indices of every video, computed once: a replicate is then one concatenation
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    members = np.split(order, np.cumsum(counts)[:-1])
    n_groups = len(members)

    rng = np.random.default_rng(seed)
    stats: list[float] = []
    skipped = 0
    for _ in range(n_boot):
        pick = rng.integers(0, n_groups, size=n_groups)
        idx = np.concatenate([members[i] for i in pick])
        try:
            stats.append(float(score_fn(t[idx], p[idx])[key]))
        except ValueError:
            skipped += 1
    if not stats:
        raise ValueError("no bootstrap replicate could be scored")
    s = np.asarray(stats)
    return {
        "score": point,
        "low": float(np.quantile(s, alpha / 2)),
        "high": float(np.quantile(s, 1 - alpha / 2)),
        "n_boot": len(stats),
        "n_skipped": skipped,
    }
