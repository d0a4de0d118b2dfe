"""Per-frame prediction: one row per frame, streaming CSV, bad inputs, devices, smoothing and the CLI.

Media are generated here: synthetic faces (mtanet.synth.render) pasted on 640x480 frames at known places, written
as images or as videos with PyAV.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mtanet.cli import main
from mtanet.errors import ConfigError, DataFormatError, DeviceUnavailableError
from mtanet.inference import MovingAverage, Predictor, metadata_path, predict, predict_to_csv
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
