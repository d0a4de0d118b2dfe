"""Per-frame valence/arousal, action units and expression for a photo, a folder of photos or a video.

A frame goes through :class:`mtanet.faces.FaceAligner` (RetinaFace detection, 5-point similarity alignment to a
112x112 crop like Aff-Wild2's ``cropped_aligned``), then the model, in batches. The output has **one row per input
frame** (one per face with ``all_faces=True``), also when there is no face (the predictions are then NaN) or the
frame cannot be decoded; the columns are documented in ``book/predict_schema.md`` and in :meth:`Predictor.columns`.

- :func:`predict` returns a pandas DataFrame, for small inputs.
- :func:`predict_to_csv` streams: frames are decoded one at a time (PyAV for videos), batched through the model,
  and each batch's rows are written and flushed before the next is read, so memory does not grow with the video
  and a crash keeps every row written so far. A ``<output>.meta.json`` beside the CSV records the model, the AU
  thresholds and where they came from, the options, and ``status`` (``running`` until the end, then ``complete``
  or ``failed``).
- ``mtanet predict`` and ``mtanet export`` are the command-line faces of the two (see :func:`add_cli`).

Engines: ``"torch"`` (a checkpoint or an :class:`~mtanet.models.MTANet`) or ``"onnx"`` (a file from
:func:`mtanet.export.export_onnx`, run by onnxruntime). A device that is asked for and not available is an error,
never a silent fallback to the CPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from mtanet.tasks import AU_NAMES_2020, AU_NAMES_2021, EXPR_NAMES_2020, EXPR_NAMES_2022, TASKS, VA_NAMES

__all__ = [
    "IMAGE_SUFFIXES",
    "DeviceUnavailableError",
    "FrameItem",
    "FrameSource",
    "MovingAverage",
    "Predictor",
    "add_cli",
    "checkpoint_extras",
    "load_checkpoint",
    "predict",
    "predict_to_csv",
    "resolve_device",
]

#: File suffixes read as images (anything else that is not a folder is opened as a video).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})

#: Keys of a checkpoint's extra dict that prediction reads (all optional). ``image_size`` may also come from the
#: ``train_config`` dict that :mod:`mtanet.train` saves: the side the model was trained at (crops are resized to it).
CHECKPOINT_EXTRAS: tuple[str, ...] = (
    "au_thresholds", "au_names", "expr_names", "edition", "align_template", "image_size")

#: Row status values.
STATUS_OK, STATUS_NO_FACE, STATUS_UNREADABLE = "ok", "no_face", "unreadable"

DEFAULT_AU_THRESHOLD = 0.5
CROP_SIZE = 112


class DeviceUnavailableError(RuntimeError):
    """A device was requested that this machine (or this torch / onnxruntime build) cannot use."""


# ------------------------------------------------------------------------------------------------------ sources


@dataclasses.dataclass
class FrameItem:
    """One input frame: 0-based ``index`` in the source, ``timestamp`` in seconds (NaN for images), ``file`` name
    (image inputs), the ``uint8`` RGB ``image`` or ``None`` with the reason in ``error``."""

    index: int
    timestamp: float
    file: str | None
    image: np.ndarray | None
    error: str | None = None


class FrameSource:
    """The frames of an image file, a folder of images (sorted by name) or a video, read lazily and in order.

    Args:
        path: an image (suffix in :data:`IMAGE_SUFFIXES`), a folder, or anything PyAV/FFmpeg can open.
        every: keep frames whose index is a multiple of ``every`` (the others are decoded, for inter-frame codecs,
            but not converted).

    Opening checks what can be checked up front: a missing path raises :class:`FileNotFoundError`, a folder
    without images and a file FFmpeg cannot open raise :class:`~mtanet.data.DataFormatError`. While iterating, a
    frame that fails to decode is yielded with ``image=None`` and the reason (a video packet that fails to decode
    counts as one frame), and ``errors`` collects the messages; a container that breaks off ends the iteration
    with ``truncated = True``.
    """

    def __init__(self, path: str | os.PathLike, every: int = 1):
        from mtanet.data import DataFormatError

        self.path = Path(path)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.errors: list[str] = []
        self.truncated = False
        self.info: dict[str, Any] = {}
        self._container = None
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted((p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
                                 and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
            if not self.files:
                raise DataFormatError(self.path, None, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                                       "in this folder")
            self.info = {"images": len(self.files)}
        elif self.path.suffix.lower() in IMAGE_SUFFIXES:
            self.kind = "image"
            self.files = [self.path]
            self.info = {"images": 1}
        else:
            self.kind = "video"
            self._open_video()

    def _open_video(self) -> None:
        import av

        from mtanet.data import DataFormatError

        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError, ValueError) as err:
            raise DataFormatError(self.path, None, f"cannot open as a video ({err})") from None
        if not self._container.streams.video:
            self._container.close()
            raise DataFormatError(self.path, None, "no video stream in this file")
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        self._rate = float(rate) if rate else math.nan
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        self.info = {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": self._rate,
            "frames_in_header": int(stream.frames) or None,  # 0 when the container does not say
            "duration_s": duration,
        }

    def estimated_frames(self) -> int | None:
        """Frames the source will yield (after ``every``), when known in advance."""
        if self.kind != "video":
            return -(-len(self.files) // self.every)
        n = self.info.get("frames_in_header")
        if not n and self.info.get("duration_s") and self._rate == self._rate:
            n = round(self.info["duration_s"] * self._rate)
        return -(-n // self.every) if n else None

    def __iter__(self) -> Iterator[FrameItem]:
        if self.kind == "video":
            yield from self._iter_video()
            return
        from mtanet.data import DataFormatError
        from mtanet.faces import load_image

        for index, path in enumerate(self.files):
            if index % self.every:
                continue
            try:
                image, error = load_image(path), None
            except (DataFormatError, FileNotFoundError) as err:
                if self.kind == "image":
                    raise
                image, error = None, str(err)
                self._note(error)
            yield FrameItem(index, math.nan, path.name, image, error)

    def _iter_video(self) -> Iterator[FrameItem]:
        import av

        container = self._container
        stream = container.streams.video[0]
        tb = stream.time_base
        start = stream.start_time or 0

        def seconds(pts: int | None, index: int) -> float:
            return float((pts - start) * tb) if pts is not None and tb else index / self._rate

        index = 0
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as err:  # the container itself breaks off: nothing after this can be read
                self.truncated = True
                self._note(f"{self.path}: reading stopped after {index} frames ({err})")
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                if packet.size:  # a corrupt frame: keep its place in the sequence
                    if index % self.every == 0:
                        message = f"{self.path}: frame {index}: cannot decode ({err})"
                        self._note(message)
                        yield FrameItem(index, seconds(packet.pts, index), None, None, message)
                    index += 1
                continue
            for frame in frames:
                if index % self.every == 0:
                    yield FrameItem(index, seconds(frame.pts, index), None, frame.to_ndarray(format="rgb24"))
                index += 1

    def _note(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)
        if len(self.errors) < 100:
            self.errors.append(message)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------- models


def resolve_device(device: str | Any) -> Any:
    """``torch.device`` for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or ``"mps"``), raising
    :class:`DeviceUnavailableError` when it is not usable here; ``"cuda"`` resolves to the current GPU index."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise DeviceUnavailableError(f"unknown device {device!r} ({err}); use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {str(device)!r} requested, but CUDA is not available to torch {torch.__version__} "
                f"(built for CUDA {torch.version.cuda}; torch.cuda.is_available() is False); use --device cpu")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {str(device)!r} requested, but only {torch.cuda.device_count()} "
                                         "CUDA device(s) are visible")
        return torch.device("cuda", index)
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise DeviceUnavailableError(f"device {str(device)!r} is not available; use cpu, cuda or cuda:N")


