"""The provenance block (issue 16): what produced an output, hashed from the files themselves.

The sidecar of ``mtanet predict`` is tested in tests/test_predict.py and tests/test_export.py, the block inside
``mtanet evaluate``'s scores.json in tests/test_evaluate.py; here the pieces on their own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mtanet import provenance as P
from mtanet.runtime import git_info


def test_file_sha256_is_that_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    data = bytes(range(256)) * 9000  # more than one read chunk
    path.write_bytes(data)
    assert P.file_sha256(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1] + b"\x00")
    assert P.file_sha256(path) != hashlib.sha256(data).hexdigest()


def test_input_summary_of_a_file_a_folder_and_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x" * 10)
    (tmp_path / "b.jpg").write_bytes(b"y" * 5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpg").write_bytes(b"z" * 100)  # not walked: predict reads a folder's own files
    assert P.input_summary(tmp_path / "a.jpg") == {"path": str((tmp_path / "a.jpg").resolve()), "kind": "file",
                                                   "bytes": 10}
    assert P.input_summary(tmp_path, frames=3) == {"path": str(tmp_path.resolve()), "kind": "folder", "files": 2,
                                                   "bytes": 15, "frames": 3}
    assert P.input_summary(tmp_path / "gone")["kind"] == "missing"


def test_the_block_holds_every_documented_key_as_strict_json(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    block = P.provenance(checkpoint=ckpt, checkpoint_digest="sha256:abc", runtime="torch", device="cpu",
                         detector={"name": "RetinaFaceDetector", "sha256": "d" * 64},
                         alignment={"template": "arcface"}, au_thresholds=[0.4, 0.6],
                         au_threshold_source="checkpoint", input=ckpt, extra={"note": float("nan")})
    text = json.dumps(block, allow_nan=False)  # strict JSON: NaN became null
    assert json.loads(text)["extra"] == {"note": None}
    assert block["schema"] == P.PROVENANCE_SCHEMA
    assert block["model"] == {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": hashlib.sha256(b"weights")
                              .hexdigest(), "checkpoint_digest": "sha256:abc", "onnx": None, "onnx_sha256": None}
    assert block["detector"]["sha256"] == "d" * 64 and block["alignment"] == {"template": "arcface"}
    assert block["au_thresholds"] == {"values": [0.4, 0.6], "source": "checkpoint"}
    assert block["runtime"]["engine"] == "torch" and block["runtime"]["device"] == "cpu"
    assert block["runtime"]["gpu"] is None
    assert block["mtanet"]["commit"] == git_info()["commit"] and block["versions"]["torch"]
    assert block["input"]["bytes"] == 7
    with pytest.raises(ValueError, match="runtime"):
        P.provenance(runtime="tensorrt")


def test_the_sidecar_sits_beside_the_csv_and_is_written_whole(tmp_path: Path, monkeypatch) -> None:
    csv = tmp_path / "clip.csv"
    assert P.sidecar_path(csv) == tmp_path / "clip.csv.provenance.json"
    P.write_sidecar(csv, {"schema": P.PROVENANCE_SCHEMA, "n": 1})
    before = P.sidecar_path(csv).read_bytes()

    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):  # half the new file reaches the disk, then it is full
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        P.write_sidecar(csv, {"schema": P.PROVENANCE_SCHEMA, "n": 2, "long": "x" * 1000})
    monkeypatch.undo()
    assert P.sidecar_path(csv).read_bytes() == before  # the old file whole, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.csv.provenance.json"]


def test_training_provenance_names_the_root_the_device_and_the_start(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"final weights")
    block = P.training_provenance(tmp_path, "cuda:0", checkpoint=ckpt, au_thresholds=[0.3, 0.7],
                                  pretrained={"source": "vggface2", "sha256": "e" * 64})
    assert block["input"] == {"path": str(tmp_path.resolve()), "kind": "dataset root"}
    assert block["runtime"]["device"] == "cuda:0" and block["detector"] is None
    assert block["au_thresholds"] == {"values": [0.3, 0.7], "source": "tuned on validation"}
    assert block["model"]["checkpoint_sha256"] == hashlib.sha256(b"final weights").hexdigest()
    assert block["extra"]["pretrained"]["sha256"] == "e" * 64
    json.dumps(block, allow_nan=False)
