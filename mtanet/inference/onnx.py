"""Export a trained MTANet to ONNX (dynamic batch) and run it under onnxruntime.

The ONNX graph is the model's ``forward``: input ``images``, float32 ``(batch, 3, S, S)`` RGB in [0, 1] with ``S``
the training ``image_size`` (112 unless the checkpoint says otherwise; the normalisation buffers are inside the
graph), outputs ``va`` (tanh), ``au`` (logits) and ``expr`` (logits), one per head. Everything a predictor needs
besides the weights travels in the model's ``metadata_props`` (JSON strings): ``mtanet_config``, ``au_names``,
``expr_names``, ``au_thresholds``, ``au_threshold_source``, ``image_size`` and ``align_template``, so
``mtanet predict --engine onnx --onnx model.onnx`` needs no checkpoint.

Integrity: :func:`export_onnx` also writes ``mtanet_sha256`` (:data:`ONNX_DIGEST_KEY`), the SHA-256 of the weights
(every initializer, in name order), the graph's nodes, inputs, outputs and opsets, and the other metadata entries.
:class:`OnnxEngine` and :func:`read_onnx_metadata` check it before anything is used and hand onnxruntime the very bytes
they checked; a file changed after export (bytes flipped inside a weight), truncated, empty or not ONNX is a
:class:`~mtanet.errors.CheckpointError` naming the file. A model without the entry (exported before digests existed,
or by another tool) is used with a ``UserWarning`` naming the file.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``. It handles this plain CNN exactly
(max difference ~1e-7), exports in under a second and needs no extra package; the ``torch.export``-based exporter
(torch's default since 2.9) needs ``onnxscript``, which is not a dependency. TorchScript files are not offered:
``torch.jit.trace`` is deprecated in torch 2.x, and ONNX covers the portable use.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from mtanet.errors import CheckpointError, DeviceUnavailableError
from mtanet.inference.extras import (
    CHECKPOINT_EXTRAS,
    CROP_SIZE,
    label_names,
    load_checkpoint,
    resolve_au_thresholds,
)
from mtanet.inference.faces import session_options
from mtanet.models import MTANet, probabilities
from mtanet.runtime import atomic_path, json_clean
from mtanet.tasks import TASKS

__all__ = [
    "ONNX_DIGEST_KEY",
    "ONNX_INPUT",
    "OnnxEngine",
    "export_checkpoint",
    "export_onnx",
    "onnx_device_providers",
    "read_onnx_metadata",
    "read_onnx_model",
]

#: Name of the ONNX model's input.
ONNX_INPUT = "images"

#: ``metadata_props`` key of the model's SHA-256 digest (a JSON string ``"sha256:<hex>"``), written by
#: :func:`export_onnx` and checked by :class:`OnnxEngine` and :func:`read_onnx_metadata`.
ONNX_DIGEST_KEY = "mtanet_sha256"


def export_onnx(
    model: MTANet,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    image_size: int = CROP_SIZE,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write ``model`` (an :class:`mtanet.models.MTANet`) to ``path`` as ONNX with a dynamic batch axis.

    Args:
        metadata: JSON-serialisable values stored in ``metadata_props`` (one JSON string per key).
        check: run ``onnx.checker`` and compare onnxruntime with PyTorch on batches of 1 and 3 (raises
            ``AssertionError`` past ``atol`` on the probabilities and VA).

    The file is written atomically (a temporary file in the same folder, then ``os.replace``), with the digest
    :data:`ONNX_DIGEST_KEY` in its metadata.
    """
    if metadata and ONNX_DIGEST_KEY in metadata:
        raise ValueError(f"metadata must not set {ONNX_DIGEST_KEY!r}: export_onnx writes it")
    path = Path(path)
    model = model.eval()
    was_device = next(model.parameters()).device
    model = model.to("cpu")
    tasks = list(model.heads.keys())
    dummy = torch.rand(2, 3, image_size, image_size)
    axes = {name: {0: "batch"} for name in [ONNX_INPUT, *tasks]}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            with warnings.catch_warnings():
                # the TorchScript-based exporter is deprecated in favour of the dynamo one (see the module
                # docstring); the tracer also notes the shape check in MTANet.features, which is constant for a
                # fixed input layout
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (dummy,), str(tmp), input_names=[ONNX_INPUT], output_names=tasks,
                                  dynamic_axes=axes, opset_version=opset, dynamo=False)
            proto = onnx.load(str(tmp))
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, json.dumps(json_clean(value), allow_nan=False)
            proto.producer_name = "mtanet"
            digest = json.dumps(_onnx_digest(proto))  # before its entry exists: the digest never covers itself
            entry = proto.metadata_props.add()
            entry.key, entry.value = ONNX_DIGEST_KEY, digest
            onnx.save(proto, str(tmp))
            if check:
                onnx.checker.check_model(str(tmp))
                _check_parity(model, tmp, tasks, image_size, atol)
    finally:
        model.to(was_device)
    return path


