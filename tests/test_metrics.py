"""ABAW scores against independent references (plain numpy formulas, scikit-learn) and the published arithmetic."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import accuracy_score, f1_score

from mtanet import metrics as M


def ref_ccc(x, y):
    """Textbook CCC from the ABAW2020.md formula, population moments, written independently of the module."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    sxy = np.sum((x - x.mean()) * (y - y.mean())) / len(x)
    return 2 * sxy / (np.var(x, ddof=0) + np.var(y, ddof=0) + (x.mean() - y.mean()) ** 2)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------------------------------
# leaderboard arithmetic (ABAW2020.md section 2)


def test_leaderboard_expr_arithmetic():
    total = M.combine_expr(74.9, 80.1)
    assert total == pytest.approx(76.616)
    assert round(total, 1) == 76.6


def test_leaderboard_au_arithmetic():
    total = M.combine_au(49.29, 88.42)
    assert total == pytest.approx(68.855)
    assert abs(total - 68.86) <= 0.005 + 1e-9


def test_weights_are_the_published_ones():
    assert (M.EXPR_F1_WEIGHT, M.EXPR_ACC_WEIGHT, M.AU_F1_WEIGHT, M.AU_ACC_WEIGHT) == (0.67, 0.33, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------------------------------
# CCC


def test_ccc_matches_reference(rng):
    x = rng.normal(size=500)
    y = 0.6 * x + rng.normal(scale=0.7, size=500) + 0.3
    assert M.ccc(x, y) == pytest.approx(ref_ccc(x, y), abs=1e-12)
    # population, not sample moments: the ddof=1 version differs measurably on a small sample
    xs, ys = x[:5], y[:5]
    ddof1 = 2 * np.cov(xs, ys, ddof=1)[0, 1] / (xs.var(ddof=1) + ys.var(ddof=1) + (xs.mean() - ys.mean()) ** 2)
    assert M.ccc(xs, ys) == pytest.approx(ref_ccc(xs, ys), abs=1e-12)
    assert abs(M.ccc(xs, ys) - ddof1) > 1e-4


def test_ccc_known_values():
    x = np.array([1.0, 2.0, 3.0])
    assert M.ccc(x, x) == pytest.approx(1.0)
    assert M.ccc(x, -x) == pytest.approx(ref_ccc(x, -x))  # -4/(4/3*2+16) < 0, not -1: means differ
    assert M.ccc(x - 2, -(x - 2)) == pytest.approx(-1.0)
    # a shift lowers CCC below Pearson's r = 1: 2*(2/3) / (2/3 + 2/3 + 1)
    assert M.ccc(x, x + 1) == pytest.approx((4 / 3) / (4 / 3 + 1))


def test_ccc_constant_cases():
    x = np.array([0.1, -0.2, 0.4, 0.0])
    assert M.ccc(x, np.full(4, 0.3)) == 0.0  # constant prediction: cov = 0
    assert M.ccc(np.full(4, 0.3), x) == 0.0
    assert M.ccc(np.full(4, 0.3), np.full(4, -0.1)) == 0.0  # both constant, different means: 0 / (0.16)
    assert M.ccc(np.full(4, 0.3), np.full(4, 0.3)) == 1.0  # the only 0/0 case: identical, documented as 1
    assert M.ccc([0.5], [0.5]) == 1.0
    assert M.ccc([0.5], [0.2]) == 0.0


@pytest.mark.parametrize(
    "a, b, match",
    [([1.0, 2.0], [1.0], "y_true has 2 rows but y_pred has 1"), ([], [], "no labeled rows left"),
     ([[1.0, 2.0]], [[1.0, 2.0]], r"must be 1-D, got shape \(1, 2\)"),
     ([1.0, np.nan], [1.0, 2.0], "y_true contains NaN or infinite values")],
)
def test_ccc_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        M.ccc(a, b)


finite = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(*(arrays(float, n, elements=finite),) * 2)))
def test_ccc_properties(xy):
    x, y = xy
    c = M.ccc(x, y)
    assert -1.0 <= c <= 1.0
    assert c == pytest.approx(M.ccc(y, x), abs=1e-12)  # symmetric
    if np.ptp(x) > 1e-3:  # non-constant x agrees perfectly with itself
        assert M.ccc(x, x) == pytest.approx(1.0, abs=1e-9)
    if np.ptp(x) > 1e-3 and np.ptp(y) > 1e-3:
        assert c == pytest.approx(ref_ccc(x, y), abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# VA


def test_va_score_matches_reference_and_ignores_sentinels(rng):
    n = 300
    t = rng.uniform(-1, 1, size=(n, 2))
    p = np.clip(t + rng.normal(scale=0.4, size=(n, 2)), -1, 1)
    bad = rng.random(n) < 0.2
    t_masked = t.copy()
    t_masked[bad] = -5.0  # ABAW sentinel
    t_masked[3] = [np.nan, 0.2]  # NaN in one column makes the row unlabeled
    t_masked[4] = [0.3, 1.5]  # out of range in one column too
    keep = ~bad
    keep[[3, 4]] = False
    p_garbage = p.copy()
    p_garbage[~keep] = 123.0  # predictions on unlabeled rows must not matter
    r = M.va_score(t_masked, p_garbage)
    cv, ca = ref_ccc(t[keep, 0], p[keep, 0]), ref_ccc(t[keep, 1], p[keep, 1])
    assert r["ccc_valence"] == pytest.approx(cv)
    assert r["ccc_arousal"] == pytest.approx(ca)
    assert r["score"] == pytest.approx((cv + ca) / 2)
    assert r["ccc_sum"] == pytest.approx(cv + ca)
    assert r["n"] == keep.sum()


def test_va_score_boundaries_count_as_labeled():
    t = np.array([[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0], [-5.0, -5.0]])
    p = np.array([[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0], [0.0, 0.0]])
    r = M.va_score(t, p)
    assert r["n"] == 3
    assert r["score"] == pytest.approx(1.0)


def test_va_score_errors():
    with pytest.raises(ValueError, match="no labeled rows"):
        M.va_score(np.full((4, 2), -5.0), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        M.va_score(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"got \(4, 2\) and \(5, 2\)"):
        M.va_score(np.zeros((4, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        M.va_score(np.zeros((2, 2)), np.array([[0.0, np.nan], [0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------------------------
# AU


def _au_data(rng, n=400, k=8):
    t = (rng.random((n, k)) < np.linspace(0.05, 0.5, k)).astype(int)
    prob = np.clip(0.35 * t + rng.random((n, k)) * 0.7, 0, 1)
    return t, prob


def test_au_score_matches_sklearn_and_ignores_unlabeled_rows(rng):
    t, prob = _au_data(rng)
    t_m = t.copy()
    t_m[:50, 2] = -1  # one -1 makes the whole row unlabeled
    prob_m = prob.copy()
    prob_m[:50] = np.nan  # and its predictions must not be looked at
    r = M.au_score(t_m, prob_m)
    tk, pk = t[50:], (prob[50:] >= 0.5).astype(int)
    f1s = [f1_score(tk[:, j], pk[:, j], zero_division=0) for j in range(8)]
    acc = accuracy_score(tk.ravel(), pk.ravel())
    assert r["f1_per_au"] == pytest.approx(f1s)
    assert r["f1_mean"] == pytest.approx(np.mean(f1s))
    assert r["accuracy"] == pytest.approx(acc)
    assert r["score"] == pytest.approx(0.5 * np.mean(f1s) + 0.5 * acc)
    assert r["thresholds"] == [0.5] * 8


def test_au_score_per_au_thresholds(rng):
    t, prob = _au_data(rng, k=4)
    th = np.array([0.2, 0.4, 0.6, 0.8])
    r = M.au_score(t, prob, thresholds=th)
    b = (prob >= th).astype(int)
    f1s = [f1_score(t[:, j], b[:, j], zero_division=0) for j in range(4)]
    assert r["f1_per_au"] == pytest.approx(f1s)
    assert r["accuracy"] == pytest.approx(np.mean(b == t))
    assert r["thresholds"] == pytest.approx(th.tolist())
    # differs from the scalar threshold: the thresholds are really applied per column
    assert r["f1_per_au"] != pytest.approx(M.au_score(t, prob)["f1_per_au"])


def test_au_score_au_never_positive_gives_zero_f1():
    t = np.array([[0, 1], [0, 0], [0, 1], [0, 0]])
    p = np.array([[0.1, 0.9], [0.2, 0.1], [0.0, 0.8], [0.3, 0.2]])
    r = M.au_score(t, p)
    assert r["f1_per_au"] == [0.0, 1.0]  # zero_division=0 for the AU with no positives at all
    assert r["accuracy"] == 1.0
    assert r["score"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_au_threshold_is_inclusive():
    r = M.au_score(np.array([[1], [0]]), np.array([[0.5], [0.49]]))
    assert r["accuracy"] == 1.0


def test_au_score_errors():
    with pytest.raises(ValueError, match="no labeled rows"):
        M.au_score(-np.ones((3, 8)), np.zeros((3, 8)))
    with pytest.raises(ValueError, match="shape"):
        M.au_score(np.zeros((3, 8)), np.zeros((3, 7)))
    with pytest.raises(ValueError, match="thresholds"):
        M.au_score(np.zeros((3, 8)), np.zeros((3, 8)), thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="0, 1"):
        M.au_score(np.full((3, 2), 2), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"y_true must be 2-D, got shape \(8,\)"):
        M.au_score(np.zeros(8), np.zeros(8))


def test_au_score_2022(rng):
    t, prob = _au_data(rng, k=12)
    r = M.au_score_2022(t, prob)
    b = (prob >= 0.5).astype(int)
    assert r["score"] == pytest.approx(np.mean([f1_score(t[:, j], b[:, j], zero_division=0) for j in range(12)]))
    assert r["score"] != pytest.approx(M.au_score(t, prob)["score"])
    # accuracy is reported beside the score (tables read it), never part of it
    assert r["accuracy"] == pytest.approx(np.mean(b == t)) and r["score"] == r["f1_mean"]


def test_tune_au_thresholds_maximises_each_f1(rng):
    t, prob = _au_data(rng, k=5)
    grid = np.linspace(0.05, 0.95, 19)
    th = M.tune_au_thresholds(t, prob)
    assert th.shape == (5,)
    for j in range(5):
        best = max(f1_score(t[:, j], (prob[:, j] >= g).astype(int), zero_division=0) for g in grid)
        got = f1_score(t[:, j], (prob[:, j] >= th[j]).astype(int), zero_division=0)
        assert got == pytest.approx(best)
        assert np.any(np.isclose(grid, th[j]))
    # tuned thresholds never lower the mean F1 on the data they were tuned on
    assert M.au_score(t, prob, th)["f1_mean"] >= M.au_score(t, prob)["f1_mean"] - 1e-12


def test_tune_au_thresholds_known_optimum_and_ties():
    # AU 0 is separable at any threshold in (0.3, 0.7]; AU 1 has no positive label: every F1 ties at 0
    t = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    p = np.array([[0.9, 0.9], [0.7, 0.6], [0.3, 0.2], [0.1, 0.1]])
    th = M.tune_au_thresholds(t, p, grid=[0.2, 0.4, 0.5, 0.8])
    assert th[0] == 0.5  # 0.4 and 0.5 both give F1 1; the tie goes to the value nearest 0.5
    assert th[1] == 0.5
    th = M.tune_au_thresholds(t, p, grid=[0.2, 0.4, 0.8])
    assert th.tolist() == [0.4, 0.4]
    with pytest.raises(ValueError, match="grid"):
        M.tune_au_thresholds(t, p, grid=[])


# ----------------------------------------------------------------------------------------------------------------------
# EXPR


def test_expr_score_matches_sklearn_with_sentinels(rng):
    n = 500
    t = rng.integers(0, 7, size=n)
    logits = rng.normal(size=(n, 7))
    logits[np.arange(n), t] += 1.0
    t_m = t.copy()
    t_m[:40] = -1
    r = M.expr_score(t_m, logits)
    pk, tk = logits[40:].argmax(1), t[40:]
    f1 = f1_score(tk, pk, average="macro", labels=list(range(7)), zero_division=0)
    acc = accuracy_score(tk, pk)
    assert r["f1_macro"] == pytest.approx(f1)
    assert r["accuracy"] == pytest.approx(acc)
    assert r["score"] == pytest.approx(0.67 * f1 + 0.33 * acc)
    assert r["f1_per_class"] == pytest.approx(list(f1_score(tk, pk, average=None, labels=list(range(7)))))
    # labels instead of scores give the same result
    labels = logits.argmax(1)
    assert M.expr_score(t_m, labels)["score"] == pytest.approx(r["score"])


def test_expr_class_never_predicted_nor_present_counts_as_zero():
    t = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 1])  # class 2 never predicted, classes 3..6 absent everywhere
    r = M.expr_score(t, p)
    assert r["f1_per_class"][2] == 0.0
    assert r["f1_per_class"][3:] == [0.0] * 4
    expected_f1 = (1.0 + 0.8 + 0 + 0 + 0 + 0 + 0) / 7  # class 1: P=2/3, R=1 -> 0.8
    assert r["f1_macro"] == pytest.approx(expected_f1)
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["score"] == pytest.approx(0.67 * expected_f1 + 0.33 * 0.8)
    # with only the 3 classes seen the macro mean is larger: C really is the full class count
    assert M.expr_score(t, p, num_classes=3)["f1_macro"] == pytest.approx(1.8 / 3)


def test_expr_score_2022_is_plain_macro_f1(rng):
    t = rng.integers(0, 8, size=200)
    p = np.where(rng.random(200) < 0.6, t, rng.integers(0, 8, size=200))
    r = M.expr_score_2022(t, p)
    assert r["score"] == pytest.approx(f1_score(t, p, average="macro", labels=list(range(8)), zero_division=0))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\]"):  # 7 ("Other") is not a 2020 class
        M.expr_score(t, p)


def test_expr_score_errors():
    with pytest.raises(ValueError, match="no labeled rows"):
        M.expr_score(np.array([-1, -1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="y_true has 2 rows but y_pred has 1"):
        M.expr_score(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="num_classes"):
        M.expr_score(np.array([0, 1]), np.zeros((2, 7)), num_classes=8)
    with pytest.raises(ValueError, match=r"y_true labels must lie in \[0, 6\] or be -1"):
        M.expr_score(np.array([0, 9]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"predicted labels must lie in \[0, 6\]"):
        M.expr_score(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match=r"y_true must be 1-D class indices, got shape \(1, 2\)"):
        M.expr_score(np.array([[0, 1]]), np.array([0, 1]))


# ----------------------------------------------------------------------------------------------------------------------
# bootstrap


def _video_data(rng, n_videos=30):
    groups, t, p = [], [], []
    for v in range(n_videos):
        n = int(rng.integers(20, 60))
        x = rng.uniform(-1, 1, size=(n, 2))
        groups += [f"video{v}"] * n
        t.append(x)
        p.append(np.clip(0.7 * x + rng.normal(scale=0.3, size=(n, 2)), -1, 1))
    return np.concatenate(t), np.concatenate(p), np.array(groups)


def test_bootstrap_deterministic_and_contains_point(rng):
    t, p, g = _video_data(rng)
    a = M.bootstrap_ci(M.va_score, t, p, g, n_boot=100, seed=7)
    b = M.bootstrap_ci(M.va_score, t, p, g, n_boot=100, seed=7)
    c = M.bootstrap_ci(M.va_score, t, p, g, n_boot=100, seed=8)
    assert a == b
    assert (a["low"], a["high"]) != (c["low"], c["high"])
    assert a["score"] == pytest.approx(M.va_score(t, p)["score"])
    assert a["low"] < a["score"] < a["high"]
    assert a["n_boot"] == 100
    assert 0 < a["high"] - a["low"] < 0.5


def test_bootstrap_resamples_whole_videos(rng):
    # one video per distinct constant value: a replicate's score reveals how many rows of each video it holds
    n_videos, rows = 5, 7
    g = np.repeat([f"v{i}" for i in range(n_videos)], rows)
    t = np.repeat(np.arange(n_videos), rows)
    seen = []

    def count_fn(y_true, y_pred):
        counts = np.bincount(y_true, minlength=n_videos)
        seen.append(counts)
        return {"score": float(len(y_true))}

    M.bootstrap_ci(count_fn, t, t, g, n_boot=20, seed=0)
    for counts in seen:
        assert np.all(counts % rows == 0)  # whole videos only
        assert counts.sum() == n_videos * rows  # as many videos as the data has


def test_bootstrap_key_and_partial(rng):
    t = (rng.random((300, 3)) < 0.4).astype(int)
    prob = np.clip(0.4 * t + 0.6 * rng.random((300, 3)), 0, 1)
    g = np.repeat(np.arange(30), 10)
    fn = functools.partial(M.au_score, thresholds=[0.3, 0.5, 0.7])
    r = M.bootstrap_ci(fn, t, prob, g, n_boot=50, key="accuracy")
    assert r["score"] == pytest.approx(fn(t, prob)["accuracy"])
    assert r["low"] <= r["score"] <= r["high"]


def test_bootstrap_skips_unscorable_replicates():
    # video b has no label at all: replicates drawing only b cannot be scored and are skipped, not fatal
    t = np.array([0, 1, 2, -1, -1, -1])
    p = np.array([0, 1, 1, 0, 0, 0])
    g = np.array(["a", "a", "a", "b", "b", "b"])
    r = M.bootstrap_ci(M.expr_score, t, p, g, n_boot=40, seed=3)
    assert r["n_boot"] + r["n_skipped"] == 40
    assert r["n_skipped"] > 0


def test_bootstrap_errors(rng):
    t, p, g = _video_data(rng, n_videos=3)
    with pytest.raises(ValueError, match="row counts"):
        M.bootstrap_ci(M.va_score, t, p, g[:-1])
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_ci(M.va_score, t, p, g, alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci(M.va_score, t, p, g, n_boot=0)


def test_thresholds_tuned_for_the_abaw2020_score_never_lower_it_on_the_tuning_data() -> None:
    """F1-tuned thresholds can lower the 2020 AU score (they trade accuracy for F1); score-tuned ones cannot, since
    the score is a mean over AUs of 0.5 F1 + 0.5 accuracy and 0.5 is on the grid."""
    rng = np.random.default_rng(0)
    y = (rng.random((400, 8)) < np.linspace(0.03, 0.4, 8)).astype(int)
    p = np.clip(0.35 * y + rng.random((400, 8)) * 0.7, 0, 1)
    at_half = M.au_score(y, p)["score"]
    tuned = M.tune_au_thresholds(y, p, objective="abaw2020")
    assert M.au_score(y, p, tuned)["score"] >= at_half
    for th in np.linspace(0.05, 0.95, 19):  # and no single grid value for any AU does better
        for j in range(8):
            other = tuned.copy()
            other[j] = th
            assert M.au_score(y, p, other)["score"] <= M.au_score(y, p, tuned)["score"] + 1e-12
    f1_tuned = M.tune_au_thresholds(y, p)
    assert M.au_score(y, p, f1_tuned)["f1_mean"] >= M.au_score(y, p, tuned)["f1_mean"]
    with pytest.raises(ValueError, match="objective"):
        M.tune_au_thresholds(y, p, objective="auc")
