"""Per-frame prediction: one row per frame, streaming CSV, bad inputs, devices, smoothing and the CLI.

Media are generated here: synthetic faces (mtanet.synth.render) pasted on 640x480 frames at known places, written
as images or as videos with PyAV.
"""

from __future__ import annotations

import builtins
import io
import errno
import json
import math
import os
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mtanet.cli import main
from mtanet.errors import CheckpointError, ConfigError, DataFormatError, DeviceUnavailableError, OutputExistsError
from mtanet.inference import (
    MovingAverage,
    Predictor,
    checkpoint_extras,
    load_checkpoint,
    metadata_path,
    predict,
    predict_to_csv,
)
from mtanet.inference import stream
from mtanet.inference.sources import FrameSource
from mtanet.models import MTANet, save_checkpoint
from mtanet.synth.render import random_identity, render_face

import av  # a declared dependency: a missing install must fail, not skip

FPS = 25
N_FRAMES = 60
NO_FACE = range(20, 30)  # frames of the test video without a face
SIDE = 160  # pasted face size in the test frames
THRESHOLDS = [0.45, 0.5, 0.55, 0.5, 0.4, 0.6, 0.5, 0.52]
pytestmark = pytest.mark.filterwarnings("ignore:.*(cannot decode|unreadable image|reading stopped).*:UserWarning")


