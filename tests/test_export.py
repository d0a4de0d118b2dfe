"""ONNX export: parity with PyTorch under onnxruntime at several batch sizes, metadata, engine and CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtanet.cli import main
from mtanet.errors import CheckpointError, DeviceUnavailableError
from mtanet.inference import OnnxEngine, Predictor, export_checkpoint, read_onnx_metadata
from mtanet.inference.onnx import ONNX_DIGEST_KEY, export_onnx
from mtanet.models import MTANet, save_checkpoint


THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.35, 0.45, 0.55]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    model = MTANet("seresnet18", feature_dim=64).eval()
    path = tmp_path_factory.mktemp("export") / "ckpt.pt"
    save_checkpoint(model, path, extra={"au_thresholds": THRESHOLDS, "epoch": 3})
    return model, path


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    _, path = checkpoint
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(path), "-o", str(out)]) == 0  # the CLI, which also checks parity
    return out


def test_onnx_matches_pytorch_with_a_dynamic_batch(checkpoint, onnx_file):
    model, _ = checkpoint
    engine = OnnxEngine(onnx_file, threads=1)
    assert engine.session.get_inputs()[0].shape[0] == "batch"
    gen = torch.Generator().manual_seed(1)
    for n in (2, 3, 1):
        x = torch.rand(n, 3, 112, 112, generator=gen)
        with torch.inference_mode():
            ref = model(x)
        got = engine(x.numpy())
        assert set(got) == {"va", "au", "expr"} and got["au"].shape == (n, 8)
        np.testing.assert_allclose(got["va"], ref["va"].numpy(), atol=1e-4)
        np.testing.assert_allclose(1 / (1 + np.exp(-got["au"])), torch.sigmoid(ref["au"]).numpy(), atol=1e-4)
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(got["expr"]), 1).numpy(),
                                   torch.softmax(ref["expr"], 1).numpy(), atol=1e-4)


def test_onnx_metadata_carries_names_thresholds_and_config(checkpoint, onnx_file):
    model, _ = checkpoint
    meta = read_onnx_metadata(onnx_file)
    assert meta["au_thresholds"] == THRESHOLDS and meta["au_threshold_source"] == "checkpoint"
    assert meta["au_names"][0] == "AU1" and meta["expr_names"][-1] == "Surprise"
    assert meta["mtanet_config"] == model.config


def test_predictor_engines_agree_on_crops(checkpoint, onnx_file):
    _, path = checkpoint
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    by_torch = Predictor(path, aligned=True, threads=1).infer(crops)
    onnx = Predictor(engine="onnx", onnx=onnx_file, aligned=True, threads=1)  # no checkpoint needed
    assert onnx.au_threshold_source == "checkpoint" and list(onnx.au_thresholds) == THRESHOLDS
    by_onnx = onnx.infer(crops)
    for task in ("va", "au", "expr"):
        np.testing.assert_allclose(by_onnx[task], by_torch[task], atol=1e-4)


def test_export_without_tuned_thresholds_says_so(tmp_path):
    model = MTANet("seresnet18", num_outputs={"va": 2, "au": 12}, feature_dim=32)
    path = export_checkpoint(model, tmp_path / "m.onnx", check=False)
    meta = read_onnx_metadata(path)
    assert meta["au_threshold_source"].startswith("default 0.5") and len(meta["au_names"]) == 12
    predictor = Predictor(engine="onnx", onnx=path, aligned=True)
    assert predictor.tasks == ["va", "au"] and predictor.au_threshold_source.startswith("default")
    assert predictor.au_names[-1] == "AU26"  # 12 AUs: the 2021+ set


def test_onnx_gpu_request_is_an_error_when_onnxruntime_has_no_cuda(onnx_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceUnavailableError, match="CUDAExecutionProvider"):
        OnnxEngine(onnx_file, device="cuda")


def test_cli_predict_runs_the_onnx_engine(onnx_file, tmp_path, capsys):
    from PIL import Image

    from mtanet.synth.render import Identity, render_face

    Image.fromarray(render_face(Identity(), {})).save(tmp_path / "crop.png")
    out = tmp_path / "out.csv"
    code = main(["predict", str(tmp_path / "crop.png"), "-o", str(out), "--engine", "onnx", "--onnx", str(onnx_file),
                 "--aligned", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    import pandas as pd

    df = pd.read_csv(out)
    assert len(df) == 1 and df.loc[0, "status"] == "ok" and df.loc[0, "file"] == "crop.png"
    # the provenance names the ONNX file that ran (its bytes' SHA-256) and ONNX Runtime, with no checkpoint
    import hashlib
    import json

    from mtanet.provenance import sidecar_path

    prov = json.loads(sidecar_path(out).read_text())
    assert prov["runtime"]["engine"] == "onnx" and prov["versions"]["onnxruntime"]
    assert prov["model"]["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert prov["model"]["checkpoint"] is None and prov["au_thresholds"]["values"] == THRESHOLDS
    assert prov["input"]["bytes"] == (tmp_path / "crop.png").stat().st_size
    assert main(["predict", str(tmp_path / "crop.png"), "-o", str(tmp_path / "x.csv"), "--engine", "onnx"]) == 2
    assert "--onnx" in capsys.readouterr().err


def test_a_model_trained_at_another_size_gets_resized_crops(tmp_path):
    torch.manual_seed(2)
    model = MTANet("seresnet18", feature_dim=32).eval()
    path = tmp_path / "small.pt"
    save_checkpoint(model, path, extra={"train_config": {"image_size": 64}, "au_thresholds": None})
    crops = np.random.default_rng(1).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    predictor = Predictor(path, aligned=True)
    assert predictor.image_size == 64 and predictor.au_threshold_source.startswith("default")
    x = torch.nn.functional.interpolate(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255, size=(64, 64),
                                        mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        expected = model(x)["va"].numpy()
    np.testing.assert_allclose(predictor.infer(crops)["va"], expected, atol=1e-6)
    onnx_path = export_checkpoint(path, tmp_path / "small.onnx")
    assert read_onnx_metadata(onnx_path)["image_size"] == 64
    by_onnx = Predictor(engine="onnx", onnx=onnx_path, aligned=True).infer(crops)
    np.testing.assert_allclose(by_onnx["va"], expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------------- integrity


def _edit_metadata(path, key, value) -> None:
    import onnx

    proto = onnx.load(str(path))
    next(e for e in proto.metadata_props if e.key == key).value = value
    onnx.save(proto, str(path))


@pytest.mark.parametrize("kind", ["flipped weights", "edited thresholds", "truncated", "empty", "text"])
def test_a_damaged_onnx_model_is_refused_never_run(onnx_file, tmp_path, damage, kind):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_file.read_bytes())
    assert read_onnx_metadata(path)[ONNX_DIGEST_KEY].startswith("sha256:")
    if kind == "flipped weights":
        damage.flip_onnx_initializer(path)  # 4 KB inside the largest weight; the protobuf still parses
    elif kind == "edited thresholds":
        _edit_metadata(path, "au_thresholds", "[0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]")
    elif kind == "truncated":
        damage.truncate(path)
    elif kind == "empty":
        damage.empty(path)
    else:
        path.write_text("not a model\n")
    expected = "digest mismatch" if kind in ("flipped weights", "edited thresholds") else "ONNX model"
    for load in (OnnxEngine, read_onnx_metadata, lambda p: Predictor(engine="onnx", onnx=p, aligned=True)):
        with pytest.raises(CheckpointError, match=expected) as err:
            load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_onnx_model_without_a_digest_runs_with_a_warning(onnx_file, tmp_path):
    import onnx

    proto = onnx.load(str(onnx_file))
    kept = [e for e in proto.metadata_props if e.key != ONNX_DIGEST_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))  # as exported before digests
    x = np.random.default_rng(0).random((2, 3, 112, 112), dtype=np.float32)
    with pytest.warns(UserWarning, match=r"old\.onnx carries no mtanet_sha256 digest"):
        engine = OnnxEngine(old)
    np.testing.assert_array_equal(engine(x)["au"], OnnxEngine(onnx_file)(x)["au"])
    with pytest.raises(ValueError, match=ONNX_DIGEST_KEY):
        export_onnx(MTANet("seresnet18", feature_dim=32), tmp_path / "x.onnx", metadata={ONNX_DIGEST_KEY: "x"})


def test_export_refuses_a_damaged_checkpoint_and_writes_nothing(checkpoint, tmp_path, damage, capsys):
    _, good = checkpoint
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(good.read_bytes())
    damage.flip_checkpoint_tensor(bad)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        export_checkpoint(bad, tmp_path / "api.onnx")
    out = tmp_path / "model.onnx"
    assert main(["export", str(bad), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtanet: error:") and str(bad) in lines[0], captured.err
    assert "digest mismatch" in lines[0] and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no model, no temporary file


def test_cli_predict_refuses_a_damaged_onnx_model(onnx_file, tmp_path, damage, capsys):
    from PIL import Image

    from mtanet.synth.render import Identity, render_face

    Image.fromarray(render_face(Identity(), {})).save(tmp_path / "crop.png")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(onnx_file.read_bytes())
    damage.flip_onnx_initializer(bad)
    out = tmp_path / "out.csv"
    code = main(["predict", str(tmp_path / "crop.png"), "-o", str(out), "--engine", "onnx", "--onnx", str(bad),
                 "--aligned", "--threads", "1"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("mtanet: error:") and str(bad) in lines[0] and "digest mismatch" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.png", "model.onnx"]  # no CSV, no meta.json
