"""Streamed prediction: an input's rows written to a CSV batch by batch, with a ``<output>.meta.json`` beside it.

Frames are decoded one at a time (PyAV for videos), batched through the model, and each batch's rows are written
and flushed before the next is read, so memory does not grow with the video and a crash keeps every row written so
far. The metadata file records the model, the AU thresholds and where they came from, the options, and ``status``
(``running`` until the end, then ``complete`` or ``failed``). Columns and keys: ``book/predict_schema.md``.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mtanet.inference.predictor import STATUS_NO_FACE, STATUS_UNREADABLE, as_predictor
from mtanet.inference.sources import FrameSource
from mtanet.runtime import write_json

__all__ = ["metadata_path", "predict_to_csv"]


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return str(value)


def metadata_path(output: str | os.PathLike) -> Path:
    """Where :func:`predict_to_csv` writes the metadata of ``output``: ``<output>.meta.json``."""
    return Path(str(output) + ".meta.json")


def predict_to_csv(input: str | os.PathLike, output: str | os.PathLike, model: Any = None, *, every: int = 1,
                   batch_size: int = 16, smooth: int | None = None, overwrite: bool = False,
                   progress: bool = False, **options: Any) -> dict[str, Any]:
    """Stream predictions for ``input`` into the CSV ``output``; returns the final metadata.

    Same arguments as :func:`mtanet.inference.predictor.predict`. Rows are written and flushed after every batch
    (with ``smooth=K``, rows leave ``K // 2`` frames late); memory stays constant whatever the video's length.
    ``<output>.meta.json`` records what produced the rows and ``status``: ``running`` while writing, ``complete`` at
    the end, ``failed`` (with the error) when an exception stops the run, in which case every row already written
    stays in the CSV (and a smoothing buffer is flushed first). An existing ``output`` raises
    :class:`FileExistsError` unless ``overwrite``. The metadata is strict JSON (a value that is not a finite number,
    such as the frame rate of a video that does not state one, is ``null``), written atomically.
    """
    output = Path(output)
    meta_path = metadata_path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (CLI --overwrite) to replace it")
    source = FrameSource(input, every=every)  # a missing or unreadable input fails before the model loads
    try:
        predictor = as_predictor(model, options)
        smoother = predictor.smoother(smooth)
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
    write_json(meta_path, meta)

    bar = tqdm(total=source.estimated_frames(), unit="frame", file=sys.stderr, disable=None) if progress else None

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
        write_json(meta_path, meta)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    meta.update(counts, status="complete", errors=source.errors, truncated=source.truncated,
                elapsed_s=round(elapsed, 3), frames_per_s=round(counts["frames_read"] / max(elapsed, 1e-9), 2))
    write_json(meta_path, meta)
    return meta
