"""SynthAffWild: written in the ABAW 2020 layout (test split apart), read back exactly, deterministic, credible, with
its own reference and floor per split."""

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
from mtanet.data import SPLITS, load_frames, read_split
from mtanet.errors import OutputExistsError
from mtanet.tasks import AU_NAMES_2020, EXPR_NAMES_2020, TASKS


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synth.MANIFEST_FILE}


def test_round_trip_gives_exactly_the_generated_labels(smoke_root: Path) -> None:
    checked = {t: 0 for t in TASKS}
    for split in SPLITS:
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
    tables = {split: read_split(smoke_root, split) for split in SPLITS}
    names = set().union(*(set(t.frames["name"]) for t in tables.values()))
    assert any(n.endswith("_left") for n in names) and any(n.endswith("_right") for n in names)
    for split, table in tables.items():
        frames = table.frames
        assert (frames["image"] == "").any(), split  # frames without a face
        assert frames["valence"].isna().any() and (frames["expression"] == -1).any(), split  # unlabeled stretches
        assert table.edition.name == "2020"
        for task in TASKS:  # every task in every split, test included
            assert (frames[f"split_{task}"] == split).any(), (split, task)
        # subjects never cross splits, so no video is in one task's training split and another's held-out split
        assert len(table.report.cross_task_overlap) == 0
        assert not table.report.counts, (split, dict(table.report.counts))
    assert (smoke_root / "annotations" / "VA_Set" / "Test_Set").is_dir()


def _traits(subject: int = 0) -> synth.SubjectTraits:
    return synth.subject_traits(0, subject)


def test_subjects_are_disjoint_across_splits_and_the_manifest_says_where_each_video_is(smoke_root: Path) -> None:
    manifest = json.loads((smoke_root / synth.MANIFEST_FILE).read_text())
    videos = manifest["videos"]
    assert {v["split"] for v in videos} == set(SPLITS)
    split_of: dict[int, str] = {}
    for v in videos:
        assert split_of.setdefault(v["subject"], v["split"]) == v["split"], f"subject {v['subject']} crosses splits"
    for split in SPLITS:
        frames = load_frames(smoke_root, split)
        listed = {v["name"] for v in videos if v["split"] == split}
        assert set(frames["name"]) == listed, split
        for v in videos:
            if v["split"] == split:
                assert frames.loc[frames["name"] == v["name"], "frame"].max() == v["frames"]
    assert manifest["subjects"] == {s: len({v["subject"] for v in videos if v["split"] == s}) for s in SPLITS}
    # the plan, not chance, keeps them apart: a bigger size has subjects in several videos, never across splits
    plan = synth.plan_videos(0, "cpu")
    seen: dict[int, set[str]] = {}
    for video in plan:
        for _, subject in video.people:
            seen.setdefault(subject, set()).add(video.split)
    assert all(len(s) == 1 for s in seen.values())
    assert sum(1 for v in plan for _, s in v.people) > len(seen), "no subject appears in two videos"


def test_expressions_are_skewed_like_affwild2() -> None:
    rng = np.random.default_rng(0)
    plans = [synth.plan_person(rng, f"p{i}", 600, _traits(i)) for i in range(60)]
    expression = np.concatenate([p.expression for p in plans])
    share = np.bincount(expression, minlength=7) / expression.size
    named = dict(zip(EXPR_NAMES_2020, share))
    # ABAW2020.md: Neutral about 62% of the labelled frames, then Happiness and Sadness; Disgust and Fear rare
    assert named["Neutral"] == share.max() and 0.5 < named["Neutral"] < 0.75
    assert named["Disgust"] < 0.03 and named["Fear"] < 0.03
    assert named["Happiness"] > named["Anger"] and named["Sadness"] > named["Anger"]


def test_expressions_drive_their_action_units_and_the_circumplex() -> None:
    rng = np.random.default_rng(1)
    plans = [synth.plan_person(rng, f"p{i}", 600, _traits(i)) for i in range(40)]
    expression = np.concatenate([p.expression for p in plans])
    au = np.concatenate([synth.latent_labels(p)["au"] for p in plans])
    va = np.concatenate([p.va for p in plans])
    col = {a: i for i, a in enumerate(AU_NAMES_2020)}
    happy, sad, surprise = (expression == EXPR_NAMES_2020.index(e) for e in ("Happiness", "Sadness", "Surprise"))
    assert au[happy, col["AU12"]].mean() > 0.5 and au[~happy, col["AU12"]].mean() < 0.15
    assert au[sad, col["AU15"]].mean() > 0.4
    assert au[surprise][:, [col["AU1"], col["AU2"]]].max(axis=1).mean() > 0.4  # brows up, not always both
    assert va[happy, 0].mean() > 0.3 and va[sad, 0].mean() < -0.3 and va[surprise, 1].mean() > 0.3
    assert np.abs(va).max() < 1.0
    # valence-arousal varies smoothly: consecutive frames differ far less than random pairs
    steps = np.abs(np.diff(plans[0].va, axis=0)).mean()
    assert steps < 0.1 * np.abs(plans[0].va - plans[0].va.mean(axis=0)).mean() + 0.02


