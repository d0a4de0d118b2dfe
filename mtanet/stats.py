"""Comparing ablation rows: paired by seed, with intervals, a multiplicity correction and an equivalence rule.

An ablation table compares many rows with one reference row on several scores. Read one difference at a time, the
chance that *some* difference looks real when none is grows with the number of comparisons (15 comparisons at a 5%
level each flag at least one about half of the time). :func:`compare` therefore

- pairs each run of a row with the reference's run of the same seed (same initialisation, batches and
  augmentation draws, so the seed's own luck cancels in the difference);
- gives the mean paired difference with a two-sided ``1 - alpha`` t interval and the paired t test's p-value;
- adjusts the p-values with Holm's step-down method over every (row, metric) of the call, which keeps the chance of
  any false ``better``/``worse`` verdict in the call at most ``alpha``;
- calls a row ``equivalent`` only when the difference is shown to be small: the two one-sided tests (TOST) at level
  ``alpha``, i.e. the ``1 - 2*alpha`` t interval (90% for the usual 0.05) lies strictly inside ``(-margin, margin)``.
  No difference found is not the same as no difference: everything else is ``inconclusive``.

Equivalence verdicts are not adjusted for multiplicity (each TOST is at level ``alpha``); the ``better``/``worse``
ones are.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mtanet.errors import ConfigError

__all__ = ["COLUMNS", "VERDICTS", "above_floor", "both_learned", "compare", "holm", "seeds_for_margin",
           "spread_sources"]

#: The columns of :func:`compare`'s table, in order.
COLUMNS = ("row", "versus", "metric", "n", "unpaired", "diff", "sd", "ci_low", "ci_high", "eq_low", "eq_high", "p",
           "p_holm", "verdict")

#: The verdicts :func:`compare` gives.
VERDICTS = ("better", "worse", "equivalent", "inconclusive")

# scores live in [-1, 1]; a spread or mean of paired differences below this is float rounding (two runs stuck on
# the same trivial predictor differ in the last bits of a sum), not a difference to test
_ROUNDING = 1e-9


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input's order: monotone in the sorted p-values, capped at 1.

    NaN entries (comparisons that could not be tested) stay NaN and do not count among the hypotheses.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    if tested.size == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]  # the k-th smallest (from 0) times m - k
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def _paired(diffs: np.ndarray, alpha: float) -> dict[str, float]:
    """Mean, two-sided ``1-alpha`` and ``1-2*alpha`` t intervals and the paired t test's p of ``diffs``."""
    n = diffs.size
    nan = {"diff": float(diffs.mean()) if n else math.nan, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "eq_low": math.nan, "eq_high": math.nan, "p": math.nan}
    if n < 2:
        return nan
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    mean = 0.0 if abs(mean) < _ROUNDING else mean
    sd = 0.0 if sd < _ROUNDING else sd
    se = 0.0 if sd < _ROUNDING else sd / math.sqrt(n)
    df = n - 1
    if se == 0.0:  # every pair differs by the same amount: no spread, so the difference is exactly known
        p = 1.0 if mean == 0.0 else 0.0
        half, eq_half = 0.0, 0.0
    else:
        p = float(2.0 * stats.t.sf(abs(mean / se), df))
        half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
        eq_half = float(stats.t.ppf(1.0 - alpha, df)) * se
    return {"diff": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "eq_low": mean - eq_half,
            "eq_high": mean + eq_half, "p": p}


