"""The command line's errors across commands: every user error is one line ``mtanet: error: ...`` with exit code 2,
naming the file or option, and nothing half-written is left; ``--debug`` shows the traceback instead.

Permission cases run the command in a subprocess that file permissions apply to (see :func:`run_unprivileged`).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RootBuilder, jpeg_bytes
from mtanet.cli import main
from mtanet.errors import DataFormatError
from mtanet.inference import predict_to_csv
from mtanet.models import MTANet, save_checkpoint
from mtanet.runtime import write_json
from mtanet.synth.render import random_identity, render_face
from mtanet.tasks import AU_NAMES_2020, EXPR_NAMES_2020

VA_HEADER = "valence,arousal\n"
AU_HEADER = ",".join(AU_NAMES_2020) + "\n"
EXPR_HEADER = ",".join(EXPR_NAMES_2020) + "\n"


def error_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """The one stderr line of a refused command, checked to start with ``mtanet: error:`` and hold ``needles``."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mtanet: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(MTANet("seresnet18", feature_dim=64), path)
    return path


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    """An aligned 112x112 face crop (predicted with --aligned: no detector)."""
    path = tmp_path_factory.mktemp("crop") / "face.png"
    Image.fromarray(render_face(random_identity(np.random.default_rng(0)), {})).save(path)
    return path


def tiny_root(builder: RootBuilder) -> Path:
    """Every task labeled in both splits, six frames each, all with images."""
    six = range(1, 7)
    builder.annotation("va", "train", "a", VA_HEADER + "".join(f"0.{i},-0.{i}\n" for i in six))
    builder.annotation("expr", "train", "a", EXPR_HEADER + "".join(f"{i % 7}\n" for i in six))
    builder.images("a", list(six))
    builder.annotation("au", "train", "b", AU_HEADER + "".join(("1,0,0,1,0,0,1,0\n", "0,1,1,0,1,1,0,1\n")[i % 2]
                                                               for i in six))
    builder.images("b", list(six))
    builder.annotation("va", "val", "c", VA_HEADER + "".join(f"-0.{i},0.{i}\n" for i in six))
    builder.images("c", list(six))
    builder.annotation("au", "val", "d", AU_HEADER + "".join(("0,0,1,1,0,0,1,1\n", "1,1,0,0,1,1,0,0\n")[i % 2]
                                                             for i in six))
    builder.images("d", list(six))
    builder.annotation("expr", "val", "e", EXPR_HEADER + "".join(f"{(i + 3) % 7}\n" for i in six))
    builder.images("e", list(six))
    return builder.root


TRAIN = ["--backbone", "seresnet18", "--image-size", "32", "--batch-size", "6", "--feature-dim", "64",
         "--steps-per-epoch", "2", "--stage1-epochs", "1", "--stage2-epochs", "0", "--threads", "1",
         "--progress", "false", "--device", "cpu", "--num-workers", "0"]


# ------------------------------------------------------------------------------------------ the error handler


def test_usage_errors_are_one_line_naming_the_option(capsys):
    for args, needle in ((["predict", "x.png", "-o", "x.csv", "--bogus"], "--bogus"),
                         (["predict", "x.png", "-o", "x.csv", "--every", "two"], "--every"),
                         (["export", "model.pt"], "-o/--output"),
                         (["launch"], "launch")):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        error_line(capsys, needle)


