"""``mtanet evaluate`` on a folder used before, on data without labels for a task, and after a failure.

A randomly initialised small model is enough here: what is checked is which files end up where, not the scores
(tests/test_train.py compares the scores with the trainer's own validation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtanet import evaluate as E
from mtanet.data import load_frames
from mtanet.errors import DataFormatError, OutputExistsError
from mtanet.models import MTANet, save_checkpoint
from mtanet.tasks import EDITIONS

TASK_FOLDERS = ("VA_Set", "AU_Set", "EXPR_Set")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MTANet("seresnet18_half", num_outputs=EDITIONS["2020"].num_outputs, feature_dim=16)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model.pt")


def run(checkpoint: Path, root: Path, out: Path, split: str = "val") -> dict:
    return E.evaluate(checkpoint, data_root=root, split=split, output_dir=out, batch_size=128, device="cpu",
                      threads=1, image_size=32, progress=False)


def submission_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for folder in TASK_FOLDERS for p in (out / folder).glob("*")
                  if (out / folder).is_dir())


def expected_files(root: Path, split: str) -> list[str]:
    frames = load_frames(root, split)
    return sorted(f"{folder}/{name}.txt" for folder, task in zip(TASK_FOLDERS, ("va", "au", "expr"))
                  for name in frames.loc[frames[f"split_{task}"] == split, "name"].unique())


def test_a_used_folder_holds_exactly_the_new_split_s_files(checkpoint: Path, smoke_root: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # beside the submission folders: never touched
    first = run(checkpoint, smoke_root, out, "val")
    assert first["files"] == submission_files(out) == expected_files(smoke_root, "val")
    second = run(checkpoint, smoke_root, out, "train")
    written = submission_files(out)
    assert written == second["files"] == expected_files(smoke_root, "train")
    assert set(first["files"]) - set(written), "the smoke set has validation names that are not training names"
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk["split"] == "train" and on_disk["files"] == written
    assert sum(on_disk["submission"][t]["files"] for t in ("va", "au", "expr")) == len(written)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["user_file_in_a_task_folder", "scores_json_of_someone_else",
                                  "scores_json_listing_a_path_outside", "task_folder_is_a_file"])
def test_a_folder_with_files_evaluate_did_not_write_is_refused_untouched(checkpoint: Path, smoke_root: Path,
                                                                         tmp_path: Path, case: str) -> None:
    out = tmp_path / "eval"
    run(checkpoint, smoke_root, out, "val")
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    if case == "user_file_in_a_task_folder":
        (out / "AU_Set" / "my_labels.txt").write_text("mine")
    elif case == "scores_json_of_someone_else":
        (out / "scores.json").write_text(json.dumps({"accuracy": 0.9}))
    elif case == "scores_json_listing_a_path_outside":
        scores = json.loads((out / "scores.json").read_text())
        (out / "scores.json").write_text(json.dumps({**scores, "files": scores["files"] + ["../keep.txt"]}))
    else:
        shutil.rmtree(out / "EXPR_Set")
        (out / "EXPR_Set").write_text("mine")
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="nothing was deleted") as err:
        run(checkpoint, smoke_root, out, "train")
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_a_failed_evaluation_leaves_no_partial_submission(checkpoint: Path, smoke_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "eval"
    run(checkpoint, smoke_root, out, "val")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "score_predictions", fail)  # after the submission files, before scores.json
    with pytest.raises(OSError, match="No space left"):
        run(checkpoint, smoke_root, out, "train")
    assert submission_files(out) == [] and not (out / "scores.json").exists()
    assert not any((out / folder).exists() for folder in TASK_FOLDERS)
    monkeypatch.undo()
    assert run(checkpoint, smoke_root, out, "train")["files"] == submission_files(out)  # the retry just works


def test_a_split_without_labels_for_a_task_is_an_error_naming_it(checkpoint: Path, smoke_root: Path,
                                                                 tmp_path: Path, capsys) -> None:
    from mtanet.cli import main

    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    shutil.rmtree(root / "annotations" / "EXPR_Set" / "Validation_Set")
    out = tmp_path / "eval"
    with pytest.raises(DataFormatError, match=r"EXPR_Set/Validation_Set: no val frame has both an image and a "
                                              r"label for expr, so the checkpoint's expr head could not be scored"):
        run(checkpoint, root, out, "val")
    assert not out.exists()
    assert main(["evaluate", str(checkpoint), "--data-root", str(root), "-o", str(out), "--device", "cpu",
                 "--image-size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtanet: error: ") and "EXPR_Set/Validation_Set" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------- test submissions


def listed_root(root: Path) -> Path:
    """Crop folders only, no annotations: a test set as the challenge hands it out."""
    from conftest import RootBuilder, jpeg_bytes

    b = RootBuilder(root)
    for name, frames in (("a", [2, 3, 5]), ("b", [1, 2]), ("c", [])):
        (root / "cropped_aligned" / name).mkdir(parents=True, exist_ok=True)
        for f in frames:
            b.images(name, [f], jpeg_bytes(10 * ord(name) + f, size=32))
    return root


def hand_table(root: Path, rows: list[tuple[str, int]]):
    """A frame table written out here, not by the code under test, for the model's own predictions."""
    import numpy as np
    import pandas as pd

    from mtanet.tasks import AU_NAMES_2020

    df = pd.DataFrame({"name": [n for n, _ in rows], "video": [n for n, _ in rows], "frame": [f for _, f in rows],
                       "image": [f"cropped_aligned/{n}/{f:05d}.jpg" for n, f in rows]})
    for t in ("va", "au", "expr"):
        df[f"split_{t}"] = "test"
    df["valence"] = np.nan
    df["arousal"] = np.nan
    df["expression"] = -1
    for au in AU_NAMES_2020:
        df[au] = -1
    return df


