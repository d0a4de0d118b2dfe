"""Per-frame valence/arousal, action units and expression for a photo, a folder of photos or a video.

- :mod:`mtanet.inference.faces`: RetinaFace detection and 5-point alignment to 112x112 crops (:class:`FaceAligner`,
  :data:`TEMPLATES`), image decoding (:func:`load_image`, :func:`as_rgb`).
- :mod:`mtanet.inference.sources`: the frames of an input, decoded lazily (:class:`FrameSource`, :class:`FrameItem`).
- :mod:`mtanet.inference.extras`: what a checkpoint carries besides the weights (label names, AU thresholds and
  where they came from, alignment template, image size), read alike by prediction and export.
- :mod:`mtanet.inference.onnx`: ONNX export (:func:`export_onnx`, :func:`export_checkpoint`) and the onnxruntime
  engine (:class:`OnnxEngine`).
- :mod:`mtanet.inference.predictor`: :class:`Predictor` (detect, align, run the model, one row per frame) and
  :func:`predict`, a pandas DataFrame for small inputs.
- :mod:`mtanet.inference.stream`: :func:`predict_to_csv`, rows streamed to a CSV with a ``<output>.meta.json`` and
  a ``<output>.provenance.json`` (:mod:`mtanet.provenance`).
- :mod:`mtanet.inference.naming`: the column styles of ``--columns`` (:data:`COLUMN_STYLES`: the schema, OpenFace,
  Py-Feat) and :func:`column_map`.

The command-line faces, ``mtanet predict`` and ``mtanet export``, are in :mod:`mtanet.cli.predict`; the columns and
metadata keys are documented in ``book/predict_schema.md``.
"""

from mtanet.inference.extras import (
    CHECKPOINT_EXTRAS,
    DEFAULT_AU_THRESHOLD,
    checkpoint_extras,
    label_names,
    load_checkpoint,
    resolve_au_thresholds,
)
from mtanet.inference.faces import (
    ARCFACE_112,
    SYNTH_112,
    TEMPLATES,
    AlignedFace,
    Face,
    FaceAligner,
    RetinaFaceDetector,
    as_rgb,
    load_image,
    umeyama,
    warp_affine,
)
from mtanet.inference.naming import COLUMN_STYLES, DEFAULT_COLUMN_STYLE, column_map, styled_columns
from mtanet.inference.onnx import (
    ONNX_INPUT,
    OnnxEngine,
    export_checkpoint,
    export_onnx,
    onnx_device_providers,
    read_onnx_metadata,
)
from mtanet.inference.predictor import MovingAverage, Predictor, predict
from mtanet.inference.sources import IMAGE_SUFFIXES, FrameItem, FrameSource
from mtanet.inference.stream import metadata_path, predict_to_csv

__all__ = [
    "ARCFACE_112",
    "CHECKPOINT_EXTRAS",
    "COLUMN_STYLES",
    "DEFAULT_COLUMN_STYLE",
    "DEFAULT_AU_THRESHOLD",
    "IMAGE_SUFFIXES",
    "ONNX_INPUT",
    "SYNTH_112",
    "TEMPLATES",
    "AlignedFace",
    "Face",
    "FaceAligner",
    "FrameItem",
    "FrameSource",
    "MovingAverage",
    "OnnxEngine",
    "Predictor",
    "RetinaFaceDetector",
    "as_rgb",
    "checkpoint_extras",
    "column_map",
    "export_checkpoint",
    "export_onnx",
    "label_names",
    "load_checkpoint",
    "load_image",
    "metadata_path",
    "onnx_device_providers",
    "predict",
    "predict_to_csv",
    "read_onnx_metadata",
    "resolve_au_thresholds",
    "styled_columns",
    "umeyama",
    "warp_affine",
]
