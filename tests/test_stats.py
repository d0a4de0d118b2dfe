"""mtanet.stats.compare: paired comparisons with Holm's correction and an equivalence rule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from mtanet.errors import ConfigError
from mtanet.stats import COLUMNS, above_floor, both_learned, compare, holm, seeds_for_margin, spread_sources

METRICS = ["va", "au", "expr"]


def _table(scores: dict[str, list[float]], metric: str = "va", seeds: list[int] | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"row": row, "seed": (seeds or list(range(len(vs))))[i], metric: v}
                         for row, vs in scores.items() for i, v in enumerate(vs)])


def _null_sweep(rng: np.random.Generator, rows: int = 6, seeds: int = 5) -> pd.DataFrame:
    """A sweep with no true difference between rows: each score is a metric level, a seed effect shared by every
    row (paired seeds start alike) and run noise."""
    level = rng.uniform(0.3, 0.6, size=len(METRICS))
    seed_effect = rng.normal(0.0, 0.02, size=(seeds, len(METRICS)))
    return pd.DataFrame([{"row": f"r{r}", "seed": s,
                          **dict(zip(METRICS, level + seed_effect[s] + rng.normal(0.0, 0.01, size=len(METRICS))))}
                         for r in range(rows) for s in range(seeds)])


def test_the_family_wise_false_finding_rate_stays_near_alpha_with_no_true_difference() -> None:
    alpha, repetitions = 0.05, 400
    rng = np.random.default_rng(20261202)
    adjusted_any = unadjusted_any = 0
    for _ in range(repetitions):
        table = compare(_null_sweep(rng), "r0", METRICS, alpha=alpha)
        assert len(table) == 15  # 5 rows x 3 metrics, one family
        adjusted_any += table["verdict"].isin(["better", "worse"]).any()
        unadjusted_any += (table["p"] < alpha).any()
    # three binomial standard deviations above alpha: a correct Holm rarely exceeds it, no correction always does
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) / repetitions)
    assert adjusted_any / repetitions <= alpha + tolerance
    assert unadjusted_any / repetitions > 0.3  # the same data read one comparison at a time


def test_a_large_true_difference_is_found_with_its_sign() -> None:
    rng = np.random.default_rng(7)
    runs = _null_sweep(rng)
    runs.loc[runs["row"] == "r1", "va"] += 0.10
    runs.loc[runs["row"] == "r2", "au"] -= 0.10
    table = compare(runs, "r0", METRICS).set_index(["row", "metric"])
    assert table.loc[("r1", "va"), "verdict"] == "better"
    assert table.loc[("r1", "va"), "diff"] == pytest.approx(0.10, abs=0.03)
    assert table.loc[("r1", "va"), "ci_low"] > 0
    assert table.loc[("r2", "au"), "verdict"] == "worse"
    assert table.loc[("r2", "au"), "ci_high"] < 0
    # the same drop on a lower-is-better metric (an error, a loss) is an improvement
    flipped = compare(runs, "r0", METRICS, lower_is_better={"au"}).set_index(["row", "metric"])
    assert flipped.loc[("r2", "au"), "verdict"] == "better"
    assert flipped.loc[("r1", "va"), "verdict"] == "better"
    # one name given as a string is that metric, not its letters
    assert compare(runs, "r0", METRICS, lower_is_better="au").set_index(["row", "metric"]).loc[
        ("r2", "au"), "verdict"] == "better"


def test_equivalence_is_declared_only_when_the_interval_lies_inside_the_margin() -> None:
    equal = _table({"ref": [0.500, 0.510, 0.490, 0.505, 0.495],
                    "same": [0.5001, 0.5099, 0.4902, 0.5049, 0.4951]})
    line = compare(equal, "ref", ["va"], margin=0.02).iloc[0]
    assert line["verdict"] == "equivalent" and line["p_holm"] >= 0.05
    assert -0.02 < line["eq_low"] <= line["eq_high"] < 0.02
    # the 90% interval sits inside the 95% one, both around the mean
    assert line["ci_low"] < line["eq_low"] < line["diff"] < line["eq_high"] < line["ci_high"]
    assert compare(equal, "ref", ["va"], margin=1e-6).iloc[0]["verdict"] == "inconclusive"
    # a margin the interval straddles on one side only is not equivalence either
    assert compare(equal, "ref", ["va"], margin=(abs(line["eq_low"]) + abs(line["eq_high"])) / 2).iloc[0][
        "verdict"] == "inconclusive"
    # noisy seeds, same mean: nothing found, nothing shown equal
    noisy = _table({"ref": [0.50, 0.56, 0.44, 0.52], "wobbly": [0.56, 0.44, 0.52, 0.50]})
    assert compare(noisy, "ref", ["va"], margin=0.02).iloc[0]["verdict"] == "inconclusive"


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted: 0.01 x4 = 0.04, 0.02 x3 = 0.06, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.04, 0.06, 0.06, 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # sorted: 0.001 x3 = 0.003, 0.6 x2 = 1.2 -> capped at 1, 0.7 x1 = 0.7 -> raised to the earlier 1 (monotone)
    assert holm([0.7, 0.001, 0.6]) == pytest.approx([1.0, 0.003, 1.0])
    assert holm([0.5, 0.001, 0.4]) == pytest.approx([0.8, 0.003, 0.8])
    adjusted = holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)

    # through compare: three comparisons of one call share one family
    runs = _table({"ref": [0.50, 0.52, 0.48, 0.51], "a": [0.56, 0.57, 0.55, 0.58],
                   "b": [0.51, 0.53, 0.47, 0.53], "c": [0.49, 0.55, 0.46, 0.53]})
    table = compare(runs, "ref", ["va"])
    p = [scipy_stats.ttest_rel(runs.loc[runs["row"] == r, "va"], runs.loc[runs["row"] == "ref", "va"]).pvalue
         for r in "abc"]
    assert table["p"].tolist() == pytest.approx(p)
    assert table["p_holm"].tolist() == pytest.approx(holm(p))
    order = np.argsort(p)
    expected = np.maximum.accumulate(np.minimum(1, np.array(p)[order] * [3, 2, 1]))
    assert table["p_holm"].to_numpy()[order] == pytest.approx(expected)


def test_runs_are_paired_by_seed_whatever_their_order_and_unpaired_seeds_are_dropped_and_counted() -> None:
    ref = {0: 0.40, 1: 0.60, 2: 0.50, 3: 0.45}
    row = {3: 0.47, 0: 0.41, 2: 0.53, 4: 0.90}  # seed 4 has no reference run, seed 1 no row run
    runs = pd.DataFrame([{"row": "row", "seed": s, "va": v} for s, v in row.items()]
                        + [{"row": "ref", "seed": s, "va": v} for s, v in ref.items()])
    runs = runs.sample(frac=1.0, random_state=3).reset_index(drop=True)
    line = compare(runs, "ref", ["va"]).iloc[0]
    diffs = [0.01, 0.03, 0.02]  # seeds 0, 2, 3
    assert line["n"] == 3 and line["unpaired"] == 2
    assert line["diff"] == pytest.approx(np.mean(diffs))
    assert line["p"] == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)

    # fewer than two pairs: no interval, no test, no verdict, no place in the Holm family
    lonely = pd.concat([runs, pd.DataFrame([{"row": "lonely", "seed": 1, "va": 0.9},
                                             {"row": "lonely", "seed": 9, "va": 0.9}])])
    table = compare(lonely, "ref", ["va"]).set_index("row")
    assert table.loc["lonely", "n"] == 1 and table.loc["lonely", "unpaired"] == 4
    assert table.loc["lonely", "diff"] == pytest.approx(0.3)
    assert all(math.isnan(table.loc["lonely", c]) for c in ("ci_low", "ci_high", "p", "p_holm"))
    assert table.loc["lonely", "verdict"] == "inconclusive"
    assert table.loc["row", "p_holm"] == pytest.approx(table.loc["row", "p"])  # a family of one


def test_the_interval_and_p_value_match_scipy_on_a_worked_example() -> None:
    reference = [0.512, 0.498, 0.530, 0.505, 0.521]
    row = [0.530, 0.509, 0.538, 0.531, 0.529]
    line = compare(_table({"ref": reference, "row": row}), "ref", ["va"], alpha=0.05).iloc[0]
    diffs = np.subtract(row, reference)
    assert line["diff"] == pytest.approx(diffs.mean()) and line["sd"] == pytest.approx(np.std(diffs, ddof=1))
    assert line["p"] == pytest.approx(scipy_stats.ttest_rel(row, reference).pvalue)
    se = scipy_stats.sem(diffs)
    low, high = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=se)
    assert (line["ci_low"], line["ci_high"]) == pytest.approx((low, high))
    low90, high90 = scipy_stats.t.interval(0.90, len(diffs) - 1, loc=diffs.mean(), scale=se)
    assert (line["eq_low"], line["eq_high"]) == pytest.approx((low90, high90))
    wide = compare(_table({"ref": reference, "row": row}), "ref", ["va"], alpha=0.01).iloc[0]
    assert (wide["ci_low"], wide["ci_high"]) == pytest.approx(
        scipy_stats.t.interval(0.99, len(diffs) - 1, loc=diffs.mean(), scale=se))


def test_the_table_has_one_line_per_row_and_metric_in_order_and_skips_metrics_a_row_was_not_trained_for() -> None:
    runs = pd.DataFrame([{"row": r, "seed": s, "va": 0.5 + 0.01 * s, "au": 0.6 + 0.02 * s, "expr": 0.4}
                         for r in ("senet", "resnext", "avg_pool") for s in range(3)]
                        + [{"row": "va_only", "seed": s, "va": 0.55 + 0.01 * s} for s in range(3)])
    table = compare(runs, "senet", ["va", "au", "expr"])
    assert list(table.columns) == list(COLUMNS)
    assert list(zip(table["row"], table["metric"])) == [
        ("resnext", "va"), ("resnext", "au"), ("resnext", "expr"), ("avg_pool", "va"), ("avg_pool", "au"),
        ("avg_pool", "expr"), ("va_only", "va")]
    # identical runs: exact zero difference, equivalent; a constant shift is exactly known and significant
    assert (table.iloc[:6]["diff"] == 0).all() and (table.iloc[:6]["verdict"] == "equivalent").all()
    va_only = table.iloc[6]
    assert va_only["diff"] == pytest.approx(0.05) and va_only["p"] == 0 and va_only["verdict"] == "better"


def test_scores_equal_up_to_rounding_are_no_difference_and_raise_no_warning() -> None:
    runs = _table({"ref": [0.41599999999999998, 0.41600000000000004, 0.416],
                   "row": [0.416, 0.416 + 1e-16, 0.41600000000000004]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        line = compare(runs, "ref", ["va"]).iloc[0]
    assert line["diff"] == 0.0 and line["p"] == 1.0 and line["verdict"] == "equivalent"


@pytest.mark.parametrize("mutate, kwargs, error, match", [
    (lambda t: t.drop(columns=["seed"]), {}, ConfigError, "no column 'seed'"),
    (lambda t: t, {"metrics": ["va", "au"]}, ConfigError, "no column 'au'"),
    (lambda t: t[t["row"] != "ref"], {}, ConfigError, "reference row 'ref'"),
    (lambda t: t.assign(va=[0.5, np.nan, 0.5, 0.4, 0.6, 0.5]), {}, ValueError, "row 'ref' has NaN 'va'"),
    (lambda t: t.assign(va=[0.5, 0.5, 0.5, np.inf, 0.6, 0.5]), {}, ValueError, "infinite"),
    (lambda t: t.assign(va=["a", 0.5, 0.5, 0.4, 0.6, 0.5]), {}, ValueError, "not numbers"),
    (lambda t: t.assign(seed=[0, 1, 1, 0, 1, 2]), {}, ValueError, "ref/seed1"),
    (lambda t: t, {"alpha": 0.5}, ConfigError, "alpha"),
    (lambda t: t, {"margin": -0.1}, ConfigError, "margin"),
    (lambda t: t, {"lower_is_better": {"loss"}}, ConfigError, "lower_is_better"),
])
def test_bad_input_is_refused_with_a_message_naming_it(mutate, kwargs, error, match) -> None:
    runs = _table({"ref": [0.5, 0.5, 0.5], "row": [0.4, 0.6, 0.5]})
    with pytest.raises(error, match=match):
        compare(mutate(runs), "ref", **{"metrics": ["va"], **kwargs})


def test_a_reference_without_scores_on_a_metric_is_refused() -> None:
    runs = pd.DataFrame([{"row": "ref", "seed": 0, "va": 0.5, "au": np.nan},
                         {"row": "ref", "seed": 1, "va": 0.5, "au": np.nan},
                         {"row": "row", "seed": 0, "va": 0.4, "au": 0.3},
                         {"row": "row", "seed": 1, "va": 0.4, "au": 0.3}])
    with pytest.raises(ValueError, match="reference row 'ref' has no 'au' scores"):
        compare(runs, "ref", ["va", "au"])


def test_pairs_compare_each_row_with_its_own_reference_in_one_holm_family() -> None:
    rng = np.random.default_rng(11)
    runs = _null_sweep(rng, rows=4)
    runs.loc[runs["row"] == "r3", "va"] += 0.10  # r3 is better than r2, the row it is paired with
    pairs = [("r1", "r0"), ("r3", "r2"), ("r2", "r0")]
    table = compare(runs, pairs, METRICS)
    assert list(zip(table["row"], table["versus"]))[::3] == pairs  # the pairs' order, then the metrics'
    assert len(table) == 9
    line = table.set_index(["row", "versus", "metric"]).loc[("r3", "r2", "va")]
    diffs = (runs[runs["row"] == "r3"]["va"].to_numpy() - runs[runs["row"] == "r2"]["va"].to_numpy())
    assert line["diff"] == pytest.approx(diffs.mean())
    assert line["verdict"] == "better"
    # Holm over all 9 lines: the adjusted p of the smallest p is 9 times it
    smallest = table["p"].idxmin()
    assert table.loc[smallest, "p_holm"] == pytest.approx(min(1.0, 9 * table.loc[smallest, "p"]))
    # the string form is every other row against one reference
    single = compare(runs, "r0", METRICS)
    assert set(single["versus"]) == {"r0"} and set(single["row"]) == {"r1", "r2", "r3"}
    with pytest.raises(ConfigError, match="two different rows"):
        compare(runs, [("r1", "r1")], METRICS)
    with pytest.raises(ConfigError, match="no runs"):
        compare(runs, [("r9", "r0")], METRICS)
    with pytest.raises(ConfigError, match="reference row 'r8'"):
        compare(runs, [("r1", "r8")], METRICS)


def test_above_floor_finds_learned_tasks_and_not_a_floor_level_row() -> None:
    """A row clearly above the floor is learned; one scattered around it is not (and its interval covers it); a row
    with one seed is not tested; a row without a task's scores gives no line for it."""
    rng = np.random.default_rng(0)
    runs = pd.DataFrame(
        [{"row": "good", "seed": s, "va": 0.30 + 0.01 * rng.standard_normal(), "au": 0.6} for s in range(5)]
        + [{"row": "noise", "seed": s, "va": 0.05 * rng.standard_normal(), "au": 0.42 + 0.01 * rng.standard_normal()}
           for s in range(5)]
        + [{"row": "one", "seed": 0, "va": 0.5, "au": 0.7}]
        + [{"row": "au_only", "seed": s, "va": np.nan, "au": 0.6 + 0.01 * s} for s in range(3)])
    table = above_floor(runs, {"va": 0.0, "au": 0.42}, ["va", "au"]).set_index(["row", "metric"])
    assert table.loc[("good", "va"), "learned"] is True and table.loc[("good", "au"), "learned"] is True
    assert table.loc[("noise", "va"), "learned"] is False and table.loc[("noise", "au"), "learned"] is False
    assert table.loc[("noise", "va"), "ci_low"] < 0.0 < table.loc[("noise", "va"), "ci_high"]
    assert table.loc[("one", "va"), "learned"] is None and table.loc[("one", "va"), "n"] == 1
    assert ("au_only", "va") not in table.index and table.loc[("au_only", "au"), "learned"] is True
    # Holm over every tested line: the adjusted p is never below the raw one
    assert (table["p_holm"].dropna() >= table["p"].dropna() - 1e-15).all()
    with pytest.raises(ConfigError, match="no floor given for"):
        above_floor(runs, {"va": 0.0}, ["va", "au"])


