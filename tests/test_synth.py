"""SynthAffWild: written in the ABAW 2020 layout, read back exactly, deterministic, credible, with its own ceiling."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtanet import synth
from mtanet.synth import render
from mtanet.synth.generate import _smooth_noise
from mtanet.data import load_frames, read_split
from mtanet.errors import OutputExistsError
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
    again.mkdir()  # an empty folder is fine to write into
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
    with pytest.raises(OutputExistsError, match="different synthetic dataset.*--overwrite"):
        synth.write_synth(smoke_root, "smoke", seed=5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):  # OutputExistsError is a FileExistsError
        synth.write_synth(tmp_path / "busy", "smoke")
    with pytest.raises(ValueError, match="size must be one of"):
        synth.write_synth(tmp_path / "x", "huge")
    assert manifest["images"] < manifest["frames"]  # some frames have no face


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_synth(smoke_root: Path, where: Path, **manifest_changes) -> Path:
    """A copy of the smoke set whose manifest says it was written with other settings (no generation needed)."""
    shutil.copytree(smoke_root, where)
    manifest = json.loads((where / synth.MANIFEST_FILE).read_text())
    (where / synth.MANIFEST_FILE).write_text(json.dumps({**manifest, **manifest_changes}))
    return where


@pytest.mark.parametrize("case", ["user_files", "manifest_beside_user_file", "file_inside_synth_folder",
                                  "real_affwild2_with_a_manifest", "symlink_inside", "unreadable_manifest",
                                  "a_file"])
def test_overwrite_refuses_what_synth_did_not_write_and_deletes_nothing(smoke_root: Path, tmp_path: Path,
                                                                        case: str) -> None:
    from conftest import RootBuilder

    root = tmp_path / "target"
    if case == "user_files":
        (root / "photos").mkdir(parents=True)
        (root / "photos" / "me.jpg").write_bytes(b"mine")
        (root / "notes.txt").write_text("mine")
    elif case == "manifest_beside_user_file":
        _fake_synth(smoke_root, root, seed=7)
        (root / "my_results.csv").write_text("mine")
    elif case == "file_inside_synth_folder":  # the user's own annotation of a real video among the generated ones
        _fake_synth(smoke_root, root, seed=7)
        (root / "annotations" / "VA_Set" / "Training_Set" / "video10.txt").write_text("valence,arousal\n0,0\n")
    elif case == "real_affwild2_with_a_manifest":
        b = RootBuilder(root)
        b.annotation("va", "train", "1-30-1280x720", "valence,arousal\n0.1,0.2\n")
        b.images("1-30-1280x720", [1])
        shutil.copy(smoke_root / synth.MANIFEST_FILE, root / synth.MANIFEST_FILE)
        manifest = json.loads((root / synth.MANIFEST_FILE).read_text())
        (root / synth.MANIFEST_FILE).write_text(json.dumps({**manifest, "seed": 7}))
    elif case == "symlink_inside":
        _fake_synth(smoke_root, root, seed=7)
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
        (root / "synth_latent" / "99-30-640x480.npz").symlink_to(tmp_path / "elsewhere" / "keep.txt")
    elif case == "unreadable_manifest":
        _fake_synth(smoke_root, root)
        (root / synth.MANIFEST_FILE).write_text("{not json")
    else:
        root.write_text("mine")
    before = _files(root) if root.is_dir() else root.read_bytes()
    with pytest.raises(OutputExistsError, match="nothing was deleted|is a file, not a folder") as err:
        synth.write_synth(root, "smoke", seed=0, overwrite=True)
    assert str(root) in str(err.value) and "\n" not in str(err.value)
    assert (_files(root) if root.is_dir() else root.read_bytes()) == before
    assert not root.with_name("target.partial").exists()
    if case == "symlink_inside":
        assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_synthetic_dataset_and_its_own_leftovers_only(smoke_root: Path, tmp_path: Path) -> None:
    root = _fake_synth(smoke_root, tmp_path / "synth", seed=3)
    # an interrupted earlier build: ours (marker first), with a temp file of a killed atomic write
    partial = tmp_path / "synth.partial"
    (partial / synth.LATENT_DIR).mkdir(parents=True)
    (partial / synth.PARTIAL_MARKER).write_text("{}")
    (partial / f".{synth.MANIFEST_FILE}.abc123.tmp").write_text("")
    manifest = synth.write_synth(root, "smoke", seed=0, overwrite=True, workers=1)
    assert manifest["seed"] == 0 and not partial.exists()
    assert _tree_digest(root) == _tree_digest(smoke_root)
    assert not (root / synth.PARTIAL_MARKER).exists()

    # a folder named like the build folder that is not a leftover of ours is refused, untouched
    other = _fake_synth(smoke_root, tmp_path / "other", seed=3)
    stranger = tmp_path / "other.partial"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"other\.partial exists and was not written by mtanet synth"):
        synth.write_synth(other, "smoke", seed=0, overwrite=True)
    assert (stranger / "thesis.tex").read_text() == "mine"
    assert json.loads((other / synth.MANIFEST_FILE).read_text())["seed"] == 3


def test_cli_synth_overwrite_of_a_user_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mtanet.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["synth", str(tmp_path / "mine"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtanet: error: ") and err.count("\n") == 1 and "notes.txt" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


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
