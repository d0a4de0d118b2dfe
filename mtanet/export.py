"""Export a trained MTANet to ONNX (dynamic batch) and run it under onnxruntime.

The ONNX graph is the model's ``forward``: input ``images``, float32 ``(batch, 3, S, S)`` RGB in [0, 1] with ``S``
the training ``image_size`` (112 unless the checkpoint says otherwise; the normalisation buffers are inside the
graph), outputs ``va`` (tanh), ``au`` (logits) and ``expr`` (logits), one per head. Everything a predictor needs
besides the weights travels in the model's ``metadata_props`` (JSON strings): ``mtanet_config``, ``au_names``,
``expr_names``, ``au_thresholds``, ``au_threshold_source``, ``image_size`` and ``align_template``, so
``mtanet predict --engine onnx --onnx model.onnx`` needs no checkpoint.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``. It handles this plain CNN exactly
(max difference ~1e-7), exports in under a second and needs no extra package; the ``torch.export``-based exporter
(torch's default since 2.9) needs ``onnxscript``, which is not a dependency. TorchScript files are not offered:
``torch.jit.trace`` is deprecated in torch 2.x, and ONNX covers the portable use.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ONNX_INPUT",
    "OnnxEngine",
    "export_checkpoint",
    "export_onnx",
    "onnx_device_providers",
    "read_onnx_metadata",
]

#: Name of the ONNX model's input.
ONNX_INPUT = "images"


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    image_size: int = 112,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write ``model`` (an :class:`mtanet.models.MTANet`) to ``path`` as ONNX with a dynamic batch axis.

    Args:
        metadata: JSON-serialisable values stored in ``metadata_props`` (one JSON string per key).
        check: run ``onnx.checker`` and compare onnxruntime with PyTorch on batches of 1 and 3 (raises
            ``AssertionError`` past ``atol`` on the probabilities and VA).

    The file is written atomically (a temporary file in the same folder, then ``os.replace``).
    """
    import onnx
    import torch

    path = Path(path)
    model = model.eval()
    was_device = next(model.parameters()).device
    model = model.to("cpu")
    tasks = list(model.heads.keys())
    dummy = torch.rand(2, 3, image_size, image_size)
    axes = {name: {0: "batch"} for name in [ONNX_INPUT, *tasks]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter is deprecated in favour of the dynamo one (see the module docstring);
            # the tracer also notes the shape check in MTANet.features, which is constant for a fixed input layout
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), tmp, input_names=[ONNX_INPUT], output_names=tasks,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        proto = onnx.load(tmp)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        proto.producer_name = "mtanet"
        onnx.save(proto, tmp)
        if check:
            onnx.checker.check_model(tmp)
            _check_parity(model, tmp, tasks, image_size, atol)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        model.to(was_device)
    return path


def export_checkpoint(model: Any, path: str | os.PathLike, *, au_thresholds: Any = None, opset: int = 17,
                      check: bool = True) -> Path:
    """Export a checkpoint (path) or an MTANet to ONNX with the metadata :class:`mtanet.predict.Predictor` reads:
    the model config, AU and expression names, AU thresholds (``au_thresholds``, else the checkpoint's, else 0.5,
    and where they came from), and the checkpoint's alignment template and edition when it has them."""
    from mtanet.predict import DEFAULT_AU_THRESHOLD, _label_names, _thresholds, load_checkpoint

    extras: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        model, extras = load_checkpoint(model)
    au_names, expr_names = _label_names(model.config["num_outputs"], extras)
    if au_thresholds is not None:
        thresholds, source = _thresholds(au_thresholds, au_names), "argument"
    elif extras.get("au_thresholds") is not None:
        thresholds, source = _thresholds(extras["au_thresholds"], au_names), "checkpoint"
    else:
        thresholds = np.full(len(au_names), DEFAULT_AU_THRESHOLD)
        source = f"default {DEFAULT_AU_THRESHOLD} (the checkpoint carries no tuned au_thresholds)"
    metadata = {"mtanet_config": model.config, "au_names": au_names, "expr_names": expr_names,
                "au_thresholds": [float(t) for t in thresholds], "au_threshold_source": source}
    for key in ("align_template", "edition"):
        if extras.get(key) is not None:
            metadata[key] = extras[key]
    image_size = int(extras.get("image_size") or 112)
    metadata["image_size"] = image_size
    return export_onnx(model, path, metadata=metadata, image_size=image_size, opset=opset, check=check)


def _check_parity(model, onnx_path: str, tasks: list[str], image_size: int, atol: float) -> None:
    import torch

    engine = OnnxEngine(onnx_path, threads=1)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 3):
        x = torch.rand(n, 3, image_size, image_size, generator=gen)
        with torch.inference_mode():
            ref = {k: v.numpy() for k, v in model(x).items()}
        got = engine(x.numpy())
        for task in tasks:
            a, b = _probs(task, ref[task]), _probs(task, got[task])
            err = float(np.abs(a - b).max())
            if not err <= atol:
                raise AssertionError(f"ONNX export differs from PyTorch on {task} (batch {n}): max |diff| {err:.2e}")


def _probs(task: str, out: np.ndarray) -> np.ndarray:
    if task == "au":
        return 1.0 / (1.0 + np.exp(-out))
    if task == "expr":
        e = np.exp(out - out.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    return out


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata_props`` written by :func:`export_onnx`, JSON-decoded (without loading the weights)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return _decode_metadata(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))


def _decode_metadata(session) -> dict[str, Any]:
    out = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def onnx_device_providers(device: str) -> list[str]:
    """onnxruntime providers for a device string; raises when a GPU is asked for and onnxruntime has none."""
    import onnxruntime as ort

    from mtanet.predict import DeviceUnavailableError

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
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX model")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        providers: list[Any] = onnx_device_providers(device)
        if providers[0] == "CUDAExecutionProvider" and ":" in device:
            providers = [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])})]
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        if device != "cpu" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            from mtanet.predict import DeviceUnavailableError

            raise DeviceUnavailableError(f"onnxruntime could not start CUDA for {device!r} "
                                         f"(session providers: {self.session.get_providers()})")
        self.device = device
        self.tasks = [o.name for o in self.session.get_outputs()]
        self.metadata = _decode_metadata(self.session)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {ONNX_INPUT: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.tasks, outs))