def test_both_learned_is_false_when_either_row_sat_at_the_floor_and_none_when_untested() -> None:
    learned = pd.DataFrame({"row": ["a", "b", "c", "d"], "metric": ["va"] * 4, "learned": [True, True, False, None]})
    verdicts = pd.DataFrame({"row": ["a", "c", "a", "d", "c", "a"], "versus": ["b", "a", "c", "a", "d", "b"],
                             "metric": ["va", "va", "va", "va", "va", "au"]})
    # a-b both learned; c at the floor on either side; d untested; no line for au at all
    assert both_learned(verdicts, learned) == [True, False, False, None, False, None]


@pytest.mark.parametrize(("margin", "alpha", "power"), [(0.02, 0.05, 0.8), (0.01, 0.05, 0.9), (0.05, 0.1, 0.5)])
def test_seeds_for_margin_is_the_fewest_seeds_whose_planned_interval_fits_inside_the_margin(margin: float,
                                                                                            alpha: float,
                                                                                            power: float) -> None:
    spreads = [0.0, 0.004, 0.01, 0.02, 0.03, 0.05, 0.08]
    needed = seeds_for_margin(spreads, margin, alpha, power)
    for sd, n in zip(spreads, needed):
        def half(k: int) -> float:
            return (scipy_stats.t.ppf(1 - alpha, k - 1) + scipy_stats.t.ppf(1 - (1 - power) / 2, k - 1)) * sd \
                / math.sqrt(k)
        assert n >= 2 and half(n) < margin and (n == 2 or half(n - 1) >= margin), (sd, n)
    assert list(needed) == sorted(needed)  # more spread never needs fewer seeds
    assert np.isnan(seeds_for_margin(float("nan"))[0]) and seeds_for_margin(1.0, most=30)[0] == 31


