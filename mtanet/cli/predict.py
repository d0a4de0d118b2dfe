"""``mtanet predict`` and ``mtanet export``: the command-line faces of :func:`mtanet.inference.predict_to_csv` and
:func:`mtanet.inference.export_checkpoint`.

Options are parsed here and handed over; the work and its checks are in :mod:`mtanet.inference`. Errors a user can
fix are :class:`mtanet.errors.MtanetError` (and the file errors), printed by :func:`mtanet.cli.main`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mtanet.errors import ConfigError, OutputExistsError
from mtanet.inference import COLUMN_STYLES, TEMPLATES, export_checkpoint, metadata_path, predict_to_csv
from mtanet.provenance import sidecar_path
from mtanet.runtime import prepare_output_file

__all__ = ["add_parsers"]

#: Packages imported only when a video is opened or an ONNX session is built: a missing one is reported as an error.
_RUNTIME_PACKAGES = ("av", "onnxruntime")

#: ONNX opsets `mtanet export` writes: torch's TorchScript exporter writes 7 to 23, and onnxruntime has no kernels
#: for this model's operators below 7 (measured with torch 2.14, onnxruntime 1.32).
OPSETS = range(7, 24)


def _predict(args: argparse.Namespace) -> int:
    if args.engine == "torch" and args.checkpoint is None:
        raise ConfigError("--checkpoint is required with --engine torch")
    if args.engine == "onnx" and args.onnx is None:
        raise ConfigError("--onnx model.onnx is required with --engine onnx")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.threads and args.engine == "torch":
        torch.set_num_threads(args.threads)
    try:
        meta = predict_to_csv(
            args.input, args.output, args.checkpoint, every=args.every, batch_size=args.batch_size,
            smooth=args.smooth, overwrite=args.overwrite, progress=True, engine=args.engine, onnx=args.onnx,
            device=args.device, tasks=args.tasks, all_faces=args.all_faces, template=args.template,
            aligned=args.aligned, threads=args.threads, score_threshold=args.score_threshold,
            max_side=args.max_side or None, column_style=args.columns)
    except ModuleNotFoundError as err:
        if err.name not in _RUNTIME_PACKAGES:
            raise
        print(f"mtanet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"the rows written so far are in {args.output}" if args.output.exists() else "nothing was written"
        print(f"mtanet predict: interrupted; {kept}", file=sys.stderr)
        return 130
    if meta["au_threshold_source"] != "checkpoint" and "au" in meta["tasks"]:
        print(f"note: AU decisions use threshold {meta['au_threshold_source']}", file=sys.stderr)
    print(f"{meta['rows_written']} rows for {meta['frames_read']} frames ({meta['frames_no_face']} without a face, "
          f"{meta['frames_unreadable']} unreadable) in {meta['elapsed_s']:.1f} s ({meta['frames_per_s']} frames/s) "
          f"-> {args.output} (metadata: {metadata_path(args.output)}, provenance: {sidecar_path(args.output)})")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.opset not in OPSETS:
        raise ConfigError(f"--opset {args.opset} cannot be exported; use an ONNX opset from {OPSETS[0]} to "
                          f"{OPSETS[-1]} (default 17)")
    prepare_output_file(args.output)
    if args.output.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.output} exists; pass --overwrite to replace it")
    try:
        path = export_checkpoint(args.checkpoint, args.output, opset=args.opset, check=not args.no_check)
    except AssertionError as err:  # the onnxruntime-vs-PyTorch comparison failed
        print(f"mtanet: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``mtanet predict`` and ``mtanet export``."""
    p = subparsers.add_parser(
        "predict", help="valence/arousal, AUs and expression for every frame of an image, folder or video",
        description="Detect and align the face(s) of every frame and write one CSV row per frame (per face with "
                    "--all-faces), NaN where no face is found. Columns: book/predict_schema.md. Beside the CSV: "
                    "OUTPUT.meta.json (options, counts, status) and OUTPUT.provenance.json (checkpoint SHA-256, "
                    "detector and checksum, alignment template, AU thresholds and source, version, commit, device, "
                    "runtime, input path and size).")
    p.add_argument("input", type=Path, help="an image, a folder of images (sorted by name) or a video")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="CSV to write (+ OUTPUT.meta.json and OUTPUT.provenance.json)")
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
    p.add_argument("--columns", choices=COLUMN_STYLES, default="mtanet",
                   help="column names: mtanet (the documented schema, default), openface (AU01_c decisions, AU01_r "
                        "probabilities, face_id, confidence, success) or pyfeat (AU01 probabilities, lower-case "
                        "emotions, FaceRectX...); book/predict_schema.md has the table")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (dynamic batch)",
                              description="Write the model of CHECKPOINT as ONNX with its label names and AU "
                                          "thresholds in the metadata; checks onnxruntime against PyTorch.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {OPSETS[0]} to {OPSETS[-1]} (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)
