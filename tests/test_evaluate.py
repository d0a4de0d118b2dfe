"""``mtanet evaluate`` on a folder used before, on data without labels for a task, and after a failure.

A randomly initialised small model is enough here: what is checked is which files end up where, not the scores
(tests/test_train.py compares the scores with the trainer's own validation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