def test_with_the_seeds_it_plans_compare_calls_truly_alike_rows_equivalent_about_as_often_as_planned() -> None:
    """Rows with no true difference from the reference, as many seeds each as seeds_for_margin plans for 80%:
    compare calls about 80% of them equivalent; with the fewest seeds that could ever do it, far fewer."""
    rng = np.random.default_rng(11)
    sd, rows = 0.02, 500
    planned = int(seeds_for_margin(sd, 0.02, power=0.8)[0])
    barely = int(seeds_for_margin(sd, 0.02, power=0.05)[0])
    assert barely < planned
    rates = []
    for seeds in (planned, barely):
        # the reference scores 0.5 on every seed; each row differs from it by paired noise of spread sd, mean zero
        table = pd.DataFrame([{"row": "ref", "seed": s, "va": 0.5} for s in range(seeds)]
                             + [{"row": f"r{r}", "seed": s, "va": 0.5 + d}
                                for r in range(rows) for s, d in enumerate(rng.normal(0.0, sd, size=seeds))])
        rates.append((compare(table, "ref", ["va"], margin=0.02)["verdict"] == "equivalent").mean())
    assert 0.74 <= rates[0] <= 0.88 and rates[1] < 0.35, rates
    # and the sd column compare gives is the paired differences' spread the plan reads
    line = compare(_table({"ref": [0.5, 0.5, 0.5], "row": [0.49, 0.5, 0.52]}), "ref", ["va"]).iloc[0]
    assert line["sd"] == pytest.approx(np.std([-0.01, 0.0, 0.02], ddof=1))


