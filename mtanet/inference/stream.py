"""Streamed prediction: an input's rows written to a CSV batch by batch, with a ``<output>.meta.json`` and a
``<output>.provenance.json`` beside it.

Frames are decoded one at a time (PyAV for videos), batched through the model, and each batch's rows are written
and flushed before the next is read, so memory does not grow with the video and a crash keeps every complete row
written so far. The metadata file records the model, the AU thresholds and where they came from, the options, and
``status`` (``running`` until the end, then ``complete`` or ``failed``). Columns and keys:
``book/predict_schema.md``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mtanet.errors import ConfigError, OutputExistsError
from mtanet.inference.naming import COLUMN_STYLES, DEFAULT_COLUMN_STYLE, column_map, styled_columns, styled_row
from mtanet.inference.predictor import STATUS_NO_FACE, STATUS_UNREADABLE, as_predictor
from mtanet.inference.sources import FrameSource
from mtanet.provenance import sidecar_path, write_sidecar
from mtanet.runtime import prepare_output_file, write_json

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
                   progress: bool = False, column_style: str = DEFAULT_COLUMN_STYLE,
                   **options: Any) -> dict[str, Any]:
    """Stream predictions for ``input`` into the CSV ``output``; returns the final metadata.

    Same arguments as :func:`mtanet.inference.predictor.predict`; ``column_style`` (CLI ``--columns``) names the
    columns as the documented schema (``"mtanet"``), OpenFace (``"openface"``) or Py-Feat (``"pyfeat"``) do
    (:mod:`mtanet.inference.naming`). Beside the CSV, ``<output>.provenance.json``
    (:func:`mtanet.provenance.sidecar_path`) says what produced the rows (:meth:`Predictor.provenance`): written
    atomically before the first row, removed with the CSV when a run leaves no row.

    Rows are written and flushed after every batch (with ``smooth=K``, rows leave ``K // 2`` frames late); memory
    stays constant whatever the video's length.
    ``<output>.meta.json`` records what produced the rows and ``status``: ``running`` while writing, ``complete`` at
    the end, ``failed`` (with the error) when an exception stops the run. After a failure the CSV holds complete rows
    only: every row already written stays (a smoothing buffer is flushed first) and a row cut off half-way (a full
    disk) is removed. A run that fails before its first row leaves neither the CSV nor the metadata, so nothing
    blocks the retry. The metadata is strict JSON (a value that is not a finite number, such as the frame rate of a
    video that does not state one, is ``null``), written atomically.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false (also a :class:`FileExistsError`), or it is
            a folder, or a part of its path is a file.
        OSError: a file-system error while writing (a full disk, no permission), naming the file.
    """
    output = Path(output)
    meta_path = metadata_path(output)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size} (CLI --batch-size)")
    if column_style not in COLUMN_STYLES:
        raise ConfigError(f"column_style must be one of {', '.join(COLUMN_STYLES)}, got {column_style!r} (CLI "
                          "--columns)")
    source = FrameSource(input, every=every)  # a missing or unreadable input fails before the model loads
    try:
        prepare_output_file(output)  # and so does an output that cannot be written
        if output.exists() and not overwrite:
            raise OutputExistsError(f"{output} exists{_previous_run(meta_path)}; pass overwrite=True (CLI "
                                    "--overwrite) to replace it")
        predictor = as_predictor(model, options)
        smoother = predictor.smoother(smooth)
    except BaseException:
        source.close()
        raise
    schema_columns = predictor.columns(with_file=source.kind != "video")
    try:
        mapping = column_map(schema_columns, column_style, predictor.au_names, predictor.expr_names)
    except BaseException:
        source.close()
        raise
    columns = styled_columns(schema_columns, column_style, predictor.au_names, predictor.expr_names)
    started = time.perf_counter()
    prov_path = sidecar_path(output)
    meta = {**predictor.metadata(), "input": str(input), "input_kind": source.kind, "source": source.info,
            "output": str(output), "every": every, "batch_size": batch_size, "smooth": smooth, "columns": columns,
            "column_style": column_style, "provenance_file": prov_path.name,
            "status": "running", "rows_written": 0, "frames_read": 0}
    counts = {"rows_written": 0, "frames_read": 0, "frames_no_face": 0, "frames_unreadable": 0}
    try:
        write_sidecar(output, predictor.provenance(input))
        write_json(meta_path, meta)
    except BaseException:
        source.close()
        with contextlib.suppress(OSError):
            prov_path.unlink(missing_ok=True)
        raise

    bar = tqdm(total=source.estimated_frames(), unit="frame", file=sys.stderr, disable=None) if progress else None
    complete: list[int] = []  # bytes of the CSV that hold complete rows (the header included), once it is open

    def write(f, writer, rows: list[dict[str, Any]]) -> None:
        with _naming(output):
            for row in rows:
                if column_style != DEFAULT_COLUMN_STYLE:
                    row = styled_row(row, column_style, mapping)
                writer.writerow([_format(row.get(c)) for c in columns])
            f.flush()
        counts["rows_written"] += len(rows)
        complete[0] = f.tell()

    try:
        with source, open(output, "w", newline="") as f:
            complete.append(0)
            writer = csv.writer(f)
            with _naming(output):
                writer.writerow(columns)
                f.flush()
            complete[0] = f.tell()
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
                with _naming(output):
                    os.fsync(f.fileno())
    except BaseException as err:
        meta.update(counts, status="failed", error=f"{type(err).__name__}: {err}", errors=source.errors,
                    truncated=source.truncated, elapsed_s=round(time.perf_counter() - started, 3))
        _after_failure(output, meta_path, meta, complete[0] if complete else None)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    meta.update(counts, status="complete", errors=source.errors, truncated=source.truncated,
                elapsed_s=round(elapsed, 3), frames_per_s=round(counts["frames_read"] / max(elapsed, 1e-9), 2))
    try:
        write_json(meta_path, meta)
    except BaseException:
        with contextlib.suppress(OSError):  # rather no metadata than one that still says "running"
            meta_path.unlink(missing_ok=True)
        raise
    return meta


def _previous_run(meta_path: Path) -> str:
    """What an existing output holds, from its metadata: the note of a run that failed or did not finish."""
    try:
        meta = json.loads(meta_path.read_text())
        status, rows = meta["status"], meta["rows_written"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if status == "failed":
        return f" (the {rows} rows of a failed run: {meta.get('error', 'see ' + meta_path.name)})"
    if status == "running":
        return f" (the rows of a run that did not finish, or is still running: {meta_path.name} says running)"
    return ""


@contextlib.contextmanager
def _naming(output: Path):
    """An :class:`OSError` without a file name (a full disk while writing) raised naming ``output``."""
    try:
        yield
    except OSError as err:
        if err.errno is None or err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(output)) from err


def _after_failure(output: Path, meta_path: Path, meta: dict[str, Any], complete: int | None) -> None:
    """Leave complete rows with a ``failed`` metadata file, or nothing at all.

    ``complete``: the bytes of the CSV that hold complete rows, ``None`` when the CSV was never opened (then it is
    not ours to touch). Without a single row there is nothing worth keeping, and when the failure cannot be recorded
    (the disk is full) a metadata file saying ``running`` and rows that look complete would mislead: both are
    removed.
    """
    ours = [output, meta_path, sidecar_path(output)] if complete is not None else [meta_path, sidecar_path(output)]
    if complete is not None and meta["rows_written"] > 0:
        try:
            os.truncate(output, complete)  # a row cut off by the failure
            write_json(meta_path, meta)
            return
        except OSError:
            pass
    for path in ours:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