def test_each_task_holds_information_the_others_lack() -> None:
    """Related the way faces are, not identical: AUs fire without an expression, VA moves without one, and two
    subjects show the same expression with different actions."""
    rng = np.random.default_rng(5)
    plans = [synth.plan_person(rng, f"p{i}", 600, _traits(i)) for i in range(40)]
    expression = np.concatenate([p.expression for p in plans])
    au = np.concatenate([synth.latent_labels(p)["au"] for p in plans])
    va = np.concatenate([p.va for p in plans])
    neutral = expression == 0
    col = {a: i for i, a in enumerate(AU_NAMES_2020)}
    assert au[neutral, col["AU25"]].mean() > 0.05, "speech should part the lips without an expression"
    assert (au[neutral].sum(axis=1) > 0).mean() > 0.1, "AUs should be active in Neutral frames"
    assert va[neutral].std(axis=0).min() > 0.1, "VA should vary within Neutral frames (mood, drift, speech)"
    cue = np.concatenate([p.cue_va for p in plans])
    assert np.corrcoef(cue[:, 0], va[:, 0])[0, 1] > 0.3  # the non-AU cues carry part of valence
    patterns = {tuple(sorted(_traits(i).prototypes["Happiness"])) for i in range(30)}
    assert len(patterns) > 3, "subjects should smile in their own ways"


def test_annotations_are_noisy_versions_of_the_latents() -> None:
    rng = np.random.default_rng(2)
    plan = synth.plan_person(rng, "p", 3000, _traits(2))
    notes = synth.annotate(rng, plan)
    latent = synth.latent_labels(plan)
    labeled = np.isfinite(notes["va"]).all(axis=1)
    diff = notes["va"][labeled] - latent["va"][labeled]
    assert 0.05 < np.abs(diff).mean() < 0.3
    # the VA annotation is the mean of the raters, who disagree
    assert notes["va_raters"].shape == (synth.VA_ANNOTATORS, 3000, 2)
    np.testing.assert_allclose(np.clip(notes["va_raters"].mean(0), -1, 1)[labeled], notes["va"][labeled], atol=1e-6)
    assert np.abs(notes["va_raters"][0] - notes["va_raters"][1]).mean() > 0.05
    au_labeled = (notes["au"] >= 0).all(axis=1)
    agreement = (notes["au"][au_labeled] == latent["au"][au_labeled]).mean()
    assert 0.85 < agreement < 0.995
    assert (~labeled).any() and (notes["expr"] == -1).any()


