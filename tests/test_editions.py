"""Every ABAW edition scored as it defines itself (issue 16): the rules of :func:`mtanet.metrics.edition_scores`
checked against the formulas written out with scikit-learn, and ``mtanet evaluate`` on small trees of the 2020,
2021 and 2022 layouts naming the edition of the root in every score it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RootBuilder, jpeg_bytes
from sklearn.metrics import accuracy_score, f1_score

from mtanet import evaluate as E
from mtanet import metrics as M
from mtanet.data import load_frames
from mtanet.errors import ConfigError
from mtanet.models import MTANet, model_from_checkpoint, read_checkpoint, save_checkpoint
from mtanet.tasks import EDITIONS

RNG_SEED = 7


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    return 2 * np.cov(x, y, bias=True)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def labels(n_au: int, n_expr: int, n: int = 400, seed: int = RNG_SEED):
    """Ground truth with sentinels and predictions that agree with it in part."""
    rng = np.random.default_rng(seed)
    va = rng.uniform(-1, 1, (n, 2))
    va[:20] = -5.0  # unlabeled
    va_pred = np.clip(0.6 * va + rng.normal(0, 0.3, (n, 2)), -1, 1)
    au = (rng.random((n, n_au)) < 0.3).astype(np.int64)
    au[20:40] = -1
    au_prob = np.clip(0.5 * au + rng.random((n, n_au)) * 0.6, 0, 1)
    expr = rng.integers(0, n_expr, n)
    expr[40:60] = -1
    expr_scores = rng.random((n, n_expr)) + 1.2 * np.eye(n_expr)[np.clip(expr, 0, None)] * (rng.random((n, 1)) < 0.5)
    return ({"va": va_pred, "au": au_prob, "expr": expr_scores}, {"va": va, "au": au, "expr": expr})


def by_hand(pred: dict, true: dict, n_expr: int) -> dict:
    """The pieces of every formula, computed here without mtanet."""
    v = np.all(np.abs(true["va"]) <= 1, axis=1)
    a = np.all(true["au"] >= 0, axis=1)
    e = true["expr"] >= 0
    b = (pred["au"][a] >= 0.5).astype(int)
    p = pred["expr"][e].argmax(1)
    return {
        "va": (ccc(true["va"][v, 0], pred["va"][v, 0]) + ccc(true["va"][v, 1], pred["va"][v, 1])) / 2,
        "au_f1": np.mean([f1_score(true["au"][a][:, k], b[:, k], zero_division=0) for k in range(b.shape[1])]),
        "au_acc": float(np.mean(b == true["au"][a])),
        "expr_f1": f1_score(true["expr"][e], p, labels=list(range(n_expr)), average="macro", zero_division=0),
        "expr_acc": accuracy_score(true["expr"][e], p),
    }


@pytest.mark.parametrize("name, rule", [("2020", "2020"), ("2021", "2021"), ("2022", "2022"), ("2024", "2022"),
                                        ("2020-custom", "2020"), ("2022-custom", "2022")])
def test_scoring_rule_of_each_edition(name: str, rule: str) -> None:
    assert M.scoring_rule(name) == rule
    if name in EDITIONS:
        assert M.scoring_rule(EDITIONS[name]) == rule


@pytest.mark.parametrize("bad", ["2019", "custom", "", "20201"])
def test_an_edition_without_rules_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot score edition"):
        M.scoring_rule(bad)


@pytest.mark.parametrize("edition", ["2020", "2021"])
def test_2020_and_2021_use_table_i_formulas(edition: str) -> None:
    ed = EDITIONS[edition]
    pred, true = labels(len(ed.au_names), len(ed.expr_names))
    got = M.edition_scores(edition, pred, true)
    want = by_hand(pred, true, len(ed.expr_names))
    assert got["edition"] == edition and got["rule"] == edition
    assert all(got[t]["edition"] == edition for t in ("va", "au", "expr"))
    assert got["va"]["score"] == pytest.approx(want["va"], abs=1e-9)
    assert got["au"]["score"] == pytest.approx(0.5 * want["au_f1"] + 0.5 * want["au_acc"], abs=1e-9)
    assert got["expr"]["score"] == pytest.approx(0.67 * want["expr_f1"] + 0.33 * want["expr_acc"], abs=1e-9)
    assert len(got["au"]["f1_per_au"]) == len(ed.au_names)  # 8 in 2020, 12 in 2021
    mean = np.mean([got[t]["score"] for t in ("va", "au", "expr")])
    assert got["combined"]["score"] == pytest.approx(mean) and got["mean"] == pytest.approx(mean)


def test_2022_scores_mean_f1_macro_f1_over_8_and_their_sum() -> None:
    pred, true = labels(12, 8)
    true["expr"][60:90] = 7  # Other, labeled and scored
    got = M.edition_scores("2022", pred, true)
    want = by_hand(pred, true, 8)
    assert got["edition"] == "2022" and got["rule"] == "2022"
    assert got["au"]["score"] == pytest.approx(want["au_f1"], abs=1e-9)
    assert got["expr"]["score"] == pytest.approx(want["expr_f1"], abs=1e-9)
    assert len(got["expr"]["f1_per_class"]) == 8
    assert got["combined"]["score"] == pytest.approx(want["va"] + want["au_f1"] + want["expr_f1"], abs=1e-9)
    assert "P_MTL" in got["combined"]["name"]
    # the same arrays under the 2021 rule would be another number: the rule is not ignored
    assert got["au"]["score"] != pytest.approx(0.5 * want["au_f1"] + 0.5 * want["au_acc"])


def test_2022_sum_needs_all_three_tasks() -> None:
    pred, true = labels(12, 8)
    got = M.edition_scores("2022", {"va": pred["va"], "expr": pred["expr"]}, true)
    assert "au" not in got and got["combined"]["score"] is None and got["combined"]["tasks"] == ["va", "expr"]
    assert got["mean"] == pytest.approx((got["va"]["score"] + got["expr"]["score"]) / 2)


@pytest.mark.parametrize("edition, task, width", [("2022", "au", 8), ("2020", "au", 12), ("2022", "expr", 7),
                                                  ("2021", "expr", 8)])
def test_predictions_of_another_edition_are_refused(edition: str, task: str, width: int) -> None:
    ed = EDITIONS[edition]
    pred, true = labels(len(ed.au_names), len(ed.expr_names))
    other, other_true = labels(width if task == "au" else 8, width if task == "expr" else 7)
    pred[task], true[task] = other[task], other_true[task]
    with pytest.raises(ValueError, match=f"edition {edition} scores {task} over"):
        M.edition_scores(edition, pred, true)


def test_masks_choose_the_scored_rows() -> None:
    pred, true = labels(8, 7)
    keep = np.zeros(len(true["expr"]), dtype=bool)
    keep[100:300] = True
    got = M.edition_scores("2020", pred, true, {t: keep for t in ("va", "au", "expr")})
    sub = M.edition_scores("2020", {t: p[keep] for t, p in pred.items()}, {t: y[keep] for t, y in true.items()})
    for t in ("va", "au", "expr"):
        assert got[t]["score"] == sub[t]["score"]
    assert got["va"]["n"] == int(np.all(np.abs(true["va"][keep]) <= 1, axis=1).sum())


def test_per_au_thresholds_are_used() -> None:
    pred, true = labels(12, 8)
    th = np.linspace(0.2, 0.8, 12)
    got = M.edition_scores("2022", pred, true, au_thresholds=th)["au"]
    assert got["thresholds"] == pytest.approx(th.tolist())
    assert got["score"] == pytest.approx(M.au_score_2022(true["au"], pred["au"], th)["score"])


# --------------------------------------------------------------------------------------------------- small trees


def tree(root: Path, edition: str, split: str = "val") -> RootBuilder:
    """Three names per split with every task labeled, a few frames without a jpg."""
    b = RootBuilder(root, edition=edition)
    ed = b.ed
    rng = np.random.default_rng(int(edition[:4]))
    for s in ("train", split):
        for i in range(3):
            name = f"{s}_{i}"
            n = 12
            va = rng.uniform(-1, 1, (n, 2))
            b.annotation("va", s, name, "valence,arousal\n" + "".join(f"{x:.3f},{y:.3f}\n" for x, y in va))
            au = (rng.random((n, len(ed.au_names))) < 0.4).astype(int)
            b.annotation("au", s, name, ",".join(ed.au_names) + "\n" + "".join(",".join(map(str, r)) + "\n"
                                                                              for r in au))
            expr = rng.integers(0, len(ed.expr_names), n)
            b.annotation("expr", s, name, ",".join(ed.expr_names) + "\n" + "".join(f"{e}\n" for e in expr))
            b.images(name, [f for f in range(1, n + 1) if f not in (1, 6)], jpeg_bytes(i, size=32))
    return b


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    folder = tmp_path_factory.mktemp("ckpt")
    for edition in ("2020", "2021", "2022"):
        torch.manual_seed(0)
        model = MTANet("seresnet18_half", num_outputs=EDITIONS[edition].num_outputs, feature_dim=16)
        out[edition] = save_checkpoint(model, folder / f"model_{edition}.pt")
    return out


def run(checkpoint: Path, root: Path, out: Path, split: str = "val", **kw) -> dict:
    return E.evaluate(checkpoint, data_root=root, split=split, output_dir=out, batch_size=64, device="cpu",
                      threads=1, image_size=32, progress=False, **kw)


@pytest.mark.parametrize("edition", ["2020", "2021", "2022"])
def test_evaluate_scores_each_layout_by_its_edition(checkpoints: dict, tmp_path: Path, edition: str) -> None:
    b = tree(tmp_path / "root", edition)
    result = run(checkpoints[edition], b.root, tmp_path / "eval")
    on_disk = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert on_disk["edition"] == result["edition"] == edition
    for block in ("scores", "scores_all_frames"):
        scores = on_disk[block]
        assert scores["edition"] == edition and scores["rule"] == M.scoring_rule(edition)
        assert all(scores[t]["edition"] == edition for t in ("va", "au", "au_tuned", "expr"))
    assert on_disk["headline"]["edition"] == on_disk["headline_all_frames"]["edition"] == edition
    # the scores are the edition's own: recomputed from the files' frames by edition_scores
    frames = load_frames(b.root, "val")
    model = model_from_checkpoint(read_checkpoint(checkpoints[edition]))
    preds = E.predict_frames(model, frames, b.root, image_size=32, device="cpu")
    keep = (frames["image"] != "").to_numpy()
    ed = EDITIONS[edition]
    targets = {"va": frames[["valence", "arousal"]].to_numpy(), "au": frames[list(ed.au_names)].to_numpy(),
               "expr": frames["expression"].to_numpy()}
    want = M.edition_scores(edition, {t: p[keep] for t, p in preds.items()}, {t: y[keep] for t, y in targets.items()})
    for t in ("va", "au", "expr"):
        assert on_disk["scores"][t]["score"] == pytest.approx(want[t]["score"], abs=1e-6), t
    if edition == "2022":
        assert on_disk["headline"]["combined"] == pytest.approx(sum(want[t]["score"] for t in ("va", "au", "expr")))
    else:
        assert on_disk["headline"]["combined"] == pytest.approx(on_disk["headline"]["mean"])
    # the submission files are in the edition's folders with its headers
    for task, folder in ed.task_dirs.items():
        text = (tmp_path / "eval" / folder / "val_0.txt").read_text().splitlines()
        header = {"va": "valence,arousal", "au": ",".join(ed.au_names), "expr": ",".join(ed.expr_names)}[task]
        assert text[0] == header and len(text) == 13
    assert on_disk["provenance"]["input"]["path"] == str(b.root.resolve())


def test_a_model_of_another_edition_is_refused(checkpoints: dict, tmp_path: Path) -> None:
    b = tree(tmp_path / "root", "2022")
    with pytest.raises(ConfigError, match="edition 2022"):
        run(checkpoints["2020"], b.root, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("edition", ["2020", "2021", "2022"])
def test_a_table_that_lost_its_attrs_is_scored_by_its_label_set(tmp_path: Path, edition: str) -> None:
    b = tree(tmp_path / "root", edition)
    frames = load_frames(b.root, "val")
    ed = EDITIONS[edition]
    preds = {"expr": np.full((len(frames), len(ed.expr_names)), 1.0 / len(ed.expr_names))}
    assert E.frames_edition(frames, preds) == edition
    bare = frames.copy()
    bare.attrs = {}
    assert E.frames_edition(bare, preds) == edition
    assert E.score_predictions(bare, preds)["edition"] == edition