@pytest.mark.parametrize("command", ["synth", "inspect", "train", "evaluate", "predict", "export"])
def test_every_help_prints(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: mtanet {command}")
    if command == "train":  # a literal % in a field's description (argparse formats help with %)
        assert "4-7% slower" in text


def test_debug_shows_the_traceback_instead_of_the_line(tmp_path, ckpt, capsys):
    args = ["predict", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out.csv"), "--checkpoint", str(ckpt)]
    assert main(args) == 2
    error_line(capsys, "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        main(["--debug", *args])
    assert capsys.readouterr().err == ""


def test_a_multi_line_message_is_printed_on_one_line(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise DataFormatError(tmp_path / "x.txt", 3, "first\n  second")

    monkeypatch.setattr("mtanet.cli._inspect", fail)
    assert main(["inspect", str(tmp_path)]) == 2
    assert error_line(capsys) == f"mtanet: error: {tmp_path / 'x.txt'}:3: first second"


# ------------------------------------------------------------------------------------ files that are not models


@pytest.mark.parametrize("kind", ["text", "jpeg", "truncated", "empty"])
@pytest.mark.parametrize("command", ["evaluate", "predict", "predict-onnx", "export"])
def test_a_file_that_is_no_checkpoint_is_one_line_and_writes_nothing(command, kind, ckpt, crop, builder, tmp_path,
                                                                      capsys):
    bad = tmp_path / "bad.pt"
    if kind == "text":
        bad.write_text("not a checkpoint\n")
    elif kind == "jpeg":
        bad.write_bytes(jpeg_bytes())
    elif kind == "truncated":
        bad.write_bytes(ckpt.read_bytes()[:100_000])
    else:
        bad.write_bytes(b"")
    out = tmp_path / "out"
    args = {"evaluate": ["evaluate", str(bad), "--data-root", str(tiny_root(builder)), "-o", str(out),
                         "--no-progress"],
            "predict": ["predict", str(crop), "-o", str(out), "--checkpoint", str(bad), "--aligned"],
            "predict-onnx": ["predict", str(crop), "-o", str(out), "--engine", "onnx", "--onnx", str(bad),
                             "--aligned"],
            "export": ["export", str(bad), "-o", str(out)]}[command]
    assert main(args) == 2
    error_line(capsys, str(bad))
    assert not out.exists() or not any(out.iterdir())
    assert not Path(f"{out}.meta.json").exists()


# ------------------------------------------------------------------------------------------------ output paths


@pytest.mark.parametrize("command", ["predict", "export", "evaluate", "train"])
def test_an_output_below_a_file_is_one_line(command, ckpt, crop, builder, tmp_path, capsys):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("mine\n")
    out = blocker / "out.csv"
    root = tiny_root(builder)
    args = {"predict": ["predict", str(crop), "-o", str(out), "--checkpoint", str(ckpt), "--aligned"],
            "export": ["export", str(ckpt), "-o", str(out)],
            "evaluate": ["evaluate", str(ckpt), "--data-root", str(root), "-o", str(out), "--device", "cpu",
                         "--no-progress"],
            "train": ["train", "--data-root", str(root), "-o", str(out), *TRAIN]}[command]
    assert main(args) == 2
    error_line(capsys, str(blocker))
    assert blocker.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["affwild2", "somefile.txt"]


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_an_output_folder_that_is_a_file_is_one_line_and_the_file_is_kept(command, ckpt, tmp_path, capsys):
    mine = tmp_path / "results.txt"
    mine.write_text("mine\n")
    args = {"evaluate": ["evaluate", str(ckpt), "--data-root", str(tmp_path), "-o", str(mine), "--no-progress"],
            "train": ["train", "--data-root", str(tmp_path), "-o", str(mine), *TRAIN]}[command]
    assert main(args) == 2
    error_line(capsys, f"{mine} is a file, not a folder")
    assert mine.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_folder_where_a_file_goes_is_refused_and_kept(command, overwrite, ckpt, crop, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    args = {"predict": ["predict", str(crop), "-o", str(folder), "--checkpoint", str(ckpt), "--aligned"],
            "export": ["export", str(ckpt), "-o", str(folder)]}[command] + (["--overwrite"] if overwrite else [])
    assert main(args) == 2
    error_line(capsys, str(folder), "is a folder")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no meta.json beside it


@pytest.mark.parametrize("opset", ["5", "6", "24", "-1"])
def test_an_onnx_opset_that_cannot_be_exported_is_one_line(opset, ckpt, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "-o", str(out), "--opset", opset]) == 2
    error_line(capsys, f"--opset {opset}", "7 to 23")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- training options


def test_invalid_yaml_config_is_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    bad = tmp_path / "cfg.yaml"
    bad.write_text("batch_size: [1, 2\nlr: 0.1\n")
    assert main(["train", "--config", str(bad), "-o", str(run)]) == 2
    error_line(capsys, str(bad), "not valid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- batch_size\n- 32\n")
    assert main(["train", "--config", str(listed), "-o", str(run)]) == 2
    error_line(capsys, str(listed), "mapping")
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "-o", str(run)]) == 2
    error_line(capsys, "none.yaml")
    assert not run.exists()


@pytest.mark.parametrize(("flag", "value", "needles"), [
    ("--backbone", "resnet9000", ("backbone", "resnet9000", "senet50", "seresnet18")),
    ("--pooling", "median", ("pooling", "median", "avgmax_concat")),
    ("--batch-size", "2", ("batch_size 2", "number of tasks 3")),
    ("--feature-dim", "33", ("even feature_dim",)),
])
def test_training_options_that_cannot_work_are_refused_before_anything_runs(flag, value, needles, tmp_path,
                                                                             capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(tmp_path / "nowhere"), "-o", str(run), flag, value]) == 2
    error_line(capsys, *needles)
    assert not run.exists()


# --------------------------------------------------------------------------------------- errors in a worker


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_corrupt_jpg_met_in_a_loader_worker_is_the_same_one_line(command, ckpt, builder, tmp_path, capsys):
    root = tiny_root(builder)
    split_name = "a" if command == "train" else "c"
    bad = root / "cropped_aligned" / split_name / "00003.jpg"
    bad.write_bytes(jpeg_bytes(3)[:300])  # truncated mid-scan
    out = tmp_path / "out"
    args = {"train": ["train", "--data-root", str(root), "-o", str(out), *TRAIN[:-1], "1"],
            "evaluate": ["evaluate", str(ckpt), "--data-root", str(root), "-o", str(out), "--device", "cpu",
                         "--no-progress", "--num-workers", "1"]}[command]
    assert args[-2:] == ["--num-workers", "1"]
    assert main(args) == 2
    line = error_line(capsys, str(bad), "unreadable or truncated JPEG")
    assert "Traceback" not in line and "worker" not in line
    assert not list(out.glob("*.pt")) and not (out / "scores.json").exists()


# ---------------------------------------------------------------------------------------------- file modes


def test_checkpoints_csvs_and_json_get_the_mode_of_a_plain_new_file(ckpt, crop, tmp_path):
    old = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        save_checkpoint(MTANet("seresnet18", feature_dim=64), tmp_path / "model.pt")
        write_json(tmp_path / "data.json", {"a": 1})
        predict_to_csv(crop, tmp_path / "pred.csv", ckpt, aligned=True, threads=1)
    finally:
        os.umask(old)
    mode = plain.stat().st_mode & 0o777
    assert mode == 0o640
    for name in ("model.pt", "data.json", "pred.csv", "pred.csv.meta.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ------------------------------------------------------------------------------------------------ permissions

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_capabilities() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


#: Runs ``mtanet.cli.main`` on each argument list of ``argv[1]`` (JSON) in one process; prints ``[[code, stderr]]``.
_DRIVER = """
import contextlib, io, json, sys
from mtanet.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit:
            code = exit.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_unprivileged(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """``mtanet.cli.main(args)`` for each of ``commands`` in a process that file permissions apply to: the exit
    code and the stderr of each.

    As a normal user they apply anyway. As root (containers, CI) the child drops the two capabilities that let root
    ignore them (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``) from its bounding set before ``exec``, so the Python
    it starts has neither; skipped where that is refused or does not take effect.
    """
    if sys.platform != "linux":
        pytest.skip("permission cases drop Linux capabilities")
    preexec = _drop_file_capabilities if os.geteuid() == 0 else None
    probe = cwd / ".probe"
    probe.write_text("secret")
    probe.chmod(0)
    try:
        seen = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], preexec_fn=preexec,
                              capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot start a process without CAP_DAC_OVERRIDE here ({err})")
    finally:
        probe.unlink()
    if seen.returncode == 0:
        pytest.skip("file permissions do not apply to a child process here (capabilities could not be dropped)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands)], cwd=cwd, preexec_fn=preexec,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [tuple(r) for r in json.loads(done.stdout.splitlines()[-1])]


def one_line(result: tuple[int, str], *needles: str) -> str:
    code, err = result
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtanet: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_read_only_output_folder_is_one_line_and_nothing_is_written(ckpt, crop, tmp_path):
    (tmp_path / "model.pt").write_bytes(ckpt.read_bytes())
    (tmp_path / "face.png").write_bytes(crop.read_bytes())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        predicted, exported, trained, evaluated = run_unprivileged([
            ["predict", "face.png", "-o", "locked/out.csv", "--checkpoint", "model.pt", "--aligned", "--threads", "1"],
            ["export", "model.pt", "-o", "locked/model.onnx", "--no-check"],
            ["train", "--data-root", "nowhere", "-o", "locked/run"],
            ["evaluate", "model.pt", "--data-root", "nowhere", "-o", "locked/eval"]], tmp_path)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
    one_line(predicted, "locked/out.csv", "Permission denied", "permissions")
    one_line(exported, "locked/model.onnx", "Permission denied")
    one_line(trained, "locked/run", "Permission denied")
    one_line(evaluated, "locked/eval", "Permission denied")


@pytest.mark.slow
def test_unreadable_data_is_one_line_naming_it(builder, tmp_path):
    root = tiny_root(builder)
    targets = [root / "annotations" / "VA_Set" / "Training_Set" / "a.txt",  # a file
               root / "annotations" / "AU_Set" / "Training_Set",  # a folder of annotations
               root / "cropped_aligned" / "b"]  # a folder of images
    roots = []
    for i, target in enumerate(targets):  # a copy of the root per case, one thing unreadable in each
        copy = tmp_path / f"root{i}"
        shutil.copytree(root, copy)
        target = copy / target.relative_to(root)
        target.chmod(0)
        roots.append((copy, target))
    try:
        results = run_unprivileged([["inspect", copy.name] for copy, _ in roots], tmp_path)
    finally:
        for _, target in roots:
            target.chmod(0o755)
    for (copy, target), result in zip(roots, results):
        one_line(result, str(target.relative_to(tmp_path)), "Permission denied")