def _pairs(results: pd.DataFrame, reference: str | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(row, versus)`` pairs: every other row against one reference row, or the pairs given."""
    if isinstance(reference, str):
        return [(row, reference) for row in dict.fromkeys(results["row"]) if row != reference]
    pairs = [tuple(p) for p in reference]
    bad = [p for p in pairs if len(p) != 2 or p[0] == p[1]]
    if not pairs or bad:
        raise ConfigError(f"compare: reference must be a row name or (row, reference row) pairs of two different "
                          f"rows, got {list(reference)!r}")
    missing = sorted({p[0] for p in pairs} - set(results["row"]))
    if missing:
        raise ConfigError(f"compare: rows {missing} have no runs in results")
    return pairs  # type: ignore[return-value]


def _check(results: pd.DataFrame, metrics: Sequence[str], margin: float, alpha: float,
           lower_is_better: Collection[str]) -> list[str]:
    """The table's shape and values and the call's options; returns ``metrics`` as a list."""
    if not isinstance(results, pd.DataFrame):
        raise ConfigError(f"compare: results must be a pandas DataFrame (columns row, seed and one per metric), "
                          f"got {type(results).__name__}")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    lower_is_better = {lower_is_better} if isinstance(lower_is_better, str) else set(lower_is_better)
    if not metrics:
        raise ConfigError("compare: metrics is empty; name at least one score column")
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"compare: metrics {metrics} names a column twice")
    missing = [c for c in ("row", "seed", *metrics) if c not in results.columns]
    if missing:
        raise ConfigError(f"compare: results has no column {', '.join(map(repr, missing))} "
                          f"(it has {list(results.columns)})")
    if not (0.0 < alpha < 0.5):
        raise ConfigError(f"compare: alpha must lie in (0, 0.5) (the equivalence interval is 1 - 2*alpha), "
                          f"got {alpha!r}")
    if not (margin >= 0.0 and math.isfinite(margin)):
        raise ConfigError(f"compare: margin must be a finite number >= 0, got {margin!r}")
    unknown = sorted(set(lower_is_better) - set(metrics))
    if unknown:
        raise ConfigError(f"compare: lower_is_better names {unknown}, which are not among metrics {metrics}")
    if results["seed"].isna().any():
        raise ValueError("compare: results has runs without a seed (NaN in column 'seed')")
    duplicated = results.duplicated(["row", "seed"], keep=False)
    if duplicated.any():
        pairs = sorted({f"{r}/seed{s}" for r, s in results.loc[duplicated, ["row", "seed"]].itertuples(index=False)})
        raise ValueError(f"compare: more than one run per row and seed: {', '.join(pairs)}")
    for metric in metrics:
        values = pd.to_numeric(results[metric], errors="coerce").to_numpy(dtype=float)
        bad_type = results[metric].notna().to_numpy() & np.isnan(values)
        if bad_type.any():
            raise ValueError(f"compare: column {metric!r} holds values that are not numbers")
        if np.isinf(values).any():
            raise ValueError(f"compare: column {metric!r} holds infinite scores")
        for row, part in results.assign(_v=values).groupby("row", sort=False)["_v"]:
            missing_scores = part.isna()
            # a row with no score at all on a metric was not trained for it (a single-task row): it is left out;
            # a row scored on some seeds only is a broken result and must not be read as a smaller sample
            if missing_scores.any() and not missing_scores.all():
                raise ValueError(f"compare: row {row!r} has NaN {metric!r} scores on "
                                 f"{int(missing_scores.sum())} of its {part.size} runs")
    return metrics


def _check_references(results: pd.DataFrame, references: Collection[str], metrics: Sequence[str]) -> None:
    """Every reference row has runs, and a score on every metric."""
    for ref in references:
        runs = results[results["row"] == ref]
        if runs.empty:
            raise ConfigError(f"compare: the reference row {ref!r} has no runs in results "
                              f"(rows: {list(dict.fromkeys(results['row']))})")
        for metric in metrics:
            if pd.to_numeric(runs[metric], errors="coerce").isna().all():
                raise ValueError(f"compare: the reference row {ref!r} has no {metric!r} scores")


def compare(results: pd.DataFrame, reference: str | Sequence[tuple[str, str]], metrics: Sequence[str],
            margin: float = 0.02, alpha: float = 0.05, lower_is_better: Collection[str] = ()) -> pd.DataFrame:
    """Each row against the reference row (or each pair of rows given), per metric, paired by seed; one table line
    per (row, reference, metric).

    Args:
        results: one line per run, with columns ``row``, ``seed`` and one column per metric (e.g.
            :func:`mtanet.book.sweep.collect`'s table); other columns are ignored.
        reference: the row every other row is compared with, or ``(row, reference row)`` pairs (a factorial's
            contrasts); the Holm family is every line of the call either way.
        metrics: the score columns to compare.
        margin: the largest difference, either way, that counts as no practical difference (scores' own units).
        alpha: the family-wise error rate of the ``better``/``worse`` verdicts over the whole call, the two-sided
            level of ``ci_low``/``ci_high`` (``1 - alpha``) and the level of each equivalence test.
        lower_is_better: metrics where a smaller value is better (every ABAW score is higher-is-better).

    Returns:
        A DataFrame with columns :data:`COLUMNS`, rows in the order they first appear in ``results`` (reference
        left out) or in the order of the pairs, metrics in the order given:

        - ``versus``: the reference row of the line;
        - ``n``: seeds present in both the row and the reference (the pairs);
        - ``unpaired``: seeds of the row or the reference left out because the other has no run of that seed;
        - ``diff``: mean paired difference, row minus reference; ``sd``: the paired differences' standard deviation
          (ddof 1), what :func:`seeds_for_margin` reads;
        - ``ci_low``, ``ci_high``: the two-sided ``1 - alpha`` t interval of that mean;
        - ``eq_low``, ``eq_high``: the ``1 - 2*alpha`` t interval the equivalence rule (TOST) reads;
        - ``p``: two-sided paired t test; ``p_holm``: Holm-adjusted over every line of the call with a p-value;
        - ``verdict``: ``better``/``worse`` when ``p_holm < alpha`` (by the sign of ``diff``, flipped for
          ``lower_is_better``), else ``equivalent`` when ``eq_low > -margin`` and ``eq_high < margin``, else
          ``inconclusive``.

        A line with fewer than 2 pairs has NaN intervals and p-values, is left out of the Holm family, and is
        ``inconclusive``. A row with no score at all on a metric (a single-task row on another task's score) gets no
        line for it. Differences and spreads below 1e-9 are float rounding and count as zero.

    Raises:
        mtanet.errors.ConfigError: not a DataFrame, a missing column, an absent reference row, or alpha, margin or
            lower_is_better out of range.
        ValueError: NaN seeds, two runs of the same row and seed, non-numeric or infinite scores, a row scored on
            some of its runs only, or a reference without scores on a metric.
    """
    metrics = _check(results, metrics, margin, alpha, lower_is_better)
    pairs = _pairs(results, reference)
    _check_references(results, {versus for _, versus in pairs}, metrics)
    scores = {m: pd.to_numeric(results[m], errors="coerce").to_numpy(dtype=float) for m in metrics}
    positions: dict[object, dict[object, int]] = {}  # row -> seed -> position in results
    for i, (row, seed) in enumerate(zip(results["row"], results["seed"])):
        positions.setdefault(row, {})[seed] = i
    lines = []
    for row, versus in pairs:
        mine, ref = positions[row], positions[versus]
        shared = [s for s in mine if s in ref]
        unpaired = len(set(mine) ^ set(ref))
        at_row, at_ref = [mine[s] for s in shared], [ref[s] for s in shared]
        for metric in metrics:
            if np.isnan(scores[metric][list(mine.values())]).all():
                continue
            diffs = scores[metric][at_row] - scores[metric][at_ref]
            if np.isnan(scores[metric][list(ref.values())]).all():
                continue  # a single-task reference row has no score on the other tasks
            lines.append({"row": row, "versus": versus, "metric": metric, "n": len(shared), "unpaired": unpaired,
                          **_paired(diffs, alpha)})
    table = pd.DataFrame(lines, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")])
    table["n"] = table["n"].astype(int)
    table["unpaired"] = table["unpaired"].astype(int)
    table["p_holm"] = holm(table["p"].to_numpy(float))
    lower = {lower_is_better} if isinstance(lower_is_better, str) else set(lower_is_better)
    verdicts = []
    for line in table.itertuples(index=False):
        if line.p_holm < alpha:  # False for NaN
            gain = -line.diff if line.metric in lower else line.diff
            verdicts.append("better" if gain > 0 else "worse")
        elif line.eq_low > -margin and line.eq_high < margin:
            verdicts.append("equivalent")
        else:
            verdicts.append("inconclusive")
    table["verdict"] = verdicts
    return table[list(COLUMNS)]


def above_floor(results: pd.DataFrame, floors: dict[str, float], metrics: Sequence[str],
                alpha: float = 0.05) -> pd.DataFrame:
    """Whether each row's networks learned a task at all: its seeds' mean score against the task's floor (the score
    of the best constant), one line per (row, metric).

    Columns: ``row``, ``metric``, ``n`` (seeds with a score), ``mean``, ``floor``, ``ci_low``/``ci_high`` (two-sided
    ``1 - alpha`` t interval of the mean over seeds), ``p`` (one-sided t test of mean > floor), ``p_holm`` (Holm over
    every line of the call) and ``learned``: True when ``p_holm < alpha``, False otherwise, None with fewer than two
    seeds (nothing to test). A verdict between two rows on a task neither learned compares noise.

    Raises:
        mtanet.errors.ConfigError: a metric without a floor, or a column ``results`` lacks.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [c for c in ("row", *metrics) if c not in results.columns]
    if missing:
        raise ConfigError(f"above_floor: results has no column {', '.join(map(repr, missing))}")
    no_floor = [m for m in metrics if m not in floors]
    if no_floor:
        raise ConfigError(f"above_floor: no floor given for {no_floor}")
    lines = []
    for row, part in results.groupby("row", sort=False):
        for metric in metrics:
            values = pd.to_numeric(part[metric], errors="coerce").dropna().to_numpy(dtype=float)
            if values.size == 0:
                continue  # a row not trained for this task
            line = {"row": row, "metric": metric, "n": int(values.size), "mean": float(values.mean()),
                    "floor": float(floors[metric]), "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
            if values.size >= 2:
                se = float(values.std(ddof=1)) / math.sqrt(values.size)
                df = values.size - 1
                if se < _ROUNDING:
                    line["p"] = 0.0 if line["mean"] > line["floor"] else 1.0
                    line["ci_low"] = line["ci_high"] = line["mean"]
                else:
                    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
                    line.update(ci_low=line["mean"] - half, ci_high=line["mean"] + half,
                                p=float(stats.t.sf((line["mean"] - line["floor"]) / se, df)))
            lines.append(line)
    table = pd.DataFrame(lines, columns=["row", "metric", "n", "mean", "floor", "ci_low", "ci_high", "p"])
    table["p_holm"] = holm(table["p"].to_numpy(dtype=float))
    table["learned"] = [None if np.isnan(p) else bool(p < alpha) for p in table["p_holm"]]
    return table


def both_learned(verdicts: pd.DataFrame, learned: pd.DataFrame) -> list[bool | None]:
    """For each line of :func:`compare`'s table, whether both its rows learned its metric (:func:`above_floor`'s
    ``learned``): False when either did not (a verdict between networks at the floor says nothing about the designs),
    True when both did, None when that is untested for either (fewer than two seeds, or no such line)."""
    ok = {(r, m): v for r, m, v in zip(learned["row"], learned["metric"], learned["learned"])}
    out: list[bool | None] = []
    for row, versus, metric in zip(verdicts["row"], verdicts["versus"], verdicts["metric"]):
        pair = (ok.get((row, metric)), ok.get((versus, metric)))
        out.append(False if False in pair else True if pair == (True, True) else None)
    return out


def seeds_for_margin(sd: float | Sequence[float] | np.ndarray, margin: float = 0.02, alpha: float = 0.05,
                     power: float = 0.8, most: int = 10_000) -> np.ndarray:
    """The seeds per row with which :func:`compare` would call two truly alike rows ``equivalent`` with probability
    about ``power``, for a spread ``sd`` of the paired differences (e.g. :func:`compare`'s ``sd``): the smallest
    ``n >= 2`` with ``(t(1 - alpha, n - 1) + t(1 - (1 - power) / 2, n - 1)) * sd / sqrt(n) < margin``, the usual
    sample size of two one-sided tests at a true difference of zero.

    This plans the precision a sweep needs to say "no difference" from the spread it saw; it is not a power to find
    a difference after the fact. The formula is the usual t-approximation plan; simulated with ``power=0.8`` at
    spreads of 0.5 to 2.5 margins, 81% to 84% of truly alike rows were called equivalent at the planned seeds. NaN
    for a NaN ``sd`` (fewer than two pairs); ``most + 1`` when even ``most`` seeds would not do.

    Raises:
        mtanet.errors.ConfigError: margin not positive, alpha outside (0, 0.5), power outside (0, 1), most below 2,
            or a negative ``sd``.
    """
    if not margin > 0 or not 0 < alpha < 0.5 or not 0 < power < 1 or most < 2:
        raise ConfigError(f"seeds_for_margin: need margin > 0, 0 < alpha < 0.5, 0 < power < 1 and most >= 2, got "
                          f"margin={margin!r}, alpha={alpha!r}, power={power!r}, most={most!r}")
    spread = np.atleast_1d(np.asarray(sd, dtype=float))
    if (spread[~np.isnan(spread)] < 0).any():
        raise ConfigError("seeds_for_margin: a standard deviation below zero")
    n = np.arange(2, most + 1)
    # the interval's half-width per unit of sd, decreasing in n: both t quantiles fall and sqrt(n) grows
    unit = (stats.t.ppf(1.0 - alpha, n - 1) + stats.t.ppf(1.0 - (1.0 - power) / 2.0, n - 1)) / np.sqrt(n)
    out = np.full(spread.shape, np.nan)
    known = ~np.isnan(spread)
    limit = np.divide(margin, spread[known], out=np.full(known.sum(), np.inf), where=spread[known] > 0)
    # unit * sd < margin  <=>  unit < margin / sd: the n that fail are those with unit >= limit, a prefix of n
    failing = np.searchsorted(-unit, -limit, side="right")
    out[known] = n[0] + failing
    return out


def spread_sources(results: pd.DataFrame, metrics: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """How far a score moves with which evaluation videos are drawn, beside how far it moves with the seed, in one
    unit (a standard deviation), per metric.

    ``video_se``: the median over runs of a run's own interval ``{metric}_low``/``{metric}_high`` (a video-level
    bootstrap at ``level``) turned into a standard error, half-width / z. ``seed_sd``: the median over rows of the
    standard deviation of the row's scores over its seeds (rows with two seeds or more). Seeds share the evaluation
    videos, so ``seed_sd`` does not contain ``video_se``: a test over seeds alone ignores it. ``runs`` and ``rows``:
    how many each median is over. A metric without intervals gets NaN ``video_se``.
    """
    if not 0 < level < 1:
        raise ConfigError(f"spread_sources: level must lie in (0, 1), got {level!r}")
    z = stats.norm.ppf(0.5 + level / 2.0)
    lines = {}
    for metric in metrics:
        scored = results[results[metric].notna()]
        if {f"{metric}_low", f"{metric}_high"} <= set(scored.columns):
            half = ((scored[f"{metric}_high"] - scored[f"{metric}_low"]) / 2.0).dropna()
        else:
            half = pd.Series(dtype=float)
        by_row = scored.groupby("row")[metric].std(ddof=1).dropna()
        lines[metric] = {"video_se": float(half.median() / z) if len(half) else float("nan"), "runs": len(half),
                         "seed_sd": float(by_row.median()) if len(by_row) else float("nan"), "rows": len(by_row)}
    return pd.DataFrame.from_dict(lines, orient="index", columns=["video_se", "runs", "seed_sd", "rows"])