def export_checkpoint(model: MTANet | str | os.PathLike, path: str | os.PathLike, *, au_thresholds: Any = None,
                      opset: int = 17, check: bool = True) -> Path:
    """Export a checkpoint (path) or an MTANet to ONNX with the metadata :class:`mtanet.inference.Predictor` reads:
    the model config, AU and expression names, AU thresholds (``au_thresholds``, else the checkpoint's, else 0.5,
    and where they came from), and the checkpoint's alignment template and edition when it has them."""
    extras: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        model, extras = load_checkpoint(model)
    au_names, expr_names = label_names(model.config["num_outputs"], extras)
    thresholds, source = resolve_au_thresholds(au_names, au_thresholds, extras.get("au_thresholds"))
    metadata = {"mtanet_config": model.config, "au_names": au_names, "expr_names": expr_names,
                "au_thresholds": [float(t) for t in thresholds], "au_threshold_source": source}
    for key in ("align_template", "edition"):
        if extras.get(key) is not None:
            metadata[key] = extras[key]
    image_size = int(extras.get("image_size") or CROP_SIZE)
    metadata["image_size"] = image_size
    return export_onnx(model, path, metadata=metadata, image_size=image_size, opset=opset, check=check)


def _check_parity(model: MTANet, onnx_path: str | os.PathLike, tasks: list[str], image_size: int,
                  atol: float) -> None:
    engine = OnnxEngine(onnx_path, threads=1)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 3):
        x = torch.rand(n, 3, image_size, image_size, generator=gen)
        with torch.inference_mode():
            ref = probabilities(model(x))
        got = probabilities({k: torch.from_numpy(v) for k, v in engine(x.numpy()).items()})
        for task in tasks:
            err = float((ref[task] - got[task]).abs().max())
            if not err <= atol:
                raise AssertionError(f"ONNX export differs from PyTorch on {task} (batch {n}): max |diff| {err:.2e}")


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata_props`` written by :func:`export_onnx`, JSON-decoded, once the model's digest matches (no
    onnxruntime session is built).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not an ONNX model or was changed after it was exported.
    """
    return _decode_metadata(read_onnx_model(path)[1])


def _onnx_digest(proto: onnx.ModelProto) -> str:
    """``"sha256:<hex>"`` of what the model computes and says: every initializer (name, type, shape, bytes) in name
    order, the nodes, inputs, outputs and opsets, and the metadata entries other than the digest, sorted by key."""
    h = hashlib.sha256()

    def feed(data: bytes) -> None:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    graph = proto.graph
    for part in (*sorted(graph.initializer, key=lambda t: t.name), *graph.node, *graph.input, *graph.output,
                 *proto.opset_import):
        feed(part.SerializeToString(deterministic=True))
    for key, value in sorted((e.key, e.value) for e in proto.metadata_props if e.key != ONNX_DIGEST_KEY):
        feed(key.encode())
        feed(value.encode())
    return "sha256:" + h.hexdigest()


def read_onnx_model(path: str | os.PathLike) -> tuple[bytes, onnx.ModelProto]:
    """The bytes of an exported model and their parsed proto, once its digest (:data:`ONNX_DIGEST_KEY`) matches.

    A model without the digest (exported before digests existed, or by another tool) is returned with a
    ``UserWarning`` naming the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file cannot be parsed as ONNX (truncated, empty, another kind of file), or its content
            is not what was exported (digest mismatch).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not an ONNX model; give the .onnx file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}); check that it is readable") from err
    advice = "it was not used. Restore it from a backup or export it again (mtanet export)"
    try:
        proto = onnx.load_model_from_string(data)
    except DecodeError as err:
        raise CheckpointError(f"{path} cannot be read as an ONNX model (truncated or not ONNX: {err}); "
                              f"{advice}") from err
    if not proto.graph.node or not proto.opset_import:
        raise CheckpointError(f"{path} is not an ONNX model (no graph; empty or another kind of file); {advice}")
    stored = {e.key: e.value for e in proto.metadata_props}.get(ONNX_DIGEST_KEY)
    if stored is None:
        warnings.warn(f"{path} carries no {ONNX_DIGEST_KEY} digest (exported before mtanet checked its models, or "
                      "by another tool), so damage to it cannot be detected; export it again to add one",
                      UserWarning, stacklevel=3)
    elif stored != json.dumps(_onnx_digest(proto)):
        raise CheckpointError(f"{path} was changed after it was exported (digest mismatch); {advice}")
    return data, proto