def test_seeds_for_margin_refuses_a_margin_or_level_that_plans_nothing() -> None:
    for kwargs in ({"margin": 0.0}, {"alpha": 0.5}, {"margin": -1}, {"power": 1.0}, {"most": 1}):
        with pytest.raises(ConfigError, match="seeds_for_margin"):
            seeds_for_margin(0.02, **kwargs)
    with pytest.raises(ConfigError, match="below zero"):
        seeds_for_margin([-0.01])


def test_spread_sources_turns_each_runs_interval_into_a_standard_error_beside_the_seeds_spread() -> None:
    rng = np.random.default_rng(0)
    lines = []
    for row, centre in (("a", 0.5), ("b", 0.3), ("c", 0.7)):
        for seed, score in enumerate(centre + rng.normal(0, 0.01, 6)):
            # intervals of half-width 1.96 * 0.05: a video-level standard error of 0.05
            lines.append({"row": row, "seed": seed, "va": score, "va_low": score - 1.96 * 0.05,
                          "va_high": score + 1.96 * 0.05, "au": score})
    lines.append({"row": "d", "seed": 0, "va": 0.1, "va_low": 0.0, "va_high": 0.2, "au": float("nan")})  # one seed
    runs = pd.DataFrame(lines)
    out = spread_sources(runs, ["va", "au"])
    assert out.loc["va", "video_se"] == pytest.approx(0.05, abs=1e-3) and out.loc["va", "runs"] == 19
    # the median of the rows' own spreads (about 0.01), not the spread of all runs (the rows' means differ by 0.2)
    assert 0.004 < out.loc["va", "seed_sd"] < 0.02 and out.loc["va", "rows"] == 3
    assert math.isnan(out.loc["au", "video_se"]) and out.loc["au", "runs"] == 0 and out.loc["au", "rows"] == 3
    # a 90% interval of the same width is a larger standard error
    assert spread_sources(runs, ["va"], level=0.9).loc["va", "video_se"] > out.loc["va", "video_se"]
    with pytest.raises(ConfigError):
        spread_sources(runs, ["va"], level=1.0)