def test_a_test_list_gives_every_frame_of_every_listed_video(checkpoint: Path, tmp_path: Path) -> None:
    import hashlib

    from mtanet.models import load_model

    root = listed_root(tmp_path / "root")
    names = tmp_path / "test_names.txt"
    names.write_text("# ABAW test list\na\n\nb,6\nc,4\n")
    out = tmp_path / "sub"
    result = E.evaluate(checkpoint, data_root=root, split="test", names=names, output_dir=out, batch_size=8,
                        device="cpu", threads=1, image_size=32, progress=False)
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk["files"] == result["files"] == submission_files(out) == sorted(
        f"{folder}/{n}.txt" for folder in TASK_FOLDERS for n in "abc")
    assert on_disk["scores"] is None and on_disk["edition"] == "2020" and on_disk["frames"] == {"a": 5, "b": 6, "c": 4}
    lines = {(folder, n): (out / folder / f"{n}.txt").read_text().splitlines() for folder in TASK_FOLDERS
             for n in "abc"}
    assert lines[("VA_Set", "a")][0] == "valence,arousal"
    assert lines[("AU_Set", "a")][0] == "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"
    assert [len(lines[(f, n)]) - 1 for f in TASK_FOLDERS for n in "abc"] == [5, 6, 4] * 3
    # the frames with a jpg hold the model's own predictions
    model = load_model(checkpoint)
    faces = [("a", 2), ("a", 3), ("a", 5), ("b", 1), ("b", 2)]
    preds = E.predict_frames(model, hand_table(root, faces), root, image_size=32, device="cpu")
    for (n, f), va in zip(faces, preds["va"]):
        assert lines[("VA_Set", n)][f] == f"{va[0]:.6f},{va[1]:.6f}"
    assert len({lines[("VA_Set", "a")][f] for f in (2, 3, 5)}) == 3, "three images, three predictions"
    # the documented fill: the previous face's, the first face's before it, constants without any face
    for folder in TASK_FOLDERS:
        a, b, c = lines[(folder, "a")], lines[(folder, "b")], lines[(folder, "c")]
        assert a[1] == a[2] and a[4] == a[3]
        assert b[3:7] == [b[2]] * 4
        assert len(set(c[1:])) == 1
    assert lines[("VA_Set", "c")][1] == "0.000000,0.000000" and lines[("EXPR_Set", "c")][1] == "0"
    assert result["submission"]["va"]["names_without_face"] == ["c"]
    assert result["submission"]["va"]["filled"] == 2 + 4 + 4
    prov = on_disk["provenance"]
    assert prov["model"]["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert prov["input"]["names"] == 3 and prov["au_thresholds"]["values"] == [0.5] * 8
    # the same folder again: the earlier submission is replaced, not refused
    names.write_text("b\n")
    again = E.evaluate(checkpoint, data_root=root, split="test", names=names, output_dir=out, batch_size=8,
                       device="cpu", threads=1, image_size=32, progress=False)
    assert again["files"] == submission_files(out) == sorted(f"{folder}/b.txt" for folder in TASK_FOLDERS)
    assert len((out / "VA_Set" / "b.txt").read_text().splitlines()) == 3  # no count: the last jpg's number


@pytest.mark.parametrize("case, text, message", [
    ("missing", None, "no such file"),
    ("empty", "\n# nothing\n", "lists no video name"),
    ("unknown", "a\nzz\n", r":2: unknown name zz"),
    ("twice", "a\nb\na\n", r":3: a is listed twice"),
    ("bad_count", "a,five\n", "is not a positive integer"),
    ("short_count", "a,4\n", "gives a 4 frames but cropped_aligned/a holds frame 5"),
    ("no_frames", "c\n", "holds no frame jpg"),
    ("path", "../a\n", "is not a video name"),
])
def test_a_bad_test_list_is_one_line_and_writes_nothing(checkpoint: Path, tmp_path: Path, capsys, case: str,
                                                        text: str | None, message: str) -> None:
    import re

    from mtanet.cli import main

    root = listed_root(tmp_path / "root")
    names = tmp_path / "names.txt"
    if text is not None:
        names.write_text(text)
    out = tmp_path / "sub"
    code = main(["evaluate", str(checkpoint), "--data-root", str(root), "--split", "test", "--names", str(names),
                 "-o", str(out), "--device", "cpu", "--image-size", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mtanet: error: --names") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_names_belong_to_the_test_split(checkpoint: Path, tmp_path: Path, capsys) -> None:
    from mtanet.cli import main

    root = listed_root(tmp_path / "root")
    (tmp_path / "names.txt").write_text("a\n")
    assert main(["evaluate", str(checkpoint), "--data-root", str(root), "--split", "val", "--names",
                 str(tmp_path / "names.txt"), "-o", str(tmp_path / "sub"), "--device", "cpu"]) == 2
    assert "use it with --split test" in capsys.readouterr().err


def test_the_test_split_with_annotations_is_scored_like_validation(checkpoint: Path, smoke_root: Path,
                                                                   tmp_path: Path) -> None:
    """The same folders under Test_Set and under Validation_Set give the same scores and the same files."""
    as_test, as_val = tmp_path / "as_test", tmp_path / "as_val"
    for root, split_dir in ((as_test, "Test_Set"), (as_val, "Validation_Set")):
        shutil.copytree(smoke_root / "cropped_aligned", root / "cropped_aligned")
        for folder in TASK_FOLDERS:
            shutil.copytree(smoke_root / "annotations" / folder / "Training_Set",
                            root / "annotations" / folder / "Training_Set")
            shutil.copytree(smoke_root / "annotations" / folder / "Validation_Set",
                            root / "annotations" / folder / split_dir)
    test = run(checkpoint, as_test, tmp_path / "eval_test", "test")
    val = run(checkpoint, as_val, tmp_path / "eval_val", "val")
    assert test["split"] == "test" and test["edition"] == val["edition"] == "2020"
    assert test["headline"] == val["headline"] and test["headline_all_frames"] == val["headline_all_frames"]
    assert test["files"] == val["files"]
    assert (tmp_path / "eval_test" / "AU_Set" / test["files"][0].split("/")[1]).exists()


def test_held_out_folds_split_by_video_stably_and_completely() -> None:
    from mtanet.evaluate import held_out_folds

    names = [f"{i}-30-640x480" for i in range(1, 41)] + ["7-30-640x480_left", "7-30-640x480_right"]
    frames = pd.DataFrame({"name": np.repeat(names, 3), "frame": np.tile([1, 2, 3], len(names))})
    frames["video"] = frames["name"].str.replace(r"_(left|right)$", "", regex=True)
    folds = held_out_folds(frames)
    select, report = set(folds["select"]["video"]), set(folds["report"]["video"])
    assert select and report and not select & report  # both used, no video in both
    assert len(folds["select"]) + len(folds["report"]) == len(frames)
    assert set(folds["report"].loc[folds["report"]["video"] == "7-30-640x480", "name"]) in (
        set(), {"7-30-640x480_left", "7-30-640x480_right"})  # the two people of a video stay together
    shuffled = held_out_folds(frames.sample(frac=1.0, random_state=3).iloc[: len(frames) // 2])
    assert set(shuffled["report"]["video"]) <= report  # order and subsets do not move a video to the other fold


def test_predict_frames_with_a_cache_folder_decodes_once_and_predicts_the_same(smoke_root: Path,
                                                                                tmp_path: Path) -> None:
    model = MTANet("seresnet18_half", num_outputs=EDITIONS["2020"].num_outputs, feature_dim=16).eval()
    frames = load_frames(smoke_root, "test")
    plain = E.predict_frames(model, frames, smoke_root, image_size=32)
    cached = E.predict_frames(model, frames, smoke_root, image_size=32, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("frames-*.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = E.predict_frames(model, frames, smoke_root, image_size=32, cache_dir=tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    for task in plain:
        np.testing.assert_allclose(cached[task], plain[task], atol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(again[task], cached[task])


def test_video_intervals_resample_whole_videos_around_the_headline_score(smoke_root: Path) -> None:
    frames = load_frames(smoke_root, "test")
    rng = np.random.default_rng(0)
    n = len(frames)
    truth_va = frames[["valence", "arousal"]].to_numpy()
    preds = {"va": np.clip(truth_va + rng.normal(0, 0.3, (n, 2)), -1, 1), "au": rng.uniform(0, 1, (n, 8)),
             "expr": rng.normal(size=(n, 7))}
    ci = E.video_intervals(frames, preds, n_boot=50)
    head = E.headline(E.score_predictions(frames, preds, thresholds=[0.5] * 8))
    for task in ("va", "au", "expr"):
        assert ci[task]["score"] == pytest.approx(head[task])
        assert ci[task]["low"] <= ci[task]["score"] <= ci[task]["high"]
    labelled = {"va": frames["valence"].between(-1, 1), "expr": frames["expression"] >= 0}
    for task, rows in labelled.items():
        assert ci[task]["videos"] == frames.loc[rows & (frames["image"] != ""), "name"].nunique()
    assert any(ci[t]["videos"] >= 2 and ci[t]["low"] < ci[t]["high"] for t in ci)  # videos drawn: a spread
    assert E.video_intervals(frames, preds, n_boot=50) == ci  # seeded
    # one video: every replicate draws that video whole, so the interval collapses on the score (a frame-level
    # bootstrap would spread)
    one = frames[frames["name"] == frames.loc[frames["expression"] >= 0, "name"].iloc[0]]
    alone = E.video_intervals(one, {k: v[one.index.to_numpy()] for k, v in preds.items()}, n_boot=20)
    assert alone["expr"]["videos"] == 1
    assert alone["expr"]["low"] == alone["expr"]["high"] == pytest.approx(alone["expr"]["score"])
    # a task without predictions is left out; rows whose prediction is NaN (no face) are not scored
    assert set(E.video_intervals(frames, {"expr": preds["expr"]}, n_boot=5)) == {"expr"}


def test_va_agreement_separates_who_runs_high_from_what_changes_within_a_video() -> None:
    """Predictions that know each video's mean but nothing within it: between-video r near 1, within-video r near 0;
    predictions that follow the noise-free values but not the annotation noise agree more with the former; frames
    without an image or a prediction are left out."""
    from mtanet.evaluate import va_agreement

    rng = np.random.default_rng(0)
    rows, truth = [], []
    for v in range(12):
        level = rng.normal(0, 0.4)
        clean = level + 0.3 * np.sin(np.arange(60) / 6 + v)
        noisy = clean + rng.normal(0, 0.2, 60)
        for t in range(60):
            rows.append({"name": f"v{v}", "frame": t + 1, "image": f"v{v}/{t + 1:05d}.jpg",
                         "valence": noisy[t], "arousal": noisy[t]})
            truth.append((clean[t], level))
    frames = pd.DataFrame(rows)
    truth = np.array(truth)
    levels = np.repeat(truth[:, 1:], 2, axis=1)  # only each video's mean
    table = va_agreement(frames, levels, noise_free=np.repeat(truth[:, :1], 2, axis=1))
    assert table.loc["arousal", "between_videos"] > 0.95
    assert abs(table.loc["arousal", "within_videos"]) < 1e-6 or np.isnan(table.loc["arousal", "within_videos"])
    follows_clean = np.repeat(truth[:, :1], 2, axis=1)
    table = va_agreement(frames, follows_clean, noise_free=follows_clean)
    assert table.loc["valence", "noise_free"] == pytest.approx(1.0)
    assert 0.5 < table.loc["valence", "frames"] < table.loc["valence", "noise_free"]
    assert table.loc["valence", "within_videos"] > 0.5 and table.loc["valence", "videos"] == 12
    assert table["videos"].dtype.kind == "i"
    # a frame without an image and one without a prediction do not count
    frames.loc[0, "image"] = ""
    follows_clean[1] = np.nan
    assert va_agreement(frames, follows_clean)["noise_free"].isna().all()
