"""Provenance: one JSON block that says what produced a result, written beside every output.

A predictions CSV, an evaluation's ``scores.json`` and a training run's ``metrics.json`` carry the same block, so a
number that changes between two runs can be traced to what changed: the model file (its SHA-256), the face detector
(its checksum) and alignment template, the AU decision thresholds and where they came from, the package version and
git commit, the device and runtime (PyTorch or ONNX Runtime), and the input's path and size.

:func:`provenance` builds the block from what the caller knows (this module runs nothing and imports neither
the predictor nor the trainer); :func:`file_sha256` and :func:`input_summary` are its pieces; :func:`sidecar_path`
and :func:`write_sidecar` put it beside a CSV. Keys: ``book/predict_schema.md`` ("The provenance file").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mtanet.runtime import cpu_model, git_info, json_clean, versions, write_json

__all__ = ["PROVENANCE_SCHEMA", "file_sha256", "input_summary", "provenance", "training_provenance", "sidecar_path",
           "write_sidecar"]

#: Name and version of the block's layout; a reader checks it before trusting the keys.
PROVENANCE_SCHEMA = "mtanet-provenance/1"

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes as lowercase hex (what ``sha256sum`` prints), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def input_summary(path: str | os.PathLike[str], **counts: Any) -> dict[str, Any]:
    """The input's absolute path, kind and size: a file's bytes; a folder's files directly in it and their bytes
    (what ``mtanet predict`` reads of a folder; sub-folders are not walked, so a dataset root costs nothing).
    ``counts`` (e.g. ``frames=``, ``names=``) are added as they are."""
    p = Path(path).expanduser()
    out: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(p)}
    if p.is_file():
        out.update(kind="file", bytes=p.stat().st_size)
    elif p.is_dir():
        files = [e for e in os.scandir(p) if e.is_file()]
        out.update(kind="folder", files=len(files), bytes=sum(e.stat().st_size for e in files))
    else:
        out.update(kind="missing")
    out.update(counts)
    return out


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpu_name(device: str) -> str | None:
    """The CUDA device's name when ``device`` is one (``None`` on the CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch  # only here: scoring and CSV tools import this module without needing torch's CUDA state

    try:
        return torch.cuda.get_device_name(torch.device(device))
    except (RuntimeError, AssertionError, ValueError):
        return None


def provenance(*, checkpoint: str | os.PathLike[str] | None = None, checkpoint_digest: str | None = None,
               onnx: str | os.PathLike[str] | None = None, runtime: str = "torch", device: str = "cpu",
               detector: Mapping[str, Any] | None = None, alignment: Mapping[str, Any] | None = None,
               au_thresholds: Sequence[float] | None = None, au_threshold_source: str | None = None,
               input: Mapping[str, Any] | str | os.PathLike[str] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance block (strict-JSON-able dict).

    Args:
        checkpoint: the model file; its SHA-256 is computed here (the bytes on disk: ``sha256sum`` gives the same).
        checkpoint_digest: the payload digest the checkpoint carries (``ckpt["digest"]``,
            :mod:`mtanet.models.integrity`), recorded beside the file's.
        onnx: an ONNX model file that ran instead of (or beside) the checkpoint; hashed the same way.
        runtime: ``"torch"`` or ``"onnx"`` (ONNX Runtime).
        device: where the model ran (``"cpu"``, ``"cuda:0"``).
        detector: the face detector's name, settings and ``sha256`` (``None``: no detection, e.g. aligned crops).
        alignment: the alignment template (name, points, crop size); ``None`` when the input was already aligned.
        au_thresholds, au_threshold_source: the AU decision thresholds and where they came from.
        input: the input's path (summarised by :func:`input_summary`) or a ready summary dict.
        extra: more keys, added under ``extra``.

    Returns:
        ``schema``, ``created_utc``, ``mtanet`` (``version``, ``commit``, ``dirty``), ``versions`` (Python, torch,
        timm, numpy, mtanet, onnxruntime), ``model`` (``checkpoint``, ``checkpoint_sha256``, ``checkpoint_digest``,
        ``onnx``, ``onnx_sha256``), ``runtime`` (``engine``, ``device``, ``cpu``, ``gpu``), ``detector``, ``alignment``,
        ``au_thresholds`` (``values``, ``source``), ``input`` and ``extra``.
    """
    if runtime not in ("torch", "onnx"):
        raise ValueError(f"runtime must be 'torch' or 'onnx', got {runtime!r}")
    git = git_info()
    vers = {**versions(), "onnxruntime": _package_version("onnxruntime")}
    model: dict[str, Any] = {"checkpoint": None, "checkpoint_sha256": None, "checkpoint_digest": checkpoint_digest,
                             "onnx": None, "onnx_sha256": None}
    if checkpoint is not None:
        model.update(checkpoint=str(Path(checkpoint).expanduser().resolve()), checkpoint_sha256=file_sha256(checkpoint))
    if onnx is not None:
        model.update(onnx=str(Path(onnx).expanduser().resolve()), onnx_sha256=file_sha256(onnx))
    if isinstance(input, (str, os.PathLike)):
        input = input_summary(input)
    block = {
        "schema": PROVENANCE_SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mtanet": {"version": vers.get("mtanet"), "commit": git.get("commit"), "dirty": git.get("dirty")},
        "versions": vers,
        "model": model,
        "runtime": {"engine": runtime, "device": str(device), "cpu": cpu_model(), "gpu": _gpu_name(str(device))},
        "detector": dict(detector) if detector is not None else None,
        "alignment": dict(alignment) if alignment is not None else None,
        "au_thresholds": {"values": None if au_thresholds is None else [float(t) for t in au_thresholds],
                          "source": au_threshold_source},
        "input": dict(input) if input is not None else None,
        "extra": dict(extra) if extra is not None else {},
    }
    return json_clean(block)


def training_provenance(data_root: str | os.PathLike[str], device: str, *,
                        checkpoint: str | os.PathLike[str] | None = None,
                        au_thresholds: Sequence[float] | None = None,
                        pretrained: Mapping[str, Any] | None = None,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The block for a training run's ``metrics.json``: the dataset root as input (path only: its size is the
    annotation fingerprint's business, not a walk of a million jpgs), the device, no detector (the dataset's crops),
    the AU thresholds tuned on validation (source ``"tuned on validation"``), the final checkpoint's SHA-256 when
    given, and the starting weights (``pretrained``: e.g. ``{"source", "path", "sha256"}``) under ``extra``."""
    more = dict(extra or {})
    if pretrained is not None:
        more["pretrained"] = dict(pretrained)
    return provenance(checkpoint=checkpoint, runtime="torch", device=device, detector=None,
                      alignment={"template": "the dataset's cropped_aligned crops (no detection)"},
                      au_thresholds=au_thresholds,
                      au_threshold_source=None if au_thresholds is None else "tuned on validation",
                      input={"path": str(Path(data_root).expanduser().resolve()), "kind": "dataset root"},
                      extra=more)


def sidecar_path(csv_path: str | os.PathLike[str]) -> Path:
    """Where the provenance of a predictions CSV goes: ``<csv>.provenance.json`` beside it (``clip.csv`` ->
    ``clip.csv.provenance.json``), named like its ``<csv>.meta.json``."""
    return Path(str(csv_path) + ".provenance.json")


def write_sidecar(csv_path: str | os.PathLike[str], block: Mapping[str, Any]) -> Path:
    """Write ``block`` to :func:`sidecar_path` of ``csv_path`` as strict JSON, atomically; returns the path."""
    path = sidecar_path(csv_path)
    write_json(path, block)
    return path