def _decode_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    out = {}
    for entry in proto.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out


def onnx_device_providers(device: str) -> list[str]:
    """onnxruntime providers for a device string; raises :class:`~mtanet.errors.DeviceUnavailableError` when a GPU is
    asked for and onnxruntime has none."""
    import onnxruntime as ort  # loads the onnxruntime library: only when a session is built, not at import

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceUnavailableError(
                f"device {device!r} requested, but this onnxruntime has no CUDAExecutionProvider (available: "
                f"{ort.get_available_providers()}); install onnxruntime-gpu or use --engine torch / --device cpu"
            )
        return ["CUDAExecutionProvider"]
    raise DeviceUnavailableError(f"the onnx engine runs on 'cpu' or 'cuda[:N]', not {device!r}")


class OnnxEngine:
    """An exported MTANet under onnxruntime: ``engine(images)`` maps a float32 ``(N, 3, S, S)`` [0, 1] array to a
    dict of numpy outputs keyed by task, like the PyTorch model.

    Args:
        threads: ``intra_op_num_threads`` (set explicitly: onnxruntime's default takes every core).
        device: ``"cpu"`` or ``"cuda[:N]"``; a GPU that onnxruntime cannot use is an error, not a silent
            CPU fallback (the session's providers are checked after it is built).

    Besides the session, the engine says what the file holds: ``tasks`` (output names), ``num_outputs`` (width of
    each head, in task order), ``image_size`` (the input side, ``None`` when the graph leaves it open), ``metadata``
    (the decoded ``metadata_props``) and :meth:`extras`.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort  # loads the onnxruntime library: only when a session is built, not at import

        self.path = Path(path)
        data, proto = read_onnx_model(self.path)  # checked against its digest; the session runs these very bytes
        providers: list[Any] = onnx_device_providers(device)
        if providers[0] == "CUDAExecutionProvider" and ":" in device:
            providers = [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])})]
        self.session = ort.InferenceSession(data, session_options(threads), providers=providers)
        if device != "cpu" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise DeviceUnavailableError(f"onnxruntime could not start CUDA for {device!r} "
                                         f"(session providers: {self.session.get_providers()})")
        self.device = device
        self.tasks = [o.name for o in self.session.get_outputs()]
        widths = {o.name: o.shape[1] for o in self.session.get_outputs()}
        self.num_outputs = {t: int(widths[t]) for t in TASKS if t in widths}
        side = self.session.get_inputs()[0].shape[-1]
        self.image_size: int | None = int(side) if isinstance(side, int) else None
        self.metadata = _decode_metadata(proto)

    def extras(self) -> dict[str, Any]:
        """The metadata a checkpoint would carry as extras (the keys of
        :data:`~mtanet.inference.extras.CHECKPOINT_EXTRAS` that are set); ``au_thresholds`` only when they were
        tuned, not the default the export filled in, so a predictor keeps saying that they are a default."""
        extras = {k: self.metadata[k] for k in CHECKPOINT_EXTRAS if self.metadata.get(k) is not None}
        if str(self.metadata.get("au_threshold_source", "")).startswith("default"):
            extras.pop("au_thresholds", None)
        return extras

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {ONNX_INPUT: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.tasks, outs))