def checkpoint_extras(path: str | os.PathLike) -> dict[str, Any]:
    """The prediction-related extras of a :func:`~mtanet.models.save_checkpoint` file (the keys of
    :data:`CHECKPOINT_EXTRAS` that are present), read without building the model."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise ValueError(f"{path} is not an MTANet checkpoint (needs 'config' and 'state_dict')")
    extras = {k: ckpt[k] for k in CHECKPOINT_EXTRAS if k in ckpt}
    train_config = ckpt.get("train_config")
    if "image_size" not in extras and isinstance(train_config, Mapping) and train_config.get("image_size"):
        extras["image_size"] = int(train_config["image_size"])
    return extras


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """An :func:`~mtanet.models.load_model` model (eval mode) and :func:`checkpoint_extras` of its file."""
    from mtanet.models import load_model

    extras = checkpoint_extras(path)
    return load_model(path, map_location=map_location), extras


def _label_names(num_outputs: Mapping[str, int], extras: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """AU and expression names: from the checkpoint when it says, else the ABAW edition that has that many."""
    from mtanet.tasks import EDITIONS

    k, c = num_outputs.get("au", 0), num_outputs.get("expr", 0)
    edition = EDITIONS.get(str(extras.get("edition", "")))
    au = list(extras.get("au_names") or (edition.au_names if edition else
                                          {8: AU_NAMES_2020, 12: AU_NAMES_2021}.get(k, [f"AU_{i}" for i in range(k)])))
    expr = list(extras.get("expr_names") or (edition.expr_names if edition else {
        7: EXPR_NAMES_2020, 8: EXPR_NAMES_2022}.get(c, [f"class_{i}" for i in range(c)])))
    if len(au) != k or len(expr) != c:
        raise ValueError(f"label names ({len(au)} AUs, {len(expr)} expressions) do not fit the model's heads "
                         f"({k} AU outputs, {c} expression outputs)")
    return au, expr


def _thresholds(value: Any, au_names: Sequence[str]) -> np.ndarray:
    """Per-AU decision thresholds from a list, array, tensor or ``{AU name: threshold}`` dict."""
    if isinstance(value, Mapping):
        missing = [n for n in au_names if n not in value]
        if missing:
            raise ValueError(f"au_thresholds has no value for {missing}")
        value = [value[n] for n in au_names]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(len(au_names), float(arr[0]))
    if arr.size != len(au_names) or not np.all((arr > 0) & (arr < 1)):
        raise ValueError(f"au_thresholds must be {len(au_names)} values in (0, 1), got {arr.tolist()}")
    return arr


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Detect, align and predict on batches of frames: the engine of :func:`predict` and :func:`predict_to_csv`.

    Args:
        model: a checkpoint path, an :class:`~mtanet.models.MTANet`, or ``None`` with ``engine="onnx"``.
        engine: ``"torch"`` or ``"onnx"``.
        onnx: the ``.onnx`` file of the onnx engine (its metadata supplies names and thresholds; a checkpoint given
            as well takes precedence for those).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; unavailable -> :class:`DeviceUnavailableError`.
        tasks: the tasks whose columns to write (default: every head of the model).
        all_faces: one row per detected face (largest first) instead of the largest face only.
        template: alignment template name (see :data:`mtanet.faces.TEMPLATES`); default the checkpoint's
            ``align_template`` or ``"arcface"``.
        aligned: the inputs are already aligned face crops: no detection, the whole image is resized to 112x112.
        threads: threads of onnxruntime (detector and onnx engine); default every usable core. The torch engine
            uses torch's own setting (``torch.set_num_threads``; the CLI sets it from ``--threads``).
        score_threshold, max_side: detector settings (see :class:`mtanet.faces.RetinaFaceDetector`).
        au_thresholds: per-AU thresholds overriding the checkpoint's ``au_thresholds``.
        aligner: a ready :class:`mtanet.faces.FaceAligner` to reuse (then ``template``, ``threads`` for the
            detector, ``score_threshold`` and ``max_side`` are its own).
    """

    def __init__(self, model: Any = None, *, engine: str = "torch", onnx: str | os.PathLike | None = None,
                 device: str = "cpu", tasks: Sequence[str] | str | None = None, all_faces: bool = False,
                 template: str | None = None, aligned: bool = False, threads: int | None = None,
                 score_threshold: float = 0.8, max_side: int | None = 640,
                 au_thresholds: Any = None, aligner: Any = None):
        from mtanet.models import MTANet
        from mtanet.train import usable_cores

        if engine not in ("torch", "onnx"):
            raise ValueError(f"engine must be 'torch' or 'onnx', got {engine!r}")
        self.engine_name = engine
        self.threads = int(threads) if threads else usable_cores()
        self.device = str(device)
        extras: dict[str, Any] = {}
        self.checkpoint = None
        self.model = None
        self.onnx_engine = None
        if isinstance(model, (str, os.PathLike)):
            self.checkpoint = str(model)
            if engine == "torch":
                model, extras = load_checkpoint(model)
            else:
                extras, model = checkpoint_extras(model), None
        elif model is not None and not isinstance(model, MTANet):
            raise TypeError(f"model must be a checkpoint path or an MTANet, got {type(model).__name__}")

        if engine == "torch":
            if model is None:
                raise ValueError("the torch engine needs a checkpoint or a model")
            dev = resolve_device(device)
            self.model = model.eval().to(dev)
            placed = {t.device for t in (*self.model.parameters(), *self.model.buffers())}
            if placed != {dev}:  # never let a GPU request quietly run elsewhere
                raise RuntimeError(f"model tensors are on {sorted(map(str, placed))}, expected {dev}")
            self.torch_device = dev
            self.device = str(dev)
            num_outputs = dict(model.config["num_outputs"])
            self.model_config = dict(model.config)
            self.image_size = int(extras.get("image_size") or CROP_SIZE)
        else:
            from mtanet.export import OnnxEngine

            if onnx is None:
                raise ValueError("the onnx engine needs the .onnx file (onnx=..., CLI --onnx)")
            self.onnx_engine = OnnxEngine(onnx, threads=self.threads, device=self.device)
            meta = self.onnx_engine.metadata
            self.model_config = dict(meta.get("mtanet_config") or {})
            onnx_extras = {k: meta[k] for k in CHECKPOINT_EXTRAS if meta.get(k) is not None}
            if meta.get("au_threshold_source", "").startswith("default"):
                onnx_extras.pop("au_thresholds", None)  # exported without tuned thresholds: keep saying so
            extras = {**onnx_extras, **extras}
            side = self.onnx_engine.session.get_inputs()[0].shape[-1]
            self.image_size = int(side) if isinstance(side, int) else int(extras.get("image_size") or CROP_SIZE)
            shapes = {o.name: o.shape[1] for o in self.onnx_engine.session.get_outputs()}
            num_outputs = {t: int(shapes[t]) for t in TASKS if t in shapes}
            if model is not None and dict(model.config["num_outputs"]) != num_outputs:  # an MTANet beside its ONNX
                raise ValueError(f"the ONNX model's heads {num_outputs} differ from the model's "
                                 f"{model.config['num_outputs']}")
        self.onnx_path = None if onnx is None else str(onnx)
        self.num_outputs = num_outputs

        if tasks is None:
            tasks = [t for t in TASKS if t in num_outputs]
        elif isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in num_outputs]
        if unknown or not tasks:
            raise ValueError(f"tasks {unknown or tasks} not among the model's heads {sorted(num_outputs)}")
        self.tasks = [t for t in TASKS if t in tasks]
        self.au_names, self.expr_names = _label_names(num_outputs, extras)

        if au_thresholds is not None:
            self.au_thresholds, self.au_threshold_source = _thresholds(au_thresholds, self.au_names), "argument"
        elif extras.get("au_thresholds") is not None:
            self.au_thresholds = _thresholds(extras["au_thresholds"], self.au_names)
            self.au_threshold_source = "checkpoint"
        else:
            self.au_thresholds = np.full(len(self.au_names), DEFAULT_AU_THRESHOLD)
            self.au_threshold_source = (f"default {DEFAULT_AU_THRESHOLD} (the model carries no tuned "
                                        "au_thresholds)")

        self.all_faces = bool(all_faces)
        self.aligned = bool(aligned)
        self.aligner = None
        if not aligned:
            from mtanet.faces import FaceAligner

            self.aligner = aligner if aligner is not None else FaceAligner(
                template=template or extras.get("align_template") or "arcface", threads=self.threads,
                score_threshold=score_threshold, max_side=max_side)

    # ---------------------------------------------------------------------------------------------- columns

    def columns(self, with_file: bool = False) -> list[str]:
        """The output columns, in order (see ``book/predict_schema.md``)."""
        cols = ["file"] if with_file else []
        cols += ["frame", "timestamp", "face", "n_faces", "status", "face_x", "face_y", "face_w", "face_h",
                 "face_score"]
        if "va" in self.tasks:
            cols += list(VA_NAMES)
        if "au" in self.tasks:
            cols += [f"{n}_prob" for n in self.au_names] + list(self.au_names)
        if "expr" in self.tasks:
            cols += [f"{n}_prob" for n in self.expr_names] + ["expression"]
        return cols

    def smoothed_columns(self) -> list[str]:
        """The columns a :class:`MovingAverage` averages (the decisions are re-derived from them)."""
        cols = list(VA_NAMES) if "va" in self.tasks else []
        if "au" in self.tasks:
            cols += [f"{n}_prob" for n in self.au_names]
        if "expr" in self.tasks:
            cols += [f"{n}_prob" for n in self.expr_names]
        return cols

    def metadata(self) -> dict[str, Any]:
        """What produced the rows: model, engine, device, labels, thresholds, alignment and detector settings."""
        from mtanet import __version__

        meta: dict[str, Any] = {
            "mtanet_version": __version__,
            "checkpoint": self.checkpoint,
            "engine": self.engine_name,
            "onnx": self.onnx_path,
            "device": self.device,
            "threads": self.threads,
            "model_config": self.model_config,
            "tasks": self.tasks,
            "au_names": self.au_names,
            "expr_names": self.expr_names,
            "au_thresholds": [float(t) for t in self.au_thresholds],
            "au_threshold_source": self.au_threshold_source,
            "image_size": self.image_size,
            "all_faces": self.all_faces,
            "aligned_input": self.aligned,
        }
        if self.aligner is not None:
            det = self.aligner.detector
            meta["alignment"] = {"template": self.aligner.template_name, "points": self.aligner.template.tolist(),
                                 "size": self.aligner.size, "warp": "PIL bilinear (box pre-reduce when >= 2x)"}
            meta["detector"] = {"name": type(det).__name__, "score_threshold": getattr(det, "score_threshold", None),
                                "max_side": getattr(det, "max_side", None), "threads": getattr(det, "threads", None),
                                "device": "cpu (onnxruntime)"}
        return meta

    # -------------------------------------------------------------------------------------------- inference

    def infer(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Model outputs for ``uint8`` crops ``(N, 112, 112, 3)``: ``va`` ``(N, 2)``, ``au`` probabilities
        ``(N, K)`` (sigmoid), ``expr`` probabilities ``(N, C)`` (softmax); float64 numpy arrays.

        Crops are scaled to [0, 1] and, for a model trained at another ``image_size``, resized to it the way
        :class:`mtanet.data.FrameDataset` does (bilinear, antialiased)."""
        import torch
        from torch.nn import functional as F

        device = self.torch_device if self.model is not None else "cpu"
        x = torch.from_numpy(np.ascontiguousarray(crops)).to(device)  # uint8 over the bus, 4x less than float
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.model is not None:
            with torch.inference_mode():
                raw = {k: v.float().cpu().numpy() for k, v in self.model(x).items()}
        else:
            raw = self.onnx_engine(x.numpy())
        out = {}
        if "va" in raw:
            out["va"] = raw["va"].astype(np.float64)
        if "au" in raw:
            out["au"] = _sigmoid(raw["au"].astype(np.float64))
        if "expr" in raw:
            out["expr"] = _softmax(raw["expr"].astype(np.float64))
        return out

    def _faces(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float, float], np.ndarray]]:
        """``[(box x, y, w, h, score), crop]`` per face to predict on, largest first."""
        if self.aligned:
            from PIL import Image

            h, w = image.shape[:2]
            crop = image if (h, w) == (CROP_SIZE, CROP_SIZE) else np.asarray(
                Image.fromarray(image).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0))
            return [((0.0, 0.0, float(w), float(h), math.nan), crop)]
        found = self.aligner(image, all_faces=self.all_faces)
        return [((f.face.x0, f.face.y0, f.face.x1 - f.face.x0, f.face.y1 - f.face.y0, f.face.score), f.crop)
                for f in found]

    def process(self, items: Sequence[FrameItem], chunk: int = 64) -> list[dict[str, Any]]:
        """Rows for a batch of frames (one per frame, or per face with ``all_faces``), in input order."""
        from mtanet.faces import as_rgb

        found = []
        crops = []
        for item in items:
            faces = [] if item.image is None else self._faces(as_rgb(item.image))
            found.append(faces)
            crops.extend(crop for _, crop in faces)
        preds: dict[str, np.ndarray] = {}
        if crops:
            parts = [self.infer(np.stack(crops[i:i + chunk])) for i in range(0, len(crops), chunk)]
            preds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows = []
        j = 0
        for item, faces in zip(items, found):
            # 1-based like the dataset table and the crops' file names (frame 1 is 00001.jpg)
            base = {"file": item.file, "frame": item.index + 1, "timestamp": item.timestamp, "n_faces": len(faces)}
            if not faces:
                status = STATUS_UNREADABLE if item.image is None else STATUS_NO_FACE
                rows.append(self._row(base, math.nan, status, None, None, 0))
                continue
            for rank, (box, _) in enumerate(faces):
                rows.append(self._row(base, rank, STATUS_OK, box, preds, j))
                j += 1
        return rows

    def _row(self, base: dict, face: float, status: str, box, preds, j: int) -> dict[str, Any]:
        nan = math.nan
        row = dict(base)
        row["face"] = face
        row["status"] = status
        x, y, w, h, s = box if box is not None else (nan,) * 5
        row.update(face_x=x, face_y=y, face_w=w, face_h=h, face_score=s)
        if "va" in self.tasks:
            va = preds["va"][j] if preds else (nan, nan)
            row["valence"], row["arousal"] = float(va[0]), float(va[1])
        if "au" in self.tasks:
            p = preds["au"][j] if preds else np.full(len(self.au_names), nan)
            row.update({f"{n}_prob": float(v) for n, v in zip(self.au_names, p)})
        if "expr" in self.tasks:
            p = preds["expr"][j] if preds else np.full(len(self.expr_names), nan)
            row.update({f"{n}_prob": float(v) for n, v in zip(self.expr_names, p)})
        self.decide(row)
        return row

    def decide(self, row: dict[str, Any]) -> None:
        """Set the AU decisions (probability >= threshold) and the expression (argmax) from the probabilities."""
        if "au" in self.tasks:
            for name, t in zip(self.au_names, self.au_thresholds):
                p = row[f"{name}_prob"]
                row[name] = math.nan if math.isnan(p) else int(p >= t)
        if "expr" in self.tasks:
            p = [row[f"{n}_prob"] for n in self.expr_names]
            row["expression"] = None if math.isnan(p[0]) else self.expr_names[int(np.argmax(p))]

    def row_batches(self, source: FrameSource, batch_size: int = 16) -> Iterator[list[dict[str, Any]]]:
        """Rows of ``source``, one list per batch of ``batch_size`` frames."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[FrameItem] = []
        for item in source:
            batch.append(item)
            if len(batch) == batch_size:
                yield self.process(batch)
                batch = []
        if batch:
            yield self.process(batch)


# ------------------------------------------------------------------------------------------------- smoothing


class MovingAverage:
    """Centred moving average over ``window`` consecutive rows (odd), streamed with a delay of ``window // 2``.

    Each averaged column of a row becomes the mean of the non-missing values in the rows from ``window // 2``
    before to ``window // 2`` after it (fewer at the ends); a row without a face stays missing. ``decide`` (if
    given) re-derives the decisions of a row from its averaged probabilities. ``push`` returns the rows that are
    complete; ``flush`` the rest at the end.
    """

    def __init__(self, window: int, columns: Sequence[str], decide=None):
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the smoothing window must be an odd number >= 1, got {window}")
        self.half = window // 2
        self.columns = list(columns)
        self.decide = decide
        self._rows: deque[dict[str, Any]] = deque()
        self._values: deque[np.ndarray] = deque()
        self._next = 0  # position in the deque of the next row to emit

    def push(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        self._rows.append(row)
        self._values.append(np.array([row[c] for c in self.columns], dtype=np.float64))
        out = []
        while len(self._rows) - 1 - self._next >= self.half:
            out.append(self._emit())
        return out

    def flush(self) -> list[dict[str, Any]]:
        out = []
        while self._next < len(self._rows):
            out.append(self._emit())
        self._rows.clear()
        self._values.clear()
        self._next = 0
        return out

    @property
    def pending(self) -> int:
        """Rows pushed but not yet emitted."""
        return len(self._rows) - self._next

    def _emit(self) -> dict[str, Any]:
        i = self._next
        row = dict(self._rows[i])
        own = self._values[i]
        if not np.isnan(own).all():
            lo, hi = max(0, i - self.half), min(len(self._values), i + self.half + 1)
            window = np.stack([self._values[k] for k in range(lo, hi)])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                mean = np.nanmean(window, axis=0)
            row.update({c: math.nan if math.isnan(o) else float(v) for c, v, o in zip(self.columns, mean, own)})
            if self.decide is not None:
                self.decide(row)
        self._next += 1
        while self._next > self.half:  # rows older than the window are no longer needed
            self._rows.popleft()
            self._values.popleft()
            self._next -= 1
        return row


# ---------------------------------------------------------------------------------------------------- output


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return str(value)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def metadata_path(output: str | os.PathLike) -> Path:
    """Where :func:`predict_to_csv` writes the metadata of ``output``: ``<output>.meta.json``."""
    return Path(str(output) + ".meta.json")


def _predictor(model: Any, kwargs: dict[str, Any]) -> Predictor:
    if isinstance(model, Predictor):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} cannot be applied to a ready Predictor")
        return model
    return Predictor(model, **kwargs)


def _smoother(predictor: Predictor, smooth: int | None) -> MovingAverage | None:
    if not smooth or smooth == 1:
        return None
    if predictor.all_faces:
        raise ValueError("smoothing needs one face per frame: faces are not tracked across frames with all_faces")
    return MovingAverage(smooth, predictor.smoothed_columns(), predictor.decide)


def predict(input: str | os.PathLike, model: Any = None, *, every: int = 1, batch_size: int = 16,
            smooth: int | None = None, **options: Any):
    """Predictions for an image, a folder of images or a (short) video as a pandas DataFrame.

    Args:
        input: image file, folder of images (one row per image, sorted by name) or video file.
        model: checkpoint path, :class:`~mtanet.models.MTANet`, a ready :class:`Predictor`, or ``None`` with
            ``engine="onnx", onnx=...``.
        every: predict every ``every``-th frame only.
        batch_size: frames per model batch.
        smooth: centred moving-average window (odd) over frames; ``None`` or 1 for none.
        **options: :class:`Predictor` arguments (``engine``, ``onnx``, ``device``, ``tasks``, ``all_faces``, ...).

    The DataFrame has the columns of :meth:`Predictor.columns` (``file`` only for image inputs) and the metadata
    in ``df.attrs["mtanet"]``. It holds every row in memory: use :func:`predict_to_csv` for long videos.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    with FrameSource(input, every=every) as source:  # a missing or unreadable input fails before the model loads
        predictor = _predictor(model, options)
        smoother = _smoother(predictor, smooth)
        for batch in predictor.row_batches(source, batch_size):
            rows.extend(r for row in batch for r in (smoother.push(row) if smoother else [row]))
        if smoother:
            rows.extend(smoother.flush())
    columns = predictor.columns(with_file=source.kind != "video")
    frame = pd.DataFrame(rows, columns=columns)
    for name in columns:
        if name in ("file", "status", "expression"):
            continue
        frame[name] = pd.to_numeric(frame[name])
    frame.attrs["mtanet"] = {**predictor.metadata(), "input": str(input), "input_kind": source.kind,
                             "source": source.info, "every": every, "smooth": smooth, "errors": source.errors,
                             "truncated": source.truncated}
    return frame


def predict_to_csv(input: str | os.PathLike, output: str | os.PathLike, model: Any = None, *, every: int = 1,
                   batch_size: int = 16, smooth: int | None = None, overwrite: bool = False,
                   progress: bool = False, **options: Any) -> dict[str, Any]:
    """Stream predictions for ``input`` into the CSV ``output``; returns the final metadata.

    Same arguments as :func:`predict`. Rows are written and flushed after every batch (with ``smooth=K``, rows
    leave ``K // 2`` frames late); memory stays constant whatever the video's length. ``<output>.meta.json``
    records what produced the rows and ``status``: ``running`` while writing, ``complete`` at the end, ``failed``
    (with the error) when an exception stops the run, in which case every row already written stays in the CSV
    (and a smoothing buffer is flushed first). An existing ``output`` raises :class:`FileExistsError` unless
    ``overwrite``.
    """
    output = Path(output)
    meta_path = metadata_path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (CLI --overwrite) to replace it")
    source = FrameSource(input, every=every)  # a missing or unreadable input fails before the model loads
    try:
        predictor = _predictor(model, options)
        smoother = _smoother(predictor, smooth)
    except BaseException:
        source.close()
        raise
    columns = predictor.columns(with_file=source.kind != "video")
    started = time.perf_counter()
    meta = {**predictor.metadata(), "input": str(input), "input_kind": source.kind, "source": source.info,
            "output": str(output), "every": every, "batch_size": batch_size, "smooth": smooth, "columns": columns,
            "status": "running", "rows_written": 0, "frames_read": 0}
    counts = {"rows_written": 0, "frames_read": 0, "frames_no_face": 0, "frames_unreadable": 0}
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_json(meta_path, meta)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=source.estimated_frames(), unit="frame", file=sys.stderr, disable=None)

    def write(f, writer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            writer.writerow([_format(row.get(c)) for c in columns])
        f.flush()
        counts["rows_written"] += len(rows)

    try:
        with source, open(output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            f.flush()
            try:
                for batch in predictor.row_batches(source, batch_size):
                    frames = [r for r in batch if not r["face"] > 0]  # a frame's first row: face 0 or NaN
                    counts["frames_read"] += len(frames)
                    counts["frames_no_face"] += sum(r["status"] == STATUS_NO_FACE for r in frames)
                    counts["frames_unreadable"] += sum(r["status"] == STATUS_UNREADABLE for r in frames)
                    if smoother:
                        write(f, writer, [r for row in batch for r in smoother.push(row)])
                    else:
                        write(f, writer, batch)
                    if bar is not None:
                        bar.update(len(frames))
            finally:
                if smoother and smoother.pending:  # their windows are truncated, but they are real predictions
                    write(f, writer, smoother.flush())
                os.fsync(f.fileno())
    except BaseException as err:
        meta.update(counts, status="failed", error=f"{type(err).__name__}: {err}", errors=source.errors,
                    truncated=source.truncated, elapsed_s=round(time.perf_counter() - started, 3))
        _write_json(meta_path, meta)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    meta.update(counts, status="complete", errors=source.errors, truncated=source.truncated,
                elapsed_s=round(elapsed, 3), frames_per_s=round(counts["frames_read"] / max(elapsed, 1e-9), 2))
    _write_json(meta_path, meta)
    return meta


# ---------------------------------------------------------------------------------------------------------- CLI


def _cli_predict(args: argparse.Namespace) -> int:
    if args.engine == "torch" and args.checkpoint is None:
        print("mtanet predict: error: --checkpoint is required with --engine torch", file=sys.stderr)
        return 2
    if args.engine == "onnx" and args.onnx is None:
        print("mtanet predict: error: --onnx model.onnx is required with --engine onnx", file=sys.stderr)
        return 2
    if args.threads and args.engine == "torch":
        import torch

        torch.set_num_threads(args.threads)
    try:
        meta = predict_to_csv(
            args.input, args.output, args.checkpoint, every=args.every, batch_size=args.batch_size,
            smooth=args.smooth, overwrite=args.overwrite, progress=True, engine=args.engine, onnx=args.onnx,
            device=args.device, tasks=args.tasks, all_faces=args.all_faces, template=args.template,
            aligned=args.aligned, threads=args.threads, score_threshold=args.score_threshold,
            max_side=args.max_side or None)
    except (DeviceUnavailableError, ValueError, ModuleNotFoundError) as err:
        if isinstance(err, ModuleNotFoundError) and err.name not in ("av", "onnxruntime"):
            raise
        print(f"mtanet predict: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtanet predict: interrupted; the rows written so far are in {args.output}", file=sys.stderr)
        return 130
    if meta["au_threshold_source"] != "checkpoint" and "au" in meta["tasks"]:
        print(f"note: AU decisions use threshold {meta['au_threshold_source']}", file=sys.stderr)
    print(f"{meta['rows_written']} rows for {meta['frames_read']} frames ({meta['frames_no_face']} without a face, "
          f"{meta['frames_unreadable']} unreadable) in {meta['elapsed_s']:.1f} s ({meta['frames_per_s']} frames/s) "
          f"-> {args.output} (metadata: {metadata_path(args.output)})")
    return 0


def _cli_export(args: argparse.Namespace) -> int:
    from mtanet.export import export_checkpoint

    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    try:
        path = export_checkpoint(args.checkpoint, args.output, opset=args.opset, check=not args.no_check)
    except (ValueError, AssertionError) as err:
        print(f"mtanet export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_cli(subparsers) -> None:
    """Register ``mtanet predict`` and ``mtanet export``."""
    from mtanet.faces import TEMPLATES

    p = subparsers.add_parser(
        "predict", help="valence/arousal, AUs and expression for every frame of an image, folder or video",
        description="Detect and align the face(s) of every frame and write one CSV row per frame (per face with "
                    "--all-faces), NaN where no face is found. Columns: book/predict_schema.md.")
    p.add_argument("input", type=Path, help="an image, a folder of images (sorted by name) or a video")
    p.add_argument("-o", "--output", type=Path, required=True, help="CSV to write (+ OUTPUT.meta.json)")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (save_checkpoint file)")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch")
    p.add_argument("--onnx", type=Path, help="ONNX model from `mtanet export` (with --engine onnx)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="predict every N-th frame (default 1)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="frames per batch (default 16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (an unavailable GPU is an error)")
    p.add_argument("--all-faces", action="store_true", help="one row per face instead of the largest face")
    p.add_argument("--tasks", default=None, help="comma-separated subset of va,au,expr (default: all heads)")
    p.add_argument("--smooth", type=int, default=None, metavar="K",
                   help="centred moving average over K frames (odd; default off)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for onnxruntime and torch (default: all usable cores)")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="alignment template (default: the checkpoint's align_template, else arcface)")
    p.add_argument("--aligned", action="store_true", help="inputs are already aligned face crops: no detection")
    p.add_argument("--score-threshold", type=float, default=0.8, help="detector score threshold (default 0.8)")
    p.add_argument("--max-side", type=int, default=640,
                   help="downscale frames to this longest side for detection (0: never; default 640)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_cli_predict)

    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (dynamic batch)",
                              description="Write the model of CHECKPOINT as ONNX with its label names and AU "
                                          "thresholds in the metadata; checks onnxruntime against PyTorch.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cli_export)