def _plan_with_an_ending(n: int = 300, tail: int = 20) -> synth.VideoPlan:
    """A quiet video that ends with a strong happy episode in its last ``tail`` frames."""
    from mtanet.synth.render import ACTIONS

    actions = np.zeros((n, len(ACTIONS)))
    actions[-tail:, ACTIONS.index("AU12")] = 1.0
    episode = np.zeros(n, dtype=np.int64)
    episode[-tail:] = EXPR_NAMES_2020.index("Happiness")
    intensity = np.where(episode > 0, 1.0, 0.0)
    va = np.zeros((n, 2), dtype=np.float32)
    va[-tail:] = 0.9
    return synth.VideoPlan("p", actions, np.where(intensity > 0, episode, 0), va, np.ones(n, dtype=bool), episode,
                           intensity, np.zeros((n, 2), dtype=np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_no_label_wraps_around_a_videos_ends(seed: int) -> None:
    """Lagged raters and shifted boundaries are clamped: the end of a video never leaks into its first frames."""
    notes = synth.annotate(np.random.default_rng(seed), _plan_with_an_ending())
    head = slice(0, 60)
    va = notes["va"][head]
    assert np.nanmax(np.abs(va)) < 0.5, "the final episode's valence appeared at the start"
    assert not (notes["expr"][head] == EXPR_NAMES_2020.index("Happiness")).any()


def test_pixel_noise_is_seeded_per_video_and_frame(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mtanet.synth import generate

    seen: list[tuple[int, int]] = []
    real = generate.render_face

    def spy(identity, actions, nuisance, valence, arousal):
        seen.append((len(seen), nuisance.noise_seed))
        return real(identity, actions, nuisance, valence, arousal)

    monkeypatch.setattr(generate, "render_face", spy)
    (tmp_path / synth.LATENT_DIR).mkdir()
    seeds = []
    for index in (0, 1):
        seen.clear()
        video = synth.VideoSpec(index, "train", ("va",), ((f"{index + 1}-30-640x480", index),), 12)
        generate._write_video((str(tmp_path), 0, video))
        seeds.append([s for _, s in seen])
    first, second = seeds
    assert len(set(first)) == len(first), "two frames of a video share a noise pattern"
    shared = min(len(first), len(second))
    assert all(a != b for a, b in zip(first[:shared], second[:shared])), "videos share the noise at frame t"


def test_reference_and_floor_per_split(smoke_root: Path) -> None:
    written = json.loads((smoke_root / synth.CEILING_FILE).read_text())
    assert set(written["splits"]) == set(SPLITS) and set(written["definitions"]) == {"reference", "floor"}
    for split, bounds in written["splits"].items():
        for task in TASKS:
            assert bounds["reference_score"][task] < 1.0, (split, task)  # the annotations are noisy
        assert bounds["floor_score"]["va"] == 0.0  # a constant has CCC 0
        # raters agree imperfectly (on a split of a few videos the mean can even fall below zero)
        assert -1.0 < bounds["annotators"]["valence_pairwise_ccc"] < 1.0


def test_floor_is_the_best_constant_per_au(smoke_root: Path) -> None:
    """No constant AU prediction (any of the 2^8 present/absent choices) beats the floor, and it is reached."""
    from itertools import product

    from mtanet.data import label_arrays
    from mtanet.metrics import au_score, expr_score

    written = json.loads((smoke_root / synth.CEILING_FILE).read_text())["splits"]
    for split in SPLITS:
        targets, masks = label_arrays(load_frames(smoke_root, split), AU_NAMES_2020)
        y = targets["au"][masks["au"]].astype(int)
        best = max(au_score(y, np.tile(np.array(c, dtype=float), (len(y), 1)))["score"]
                   for c in product((0.0, 1.0), repeat=len(AU_NAMES_2020)))
        assert written[split]["floor_score"]["au"] == pytest.approx(best, abs=2e-6), split
        # one constant for all AUs is not the floor when a per-AU choice scores more
        e = targets["expr"][masks["expr"]]
        best_expr = max(expr_score(e, np.full(len(e), k), num_classes=7)["score"] for k in range(7))
        assert written[split]["floor_score"]["expr"] == pytest.approx(best_expr, abs=2e-6), split


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


def test_test_labels_never_reach_training_or_selection(smoke_root: Path, tmp_path: Path) -> None:
    """Training (and the selection of best checkpoints on validation) gives exactly the same run whatever the test
    annotations hold: here they are replaced by bytes no reader would accept."""
    from mtanet.data import annotation_fingerprint
    from mtanet.train import train

    scrambled = tmp_path / "scrambled"
    shutil.copytree(smoke_root, scrambled)
    test_files = sorted((scrambled / "annotations").glob("*/Test_Set/*.txt"))
    assert test_files
    for path in test_files:
        path.write_bytes(b"\x00not an annotation\xff\n")
    with pytest.raises(Exception):  # the garbage is real: reading the test split itself fails
        load_frames(scrambled, "test")
    assert annotation_fingerprint(scrambled) == annotation_fingerprint(smoke_root)

    def run(root: Path, out: Path) -> tuple[list[dict], dict]:
        train(dict(data_root=str(root), backbone="seresnet18", image_size=32, batch_size=8, feature_dim=64,
                   steps_per_epoch=3, stage1_epochs=1, stage2_epochs=1, threads=1, num_workers=0, log_every=1,
                   eval_batch_size=64, output_dir=str(out), progress=False, device="cpu", seed=0))
        log = [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "val_seconds")}
               for line in (out / "log.jsonl").read_text().splitlines()]
        metrics = json.loads((out / "metrics.json").read_text())
        return log, {k: metrics[k] for k in ("final", "best")}

    assert run(smoke_root, tmp_path / "a") == run(scrambled, tmp_path / "b")


def test_a_new_generator_changes_the_fingerprint_that_guards_resumed_runs(smoke_root: Path, tmp_path: Path) -> None:
    """Same labels, other images: the twin's generator version (and size, seed) is part of the data fingerprint, so a
    run trained on an older twin is neither resumed nor reused; a broken manifest is named, never skipped."""
    from mtanet.data import annotation_fingerprint
    from mtanet.errors import DataFormatError

    copy = tmp_path / "twin"
    shutil.copytree(smoke_root, copy, ignore=shutil.ignore_patterns("*.jpg"))
    assert annotation_fingerprint(copy) == annotation_fingerprint(smoke_root)  # images are not part of it
    manifest = json.loads((copy / synth.MANIFEST_FILE).read_text())
    (copy / synth.MANIFEST_FILE).write_text(json.dumps({**manifest, "generator_version": manifest["generator_version"] - 1}))
    assert annotation_fingerprint(copy) != annotation_fingerprint(smoke_root)
    (copy / synth.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DataFormatError, match=synth.MANIFEST_FILE):
        annotation_fingerprint(copy)
