"""SynthAffWild: written in the ABAW 2020 layout, read back exactly, deterministic, credible, with its own ceiling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mtanet import synth
from mtanet.synth import render
from mtanet.synth.generate import _smooth_noise
from mtanet.data import load_frames, read_split
from mtanet.tasks import AU_NAMES_2020, EXPR_NAMES_2020, TASKS


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synth.MANIFEST_FILE}


def test_round_trip_gives_exactly_the_generated_labels(smoke_root: Path) -> None:
    checked = {t: 0 for t in TASKS}
    for split in ("train", "val"):
        frames = load_frames(smoke_root, split, allow_cross_task_leak=True)
        for name, group in frames.groupby("name"):
            saved = np.load(smoke_root / synth.LATENT_DIR / f"{name}.npz")
            rows = group["frame"].to_numpy() - 1
            assert group["frame"].max() <= len(saved["face_present"])
            # frames with a jpg are exactly the frames where the face was present
            assert ((group["image"] != "").to_numpy() == saved["face_present"][rows]).all()
            if (group["split_va"] == split).all():
                expected = saved["annotated_va"][rows]
                got = group[["valence", "arousal"]].to_numpy()
                assert np.array_equal(np.isnan(got), np.isnan(expected))
                np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], atol=5e-5)
                checked["va"] += 1
            if (group["split_au"] == split).all():
                assert np.array_equal(group[list(AU_NAMES_2020)].to_numpy(), saved["annotated_au"][rows])
                checked["au"] += 1
            if (group["split_expr"] == split).all():
                assert np.array_equal(group["expression"].to_numpy(), saved["annotated_expr"][rows])
                checked["expr"] += 1
    assert all(n >= 3 for n in checked.values()), checked


def test_same_seed_same_bytes_whatever_the_worker_count(smoke_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth.write_synth(again, "smoke", seed=0, workers=1)
    assert _tree_digest(again) == _tree_digest(smoke_root)
    other = tmp_path / "other"
    synth.write_synth(other, "smoke", seed=1, workers=1)
    assert _tree_digest(other) != _tree_digest(smoke_root)


def test_write_is_idempotent_and_refuses_to_clobber(smoke_root: Path, tmp_path: Path) -> None:
    manifest = json.loads((smoke_root / synth.MANIFEST_FILE).read_text())
    before = (smoke_root / synth.MANIFEST_FILE).stat().st_mtime_ns
    assert synth.write_synth(smoke_root, "smoke", seed=0) == manifest
    assert (smoke_root / synth.MANIFEST_FILE).stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="different synthetic dataset"):
        synth.write_synth(smoke_root, "smoke", seed=5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        synth.write_synth(tmp_path / "busy", "smoke")
    with pytest.raises(ValueError, match="size must be one of"):
        synth.write_synth(tmp_path / "x", "huge")
    assert manifest["images"] < manifest["frames"]  # some frames have no face


def test_layout_has_the_real_datasets_irregularities(smoke_root: Path) -> None:
    train = read_split(smoke_root, "train")
    val = read_split(smoke_root, "val")
    names = set(train.frames["name"]) | set(val.frames["name"])
    assert any(n.endswith("_left") for n in names) and any(n.endswith("_right") for n in names)
    for table in (train, val):
        frames = table.frames
        assert (frames["image"] == "").any()  # frames without a face
        assert frames["valence"].isna().any() and (frames["expression"] == -1).any()  # unlabeled stretches
        assert table.edition.name == "2020"
    assert len(train.report.cross_task_overlap) >= 1  # a video in one task's val and another's train
    for task in TASKS:
        assert (train.frames[f"split_{task}"] == "train").any() and (val.frames[f"split_{task}"] == "val").any()
    # a clean synthetic set produces no skips but the deliberate cross-task masking
    assert set(train.report.counts) <= {"labels_masked_cross_task_leak"}
    assert not val.report.counts


def test_expressions_are_skewed_like_affwild2() -> None:
    rng = np.random.default_rng(0)
    plans = [synth.plan_person(rng, f"p{i}", 600) for i in range(60)]
    expression = np.concatenate([p.expression for p in plans])
    share = np.bincount(expression, minlength=7) / expression.size
    named = dict(zip(EXPR_NAMES_2020, share))
    assert named["Neutral"] == share.max() and 0.4 < named["Neutral"] < 0.75
    assert named["Disgust"] < 0.04 and named["Fear"] < 0.04
    assert named["Happiness"] > named["Sadness"] > named["Anger"]


def test_expressions_drive_their_action_units_and_the_circumplex() -> None:
    rng = np.random.default_rng(1)
    plans = [synth.plan_person(rng, f"p{i}", 600) for i in range(40)]
    expression = np.concatenate([p.expression for p in plans])
    au = np.concatenate([synth.latent_labels(p)["au"] for p in plans])
    va = np.concatenate([p.va for p in plans])
    col = {a: i for i, a in enumerate(AU_NAMES_2020)}
    happy, sad, surprise = (expression == EXPR_NAMES_2020.index(e) for e in ("Happiness", "Sadness", "Surprise"))
    assert au[happy, col["AU12"]].mean() > 0.7 and au[~happy, col["AU12"]].mean() < 0.1
    assert au[sad, col["AU15"]].mean() > 0.6
    assert au[surprise, col["AU2"]].mean() > 0.6
    assert va[happy, 0].mean() > 0.3 and va[sad, 0].mean() < -0.3 and va[surprise, 1].mean() > 0.4
    assert np.abs(va).max() < 1.0
    # valence-arousal varies smoothly: consecutive frames differ far less than random pairs
    steps = np.abs(np.diff(plans[0].va, axis=0)).mean()
    assert steps < 0.1 * np.abs(plans[0].va - plans[0].va.mean(axis=0)).mean() + 0.02


def test_annotations_are_noisy_versions_of_the_latents() -> None:
    rng = np.random.default_rng(2)
    plan = synth.plan_person(rng, "p", 2000)
    notes = synth.annotate(rng, plan)
    latent = synth.latent_labels(plan)
    labeled = np.isfinite(notes["va"]).all(axis=1)
    diff = notes["va"][labeled] - latent["va"][labeled]
    assert 0.02 < np.abs(diff).mean() < 0.2
    au_labeled = (notes["au"] >= 0).all(axis=1)
    agreement = (notes["au"][au_labeled] == latent["au"][au_labeled]).mean()
    assert 0.9 < agreement < 1.0
    assert (~labeled).any() and (notes["expr"] == -1).any()


def test_ceiling_sits_well_above_the_trivial_floor(smoke_root: Path) -> None:
    ceiling = json.loads((smoke_root / synth.CEILING_FILE).read_text())
    for task in TASKS:
        assert ceiling["ceiling_score"][task] > ceiling["trivial_best"][task] + 0.1, task
        assert ceiling["ceiling_score"][task] < 1.0  # the annotations are noisy
    assert ceiling["trivial"]["va_constant_mean"]["score"] == 0.0  # a constant has CCC 0


def test_faces_show_the_latent_actions() -> None:
    """The renderer is driven by the same latents the labels come from: a smile changes the mouth."""
    identity = render.random_identity(np.random.default_rng(4))
    clean = render.Nuisance()
    neutral = render.render_face(identity, {}, clean).astype(float)
    smile = render.render_face(identity, {"AU12": 1.0, "AU6": 1.0}, clean).astype(float)
    lm = render.landmarks(identity, {}, clean)
    y = int(lm["mouth_left"][1])
    mouth = slice(y - 8, y + 8)
    assert np.abs(smile[mouth] - neutral[mouth]).mean() > 2 * np.abs(smile[:20] - neutral[:20]).mean() + 1


def test_smooth_noise_has_its_scale_on_short_and_long_sequences() -> None:
    rng = np.random.default_rng(0)
    for n in (30, 60, 5000):
        draws = np.concatenate([_smooth_noise(rng, n, 25, 0.12) for _ in range(200)])
        # reflection at the ends raises the spread of very short sequences a little; never to a large constant
        assert 0.07 < draws.std() < 0.3, n