def face_crop(seed: int = 0, side: int = SIDE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    face = render_face(random_identity(rng), {"AU12": 0.8, "AU6": 0.6})
    return np.asarray(Image.fromarray(face).resize((side, side), Image.Resampling.BILINEAR))


def frame_with(faces: list[tuple[np.ndarray, int, int]], bg=(90, 100, 110)) -> np.ndarray:
    frame = np.empty((480, 640, 3), np.uint8)
    frame[:] = bg
    for crop, x, y in faces:
        frame[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    return frame


def video_face_x(i: int) -> int:
    return 60 + 5 * i


def write_video(path, n: int = N_FRAMES, codec: str = "mpeg4", no_face=NO_FACE) -> None:
    face = face_crop()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = 640, 480
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(n):
            frame = frame_with([] if i in no_face else [(face, video_face_x(i), 120)])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(MTANet("seresnet18", feature_dim=64), path, extra={"au_thresholds": THRESHOLDS})
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path)
    return path


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return Predictor(ckpt, threads=1)


@pytest.fixture(scope="module")
def video_run(video, predictor, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "clip.csv"
    meta = predict_to_csv(video, out, predictor, batch_size=16)
    return out, meta


# ---------------------------------------------------------------------------------------------------------- video


def test_video_gives_one_row_per_frame_in_order_with_timestamps(video_run, predictor):
    out, meta = video_run
    df = pd.read_csv(out)
    assert list(df.columns) == predictor.columns() and "file" not in df.columns
    assert len(df) == N_FRAMES  # rows == frames
    np.testing.assert_array_equal(df["frame"], np.arange(N_FRAMES) + 1)  # 1-based
    np.testing.assert_allclose(df["timestamp"], np.arange(N_FRAMES) / FPS, atol=1e-6)
    empty = (df["frame"] - 1).isin(NO_FACE)
    assert (df.loc[empty, "status"] == "no_face").all() and (df.loc[~empty, "status"] == "ok").all()
    assert (df.loc[empty, "n_faces"] == 0).all() and (df.loc[~empty, "n_faces"] == 1).all()
    preds = [c for c in df.columns if c.endswith("_prob")] + ["valence", "arousal", "AU1", "face_x", "face_score"]
    assert df.loc[empty, preds].isna().all().all() and df.loc[empty, "expression"].isna().all()
    assert df.loc[~empty, preds].notna().all().all() and df.loc[~empty, "expression"].notna().all()
    # the box sits on the pasted face
    centre_x = df.loc[~empty, "face_x"] + df.loc[~empty, "face_w"] / 2
    expected = (df.loc[~empty, "frame"] - 1).map(video_face_x) + SIDE / 2
    assert np.abs(centre_x - expected).max() < SIDE / 4
    assert df["face_score"].min() > 0.8
    assert meta["status"] == "complete" and meta["rows_written"] == N_FRAMES == meta["frames_read"]
    assert meta["frames_no_face"] == len(NO_FACE) and meta["source"]["fps"] == FPS
    assert json.loads(metadata_path(out).read_text())["status"] == "complete"


def test_rows_hold_probabilities_and_decisions_under_the_tuned_thresholds(video_run, predictor):
    df = pd.read_csv(video_run[0])
    ok = df[df["status"] == "ok"]
    names = predictor.expr_names
    np.testing.assert_allclose(ok[[f"{n}_prob" for n in names]].sum(axis=1), 1.0, atol=1e-5)
    assert (ok["expression"] == ok[[f"{n}_prob" for n in names]].idxmax(axis=1).str[:-5]).all()
    assert ok[["valence", "arousal"]].abs().max().max() <= 1.0
    for name, t in zip(predictor.au_names, THRESHOLDS):
        np.testing.assert_array_equal(ok[name], (ok[f"{name}_prob"] >= t).astype(int))
    assert video_run[1]["au_threshold_source"] == "checkpoint" and video_run[1]["au_thresholds"] == THRESHOLDS


def test_predict_dataframe_equals_the_streamed_csv(video, video_run, predictor):
    df = predict(video, predictor, batch_size=7)
    csv = pd.read_csv(video_run[0])
    assert list(df.columns) == list(csv.columns)
    pd.testing.assert_frame_equal(df, csv, check_exact=False, atol=2e-6, check_dtype=False)
    assert df.attrs["mtanet"]["input_kind"] == "video"


def test_every_nth_frame_and_smoothing(video, predictor):
    raw = predict(video, predictor, every=3)
    np.testing.assert_array_equal(raw["frame"], np.arange(0, N_FRAMES, 3) + 1)
    np.testing.assert_allclose(raw["timestamp"], (raw["frame"] - 1) / FPS, atol=1e-6)
    smooth = predict(video, predictor, every=3, smooth=5)
    # the pipeline's smoothing is the moving average of the raw rows, and keeps rows and NaNs in place
    ma = MovingAverage(5, predictor.smoothed_columns(), predictor.decide)
    rows = [r for row in raw.to_dict("records") for r in ma.push(row)] + ma.flush()
    expected = pd.DataFrame(rows, columns=raw.columns)
    pd.testing.assert_frame_equal(smooth, expected, check_dtype=False)
    assert smooth["valence"].isna().equals(raw["valence"].isna())
    assert not np.allclose(smooth["valence"].dropna(), raw["valence"].dropna())


def test_a_corrupt_frame_in_the_middle_becomes_an_unreadable_row(tmp_path, predictor):
    path = tmp_path / "clip.avi"
    write_video(path, n=24, codec="mjpeg", no_face=())
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    pos, size = packets[10]
    data[pos:pos + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    meta = predict_to_csv(path, tmp_path / "out.csv", predictor, batch_size=8)
    df = pd.read_csv(tmp_path / "out.csv")
    assert len(df) == 24 and list(df["frame"]) == list(range(1, 25))
    assert df.loc[10, "status"] == "unreadable" and math.isnan(df.loc[10, "valence"])
    assert (df.drop(index=10)["status"] == "ok").all()
    assert df.loc[11, "timestamp"] == pytest.approx(11 / FPS)
    assert meta["frames_unreadable"] == 1 and "frame 10" in meta["errors"][0]


def test_a_truncated_video_keeps_the_frames_before_the_cut(tmp_path, predictor):
    path = tmp_path / "clip.avi"
    write_video(path, n=20, codec="mjpeg", no_face=())
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    meta = predict_to_csv(path, tmp_path / "out.csv", predictor, batch_size=8)
    df = pd.read_csv(tmp_path / "out.csv")
    assert 5 <= len(df) < 20 and list(df["frame"]) == list(range(1, len(df) + 1))
    assert meta["status"] == "complete" and meta["rows_written"] == len(df)


@pytest.mark.parametrize("smooth", [None, 5])
def test_a_crash_mid_video_keeps_the_rows_already_written(video, ckpt, tmp_path, smooth):
    crashing = Predictor(ckpt, threads=1)
    calls = {"n": 0}
    infer = crashing.infer

    def fail_on_third_batch(crops):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return infer(crops)

    crashing.infer = fail_on_third_batch
    out = tmp_path / "out.csv"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_to_csv(video, out, crashing, batch_size=8, smooth=smooth)
    df = pd.read_csv(out)
    assert list(df["frame"]) == list(range(1, 17))  # two whole batches, smoothing buffer flushed
    assert df["valence"].notna().all()
    meta = json.loads(metadata_path(out).read_text())
    assert meta["status"] == "failed" and "simulated crash" in meta["error"] and meta["rows_written"] == 16


# ---------------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    frame = frame_with([(face_crop(1), 250, 150)])
    Image.fromarray(frame).save(folder / "a.png")
    Image.fromarray(frame_with([])).save(folder / "b.png")
    Image.fromarray(frame).convert("L").save(folder / "c.jpg", quality=95)
    Image.fromarray(frame).convert("RGBA").save(folder / "d.png")
    (folder / "e.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_gives_one_row_per_image_sorted_with_bad_ones_as_nan(image_folder, predictor):
    df = predict(image_folder, predictor)
    assert list(df["file"]) == ["a.png", "b.png", "c.jpg", "d.png", "e.jpg"]
    assert list(df["frame"]) == [1, 2, 3, 4, 5] and df["timestamp"].isna().all()
    assert list(df["status"]) == ["ok", "no_face", "ok", "ok", "unreadable"]
    a, c, d = df.iloc[0], df.iloc[2], df.iloc[3]
    probs = [col for col in df.columns if col.endswith("_prob")]
    np.testing.assert_allclose(d[probs].astype(float), a[probs].astype(float), atol=1e-6)  # alpha dropped
    np.testing.assert_allclose(c[["face_x", "face_y"]].astype(float), a[["face_x", "face_y"]].astype(float), atol=4)
    assert "e.jpg" in df.attrs["mtanet"]["errors"][0]


def test_single_images_and_inputs_that_cannot_be_read(image_folder, predictor, tmp_path):
    one = predict(image_folder / "b.png", predictor)
    assert len(one) == 1 and one.loc[0, "status"] == "no_face" and one.loc[0, "file"] == "b.png"
    with pytest.raises(DataFormatError, match="e.jpg"):
        predict(image_folder / "e.jpg", predictor)
    with pytest.raises(FileNotFoundError):
        predict(tmp_path / "missing.mp4", predictor)
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataFormatError, match="cannot open as a video"):
        predict(tmp_path / "bad.mp4", predictor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no image files"):
        predict(tmp_path / "empty", predictor)


def test_all_faces_gives_one_row_per_face_largest_first(ckpt, tmp_path):
    path = tmp_path / "two.png"
    Image.fromarray(frame_with([(face_crop(2, 120), 40, 60), (face_crop(3, 200), 380, 200)])).save(path)
    df = predict(path, ckpt, all_faces=True, threads=1)
    assert len(df) == 2 and list(df["face"]) == [0, 1] and list(df["n_faces"]) == [2, 2]
    assert list(df["frame"]) == [1, 1] and df.loc[0, "face_w"] > df.loc[1, "face_w"]
    assert df.loc[0, "face_x"] > 300
    largest = predict(path, ckpt, threads=1)
    assert len(largest) == 1 and largest.loc[0, "face_x"] == pytest.approx(df.loc[0, "face_x"])
    with pytest.raises(ConfigError, match="not tracked"):
        predict(path, ckpt, all_faces=True, smooth=3)


def test_tasks_subset_aligned_input_and_default_thresholds(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "plain.pt"
    save_checkpoint(MTANet("seresnet18", feature_dim=32), path)  # no au_thresholds
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(3):
        Image.fromarray(render_face(random_identity(np.random.default_rng(i)), {})).save(crops / f"{i + 1:05d}.jpg")
    df = predict(crops, path, aligned=True, tasks="va,au")
    assert [c for c in df.columns if c.endswith("_prob")] == [f"{a}_prob" for a in df.attrs["mtanet"]["au_names"]]
    assert "expression" not in df.columns and df["face_score"].isna().all() and (df["face_w"] == 112).all()
    assert df.attrs["mtanet"]["au_threshold_source"].startswith("default 0.5")
    np.testing.assert_array_equal(df["AU1"], (df["AU1_prob"] >= 0.5).astype(int))
    with pytest.raises(ConfigError, match="heads"):
        Predictor(path, tasks=["va", "pain"], aligned=True)


# ---------------------------------------------------------------------------------------------------- devices


def test_an_unavailable_gpu_is_an_error_not_a_fallback(ckpt, video, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        Predictor(ckpt, device="cuda")
    with pytest.raises(DeviceUnavailableError):
        Predictor(ckpt, device="cuda:1")
    out = tmp_path / "out.csv"
    assert main(["predict", str(video), "-o", str(out), "--checkpoint", str(ckpt), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()


def test_a_string_that_names_no_device_is_a_config_error(ckpt, video, tmp_path, capsys):
    for spec in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(ConfigError, match="not a device name") as info:
            Predictor(ckpt, device=spec, aligned=True)
        assert not isinstance(info.value, DeviceUnavailableError)  # a typo, not a missing device
    assert Predictor(ckpt, device="CPU ", aligned=True).device == "cpu"
    out = tmp_path / "out.csv"
    assert main(["predict", str(video), "-o", str(out), "--checkpoint", str(ckpt), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "'gpu' is not a device name" in err and err.startswith("mtanet: error:") and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_requested_gpu_is_really_used(ckpt, image_folder):
    predictor = Predictor(ckpt, device="cuda")
    assert all(p.device.type == "cuda" for p in predictor.model.parameters())
    df = predict(image_folder / "a.png", predictor)
    assert df.loc[0, "status"] == "ok" and df.attrs["mtanet"]["device"].startswith("cuda")


# -------------------------------------------------------------------------------------------------- smoothing


def test_moving_average_streams_a_centred_nan_aware_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 2))
    values[[5, 6, 7, 30], :] = np.nan  # frames without a face
    values[12, 1] = np.nan
    rows = [{"frame": i, "a": v[0], "b": v[1]} for i, v in enumerate(values)]
    ma = MovingAverage(5, ["a", "b"])
    out = []
    for i, row in enumerate(rows):
        out += ma.push(row)
        assert len(out) == max(0, i + 1 - 2)  # a delay of window // 2 rows
    out += ma.flush()
    got = pd.DataFrame(out)
    assert list(got["frame"]) == list(range(40))
    ref = pd.DataFrame(values, columns=["a", "b"]).rolling(5, center=True, min_periods=1).mean()
    ref = ref.where(~np.isnan(values))  # a row without a value stays without
    np.testing.assert_allclose(got[["a", "b"]], ref, atol=1e-12)
    with pytest.raises(ConfigError):
        MovingAverage(4, ["a"])


def test_moving_average_rederives_decisions():
    rows = [{"p": p} for p in (0.9, 0.1, 0.1, 0.9, 0.9)]

    def decide(row):
        row["d"] = int(row["p"] >= 0.5)

    ma = MovingAverage(3, ["p"], decide)
    out = [r for row in rows for r in ma.push(row)] + ma.flush()
    np.testing.assert_allclose([r["p"] for r in out], [0.5, 1.1 / 3, 1.1 / 3, 1.9 / 3, 0.9])
    assert [r["d"] for r in out] == [1, 0, 0, 1, 1]


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_predict_on_a_video(video, ckpt, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    args = ["predict", str(video), "-o", str(out), "--checkpoint", str(ckpt), "--every", "4", "--batch-size", "4",
            "--threads", "1", "--smooth", "3"]
    assert main(args) == 0, capsys.readouterr().err
    df = pd.read_csv(out)
    assert len(df) == N_FRAMES // 4 and list(df["frame"]) == list(range(1, N_FRAMES + 1, 4))
    assert "15 rows for 15 frames" in capsys.readouterr().out
    meta = json.loads(metadata_path(out).read_text())
    assert meta["smooth"] == 3 and meta["every"] == 4 and meta["device"] == "cpu"
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwrite silently
    assert main(["predict", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "x.csv"), "--checkpoint", str(ckpt)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["predict", str(video), "-o", str(tmp_path / "y.csv")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["flipped weights", "truncated", "empty"])
def test_a_damaged_checkpoint_is_never_used_for_prediction(ckpt, video, tmp_path, damage, capsys, kind):
    bad = tmp_path / "model.pt"
    bad.write_bytes(ckpt.read_bytes())
    if kind == "flipped weights":
        damage.flip_checkpoint_tensor(bad)  # 4 KB inside a weight: torch.load alone reads it without a word
    elif kind == "truncated":
        damage.truncate(bad)
    else:
        damage.empty(bad)
    expected = "digest mismatch" if kind == "flipped weights" else "cannot be read as a checkpoint"
    # the extras are read memory-mapped (the onnx engine with --checkpoint): checked all the same
    for load in (checkpoint_extras, load_checkpoint, lambda p: Predictor(p, aligned=True, threads=1)):
        with pytest.raises(CheckpointError, match=expected):
            load(bad)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(video), "-o", str(out), "--checkpoint", str(bad), "--threads", "1"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtanet: error:"), captured.err
    assert str(bad) in lines[0] and expected in lines[0] and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no CSV, no meta.json


# ------------------------------------------------------------------------------------- failures and bad options


def error_line(capsys, *needles: str) -> str:
    """The one stderr line of a refused command: ``mtanet: error: ...`` holding ``needles``."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtanet: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Ten aligned face crops, predicted with aligned=True (no detector: fast)."""
    folder = tmp_path_factory.mktemp("crops")
    for i in range(10):
        face = render_face(random_identity(np.random.default_rng(10 + i)), {"AU12": i / 10})
        Image.fromarray(face).save(folder / f"{i + 1:05d}.png")
    return folder


@pytest.fixture(scope="module")
def aligned(ckpt) -> Predictor:
    return Predictor(ckpt, aligned=True, threads=1)


@pytest.fixture(scope="module")
def complete_csv(crops, aligned, tmp_path_factory):
    """The CSV of an undisturbed run over ``crops``, batch 2: what every partial run must be a prefix of."""
    out = tmp_path_factory.mktemp("complete") / "pred.csv"
    predict_to_csv(crops, out, aligned, batch_size=2)
    return out.read_text()


class FullDisk:
    """A text file that accepts ``budget`` characters, then writes what still fits of the next chunk and raises
    ``OSError(ENOSPC)`` without a file name, as a write to a full disk does."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, text: str) -> int:
        if len(text) > self.budget:
            self.f.write(text[: self.budget])
            self.f.flush()
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(text)
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_after(monkeypatch, target, budget: int) -> None:
    """The CSV ``target`` that predict_to_csv opens takes ``budget`` characters before the disk is full."""

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f, budget) if os.fspath(path) == os.fspath(target) and "w" in mode else f

    monkeypatch.setattr(stream, "open", fake_open, raising=False)


def test_a_full_disk_mid_run_leaves_complete_rows_and_a_failed_metadata(crops, aligned, complete_csv, tmp_path,
                                                                        monkeypatch):
    lines = complete_csv.splitlines(keepends=True)
    out = tmp_path / "pred.csv"
    fill_disk_after(monkeypatch, out, len("".join(lines[:6])) + 10)  # header, 5 rows and part of the 6th
    with pytest.raises(OSError) as info:
        predict_to_csv(crops, out, aligned, batch_size=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)  # names the file
    kept = out.read_text()
    assert kept == "".join(lines[:5])  # the header and the 2 whole batches: no half row, no half batch
    meta = json.loads(metadata_path(out).read_text())
    assert meta["status"] == "failed" and "No space left" in meta["error"] and meta["rows_written"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files
    monkeypatch.undo()
    with pytest.raises(OutputExistsError, match="the 4 rows of a failed run"):  # never replaced silently
        predict_to_csv(crops, out, aligned, batch_size=2)
    assert predict_to_csv(crops, out, aligned, batch_size=2, overwrite=True)["status"] == "complete"
    assert out.read_text() == complete_csv


@pytest.mark.parametrize("where", ["in the header", "in the first batch"])
def test_a_run_that_fails_before_its_first_row_leaves_nothing_and_the_retry_runs(crops, aligned, complete_csv,
                                                                                   tmp_path, monkeypatch, where):
    out = tmp_path / "pred.csv"
    header, first = complete_csv.splitlines(keepends=True)[:2]
    fill_disk_after(monkeypatch, out, len(header) // 2 if where == "in the header" else len(header + first) + 5)
    with pytest.raises(OSError, match="No space left"):
        predict_to_csv(crops, out, aligned, batch_size=2)
    assert list(tmp_path.iterdir()) == []  # no header-only CSV, no meta.json saying "running" or "failed"
    monkeypatch.undo()
    assert predict_to_csv(crops, out, aligned, batch_size=2)["status"] == "complete"  # no --overwrite needed
    assert out.read_text() == complete_csv


def test_a_crash_before_the_first_row_leaves_nothing(crops, ckpt, aligned, complete_csv, tmp_path):
    crashing = Predictor(ckpt, aligned=True, threads=1)

    def fail(crops):
        raise RuntimeError("simulated crash")

    crashing.infer = fail
    out = tmp_path / "pred.csv"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_to_csv(crops, out, crashing, batch_size=2)
    assert list(tmp_path.iterdir()) == []  # before: a header-only CSV that refused the retry without --overwrite
    predict_to_csv(crops, out, aligned, batch_size=2)
    assert out.read_text() == complete_csv


def test_when_even_the_failure_cannot_be_recorded_nothing_is_left(crops, aligned, complete_csv, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "pred.csv"
    fill_disk_after(monkeypatch, out, len("".join(complete_csv.splitlines(keepends=True)[:4])) + 10)
    write_json = stream.write_json

    def full(path, data, **kwargs):
        if data.get("status") == "failed":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_json(path, data, **kwargs)

    monkeypatch.setattr(stream, "write_json", full)
    with pytest.raises(OSError, match="No space left"):
        predict_to_csv(crops, out, aligned, batch_size=2)
    assert list(tmp_path.iterdir()) == []  # rather nothing than rows under a meta.json that says "running"


def test_cli_a_full_disk_is_one_line_naming_the_csv(crops, ckpt, complete_csv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred.csv"
    fill_disk_after(monkeypatch, out, len("".join(complete_csv.splitlines(keepends=True)[:3])) + 10)
    args = ["predict", str(crops), "-o", str(out), "--checkpoint", str(ckpt), "--aligned", "--batch-size", "2",
            "--threads", "1"]
    assert main(args) == 2
    error_line(capsys, str(out), "No space left on device", "the disk is full")
    assert len(pd.read_csv(out)) == json.loads(metadata_path(out).read_text())["rows_written"] == 2


def test_an_image_pil_refuses_as_a_decompression_bomb_is_one_unreadable_row(crops, ckpt, tmp_path, monkeypatch,
                                                                            capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("00001.png", "00002.png"):
        (folder / name).write_bytes((crops / name).read_bytes())
    Image.new("RGB", (400, 400), (90, 100, 110)).save(folder / "00003_big.png")  # 160000 pixels
    (folder / "00004.png").write_bytes((crops / "00004.png").read_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # PIL refuses more than twice this: 112^2 passes
    out = tmp_path / "pred.csv"
    args = ["predict", str(folder), "-o", str(out), "--checkpoint", str(ckpt), "--aligned", "--batch-size", "1",
            "--threads", "1"]
    with pytest.warns(UserWarning, match="too large"):
        assert main(args) == 0, capsys.readouterr().err
    df = pd.read_csv(out)
    assert list(df["file"]) == ["00001.png", "00002.png", "00003_big.png", "00004.png"]  # the folder went on
    assert list(df["status"]) == ["ok", "ok", "unreadable", "ok"] and math.isnan(df.loc[2, "valence"])
    meta = json.loads(metadata_path(out).read_text())
    assert meta["status"] == "complete" and meta["frames_unreadable"] == 1
    assert "00003_big.png" in meta["errors"][0] and "too large" in meta["errors"][0]
    capsys.readouterr()
    assert main(["predict", str(folder / "00003_big.png"), "-o", str(tmp_path / "one.csv"), "--checkpoint",
                 str(ckpt), "--aligned"]) == 2
    error_line(capsys, "00003_big.png", "too large")
    assert not (tmp_path / "one.csv").exists() and not metadata_path(tmp_path / "one.csv").exists()


def test_a_named_pipe_is_refused_at_once(ckpt, tmp_path, capsys):
    fifo = tmp_path / "frames.mp4"
    os.mkfifo(fifo)
    # should a regression open the pipe for reading, a writer arriving after 30 s ends the wait with an EOF
    unblock = threading.Timer(30, lambda: os.close(os.open(fifo, os.O_RDWR)))
    unblock.start()
    try:
        with pytest.raises(DataFormatError, match="not a regular file or a folder"):
            FrameSource(fifo)
        out = tmp_path / "out.csv"
        assert main(["predict", str(fifo), "-o", str(out), "--checkpoint", str(ckpt)]) == 2
        error_line(capsys, str(fifo), "named pipe")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["frames.mp4"]
    finally:
        unblock.cancel()


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--score-threshold", "2", "--score-threshold"),
    ("--score-threshold", "-0.1", "--score-threshold"),
    ("--score-threshold", "nan", "--score-threshold"),
    ("--max-side", "-5", "--max-side"),
    ("--threads", "0", "--threads"),
    ("--batch-size", "0", "--batch-size"),
    ("--every", "0", "every"),
    ("--smooth", "4", "odd"),
])
def test_predict_options_out_of_range_are_one_line_and_write_nothing(flag, value, needle, ckpt, image_folder,
                                                                     tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert main(["predict", str(image_folder), "-o", str(out), "--checkpoint", str(ckpt), flag, value]) == 2
    error_line(capsys, needle)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ column styles and the provenance file

#: The mapping of book/predict_schema.md ("Column styles"), written out here by hand for the 2020 label set.
OPENFACE = {"file": "file", "frame": "frame", "face": "face_id", "face_score": "confidence", "status": "status",
            "AU1_prob": "AU01_r", "AU12_prob": "AU12_r", "AU25_prob": "AU25_r", "AU1": "AU01_c", "AU12": "AU12_c",
            "AU25": "AU25_c", "valence": "valence", "Happiness_prob": "Happiness_prob", "expression": "expression"}
PYFEAT = {"file": "input", "frame": "frame", "face_x": "FaceRectX", "face_y": "FaceRectY", "face_w": "FaceRectWidth",
          "face_h": "FaceRectHeight", "face_score": "FaceScore", "AU1_prob": "AU01", "AU12_prob": "AU12",
          "AU1": "AU01_present", "AU20": "AU20_present", "Neutral_prob": "neutral", "Happiness_prob": "happiness",
          "Surprise_prob": "surprise", "expression": "emotion", "valence": "valence", "arousal": "arousal"}


@pytest.mark.parametrize("style, expected", [("openface", OPENFACE), ("pyfeat", PYFEAT)])
def test_each_column_style_maps_as_documented(crops, aligned, complete_csv, tmp_path, style, expected):
    out = tmp_path / f"{style}.csv"
    meta = predict_to_csv(crops, out, aligned, batch_size=2, column_style=style)
    plain = pd.read_csv(io.StringIO(complete_csv))
    styled = pd.read_csv(out)
    assert meta["columns"] == list(styled.columns) and meta["column_style"] == style
    for old, new in expected.items():
        if old == "expression" and style == "pyfeat":  # Py-Feat's emotion names are lower case
            assert list(styled[new]) == [e.lower() for e in plain[old]]
        else:
            pd.testing.assert_series_equal(styled[new], plain[old], check_names=False)
    # nothing lost, nothing invented: every schema column is there under one name (OpenFace adds success)
    added = {"success"} if style == "openface" else set()
    assert len(styled.columns) == len(plain.columns) + len(added)
    if style == "openface":
        assert list(styled["success"]) == [int(s == "ok") for s in plain["status"]]
        assert not any(c.startswith("AU1_") or c == "AU1" for c in styled.columns)
    else:
        assert not any(c.endswith("_prob") for c in styled.columns) and "file" not in styled.columns
    frame = predict(crops, aligned, batch_size=2, column_style=style)
    assert list(frame.columns) == list(styled.columns)
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), styled, check_dtype=False, atol=1e-6)  # CSV: 6 dp


def test_column_map_of_twelve_aus_and_an_unknown_style():
    from mtanet.inference import column_map
    from mtanet.tasks import AU_NAMES_2021, EXPR_NAMES_2022

    cols = ["frame", "AU7_prob", "AU26_prob", "AU7", "AU26", "Other_prob", "expression"]
    assert column_map(cols, "openface", AU_NAMES_2021, EXPR_NAMES_2022) == {
        "frame": "frame", "AU7_prob": "AU07_r", "AU26_prob": "AU26_r", "AU7": "AU07_c", "AU26": "AU26_c",
        "Other_prob": "Other_prob", "expression": "expression"}
    assert column_map(cols, "pyfeat", AU_NAMES_2021, EXPR_NAMES_2022)["Other_prob"] == "other"
    assert column_map(cols, "mtanet", AU_NAMES_2021, EXPR_NAMES_2022) == {c: c for c in cols}
    with pytest.raises(ConfigError, match="--columns"):
        column_map(cols, "openfeat")


def test_cli_columns_and_the_provenance_sidecar(crops, ckpt, tmp_path, capsys):
    import hashlib

    from mtanet.provenance import PROVENANCE_SCHEMA, sidecar_path

    out = tmp_path / "pred.csv"
    assert main(["predict", str(crops), "-o", str(out), "--checkpoint", str(ckpt), "--aligned", "--threads", "1",
                 "--columns", "openface"]) == 0
    assert str(sidecar_path(out)) in capsys.readouterr().out
    assert "AU01_c" in pd.read_csv(out).columns
    prov = json.loads(sidecar_path(out).read_text())
    assert sidecar_path(out).name == "pred.csv.provenance.json"
    assert prov["schema"] == PROVENANCE_SCHEMA
    assert prov["model"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["au_thresholds"] == {"values": THRESHOLDS, "source": "checkpoint"}
    assert prov["runtime"]["engine"] == "torch" and prov["runtime"]["device"] == "cpu"
    assert prov["detector"] is None and prov["alignment"] is None  # --aligned: no detection, no alignment
    assert prov["input"]["path"] == str(crops.resolve()) and prov["input"]["kind"] == "folder"
    assert prov["input"]["files"] == 10 and prov["input"]["bytes"] == sum(p.stat().st_size for p in crops.iterdir())
    assert prov["mtanet"]["version"] and "commit" in prov["mtanet"]
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before anything runs
        main(["predict", str(crops), "-o", str(tmp_path / "other.csv"), "--checkpoint", str(ckpt), "--columns",
              "openfeat"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "other.csv").exists()


def test_the_sidecar_names_the_detector_and_its_checksum(video, predictor, video_run):
    from mtanet.inference.faces import DETECTOR_SHA256, _load_detector_bytes
    from mtanet.provenance import sidecar_path

    out, _ = video_run
    prov = json.loads(sidecar_path(out).read_text())
    assert prov["detector"]["sha256"] == DETECTOR_SHA256
    assert hashlib_sha256(_load_detector_bytes()) == DETECTOR_SHA256  # the bytes that ran, not just a constant
    assert prov["detector"]["score_threshold"] == 0.8 and prov["alignment"]["template"] == "arcface"
    assert prov["input"] == {"path": str(video.resolve()), "kind": "file", "bytes": video.stat().st_size}
    assert prov["au_thresholds"]["values"] == THRESHOLDS


def hashlib_sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_run_that_leaves_no_row_leaves_no_sidecar(crops, ckpt, tmp_path):
    from mtanet.provenance import sidecar_path

    crashing = Predictor(ckpt, aligned=True, threads=1)

    def fail(crops):
        raise RuntimeError("simulated crash")

    crashing.infer = fail
    out = tmp_path / "pred.csv"
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_to_csv(crops, out, crashing, batch_size=2)
    assert not sidecar_path(out).exists() and list(tmp_path.iterdir()) == []
