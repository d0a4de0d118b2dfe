"""Reading an Aff-Wild2 root (real or synthetic) into one frame table: the annotation files, the crops, the skips.

The on-disk contract is `ABAW2020.md` (in the project's shared notes): one folder of 112x112 crops per name
(`cropped_aligned/<name>/00001.jpg`), one annotation file per name, task and split
(`annotations/VA_Set/Training_Set/<name>.txt`), a header line, then one line per frame, sentinels for "no label".
Frame *i* (1-based) is line *i* after the header and image ``f"{i:05d}.jpg"``; frames without a detected face have no
jpg, so images are matched by the number in their file name, never by listing order.

Everything is read into a single pandas DataFrame with a row per (name, frame) that has an image or a label. Problems
in the input either raise :class:`DataFormatError` naming the file and line, or are skipped and counted in a
:class:`LoadReport` (the skips are documented in :data:`SKIP_KINDS`): nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from mtanet.errors import DataFormatError
from mtanet.tasks import (
    EDITIONS,
    EXPR_NAMES_2020,
    EXPR_NAMES_2022,
    LABEL_SENTINEL,
    TASKS,
    VA_NAMES,
    Edition,
)

__all__ = [
    "SPLITS",
    "IMAGE_DIR",
    "ANNOTATION_DIR",
    "SKIP_KINDS",
    "DataFormatError",
    "LoadReport",
    "detect_edition",
    "parse_annotation_text",
    "read_annotation_file",
    "image_path",
    "video_of",
    "FrameTable",
    "read_split",
    "load_frames",
    "annotation_fingerprint",
    "label_arrays",
    "decode_image_file",
]

#: The splits a root may hold. ``test`` is read from a ``Test_Set`` folder beside the others when it exists (the
#: synthetic twin writes one; the challenges' own test labels are not public, so a real root usually has none).
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_DIR = "cropped_aligned"
ANNOTATION_DIR = "annotations"

#: What a :class:`LoadReport` may count instead of raising, and why each is a skip rather than an error.
SKIP_KINDS: dict[str, str] = {
    "va_out_of_range": "a valence/arousal value outside [-1, 1] that is not the -5 sentinel; ABAW2020.md says to treat "
    "any such value as missing, so the row is unlabeled for VA",
    "images_beyond_annotations": "a jpg whose frame number is past the last annotation line; kept as an image row "
    "without labels",
    "image_folder_without_annotations": "a crop folder whose name has no annotation file in any task or split",
    "annotated_name_without_images": "a name with annotations but no crop folder; its rows are scored, never fed",
    "unexpected_file": "a file in a crop folder that is not a five-digit .jpg",
    "crlf_line_endings": "an annotation file with CRLF line endings; read correctly, counted so it can be fixed",
    "unreadable_image": "a jpg that fails to decode (truncated or not a JPEG), found with verify_images=True; the row "
    "keeps its labels for scoring but loses its image",
    "labels_masked_cross_task_leak": "a training label of a video that is in another task's validation or test split; "
    "masked unless allow_cross_task_leak=True",
    "annotation_other_suffix": "a file in a split folder whose name does not end in .txt (.csv, .TXT, .txt.bak ...); "
    "not read: rename it to <name>.txt if it holds labels",
    "annotation_hidden": "a hidden file or folder under annotations/ (a name starting with '.': .DS_Store, a macOS "
    "'._' copy, an editor's backup); never read",
    "annotation_unknown_folder": "a folder under annotations/ that is not a task or split folder of the edition (an "
    "other edition's folder, a folder inside a split folder); not read. One named like a missing task or "
    "split folder (Validaton_Set, AU_set) is an error instead",
    "annotation_stray_file": "a file directly in annotations/ or in a task folder, outside the split folders (a "
    "README); not read",
}


@dataclasses.dataclass
class LoadReport:
    """What a load skipped or noticed, by kind (see :data:`SKIP_KINDS`), with the first few places of each."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: one row per name that is in the training split of one task and the validation split of another
    cross_task_overlap: pd.DataFrame | None = None
    max_examples: int = 5

    def add(self, kind: str, where: str, count: int = 1) -> None:
        if kind not in SKIP_KINDS:
            raise KeyError(f"undocumented skip kind {kind!r}")
        self.counts[kind] += count
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(where)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": self.examples}

    def __str__(self) -> str:
        if not self.counts:
            return "load report: nothing skipped"
        lines = ["load report:"]
        for kind, n in sorted(self.counts.items()):
            lines.append(f"  {kind}: {n} (e.g. {', '.join(self.examples.get(kind, []))})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- editions


def detect_edition(root: str | os.PathLike[str]) -> Edition:
    """Tell the ABAW edition from the folder names under ``<root>/annotations`` (not from a flag).

    ``*_Challenge`` task folders mean 2022+; ``*_Set`` task folders with ``Training_Set`` mean 2020 and with
    ``Train_Set`` mean 2021. The label names of 2020 and 2021 are then confirmed from the AU headers by the reader.
    """
    ann = Path(root) / ANNOTATION_DIR
    if not ann.is_dir():
        raise DataFormatError(ann, None, "no annotations folder: is data_root an Aff-Wild2 root?")
    present = {p.name for p in ann.iterdir() if p.is_dir()}
    if any(d in present for d in EDITIONS["2022"].task_dirs.values()):
        return EDITIONS["2022"]
    set_dirs = [ann / d for d in EDITIONS["2020"].task_dirs.values() if d in present]
    if any((d / "Training_Set").is_dir() for d in set_dirs):
        return EDITIONS["2020"]
    if any((d / "Train_Set").is_dir() for d in set_dirs):
        return EDITIONS["2021"]
    raise DataFormatError(ann, None, f"cannot tell the ABAW edition from the folders {sorted(present)}")


# --------------------------------------------------------------------------------------------------- parsing

_SYNTH_MANIFEST = "synth_manifest.json"  # mtanet.synth.MANIFEST_FILE, named here: synth imports data, not the reverse
_INT_RE = re.compile(r"^-?\d+$")


def _expected_header(task: str, header: list[str], path: Path) -> tuple[str, ...]:
    if task == "va":
        if tuple(header) != VA_NAMES:
            raise DataFormatError(path, 1, f"expected header 'valence,arousal', found {','.join(header)!r}")
    elif task == "expr":
        if tuple(header) not in (EXPR_NAMES_2020, EXPR_NAMES_2022):
            raise DataFormatError(
                path, 1, f"expected header {','.join(EXPR_NAMES_2020)!r} (or with ',Other'), found {','.join(header)!r}")
    elif task == "au":
        if not header or not all(re.fullmatch(r"AU\d+", h) for h in header) or len(set(header)) != len(header):
            raise DataFormatError(path, 1, f"expected a header of AU names like 'AU1,AU2,...', found {','.join(header)!r}")
    return tuple(header)


def parse_annotation_text(text: str, task: str, path: str | os.PathLike[str] = "<string>",
                          report: LoadReport | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """Parse one annotation file's text.

    Args:
        text: the whole file, any line endings.
        task: ``"va"``, ``"au"`` or ``"expr"``.
        path: used in error messages only.
        report: where skips are counted (VA values outside [-1, 1], CRLF endings).

    Returns:
        ``(header, values)``: ``values[i]`` is frame ``i + 1``. VA gives float32 (N, 2) with NaN where unlabeled;
        AU gives int16 (N, K) with the whole row -1 where any AU is unlabeled; EXPR gives int16 (N,) with -1.

    Raises:
        DataFormatError: empty file, missing or wrong header, a wrong number of fields, a value that is not a number,
            a blank line inside the data, an AU not in {0, 1, -1}, an expression outside [-1, C-1].
    """
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if text.strip() == "":
        raise DataFormatError(path, 1, "empty file")
    if "\r\n" in text and report is not None:
        report.add("crlf_line_endings", str(path))
    lines = text.splitlines()  # handles \n, \r\n and \r alike
    while lines and lines[-1].strip() == "":  # a trailing newline or two is harmless
        lines.pop()
    header = [h.strip() for h in lines[0].split(",")]
    if all(_looks_numeric(h) for h in header):
        raise DataFormatError(path, 1, f"missing header line: the first line {lines[0]!r} is data")
    header_t = _expected_header(task, header, path)
    width = 1 if task == "expr" else len(header_t)  # EXPR lines hold one class index, the others one value per name
    rows = [line.split(",") for line in lines[1:]]
    bad_width = [i for i, r in enumerate(rows) if len(r) != width or lines[i + 1].strip() == ""]
    if bad_width:
        i = bad_width[0]
        what = "blank line" if lines[i + 1].strip() == "" else f"{len(rows[i])} fields"
        raise DataFormatError(path, i + 2, f"{what} where a {task.upper()} line needs {width} field(s)")
    n = len(rows)
    if task == "va":
        values = _to_array(rows, np.float64, path, float)
        finite = np.isfinite(values)
        if not finite.all():
            i = int(np.argwhere(~finite)[0, 0])
            raise DataFormatError(path, i + 2, f"non-finite value in {lines[i + 1]!r}")
        inside = (values >= -1.0) & (values <= 1.0)
        sentinel = values == -5.0
        strange = ~inside & ~sentinel
        if strange.any() and report is not None:
            for i in np.flatnonzero(strange.any(axis=1)):
                report.add("va_out_of_range", f"{path}:{i + 2}")
        # a frame is VA-labeled only when both dimensions are: the CCC loss needs the pair
        labeled = inside.all(axis=1)
        out = np.full((n, 2), np.nan, dtype=np.float32)
        out[labeled] = values[labeled]
        return header_t, out
    rule = ("AU labels are the integers 0, 1 or -1 (unlabeled)" if task == "au" else
            f"expression labels are the integers 0..{len(header_t) - 1} or -1 (unlabeled)")
    values = _to_array(rows, np.int64, path, _strict_int, rule)
    if task == "au":
        ok = np.isin(values, (0, 1, LABEL_SENTINEL))
        if not ok.all():
            i = int(np.argwhere(~ok)[0, 0])
            raise DataFormatError(path, i + 2, f"AU values must be 0, 1 or -1, found {lines[i + 1]!r}")
        values[(values == LABEL_SENTINEL).any(axis=1)] = LABEL_SENTINEL
        return header_t, values.astype(np.int16)
    values = values[:, 0]
    n_classes = len(header_t)
    ok = (values >= LABEL_SENTINEL) & (values < n_classes)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataFormatError(path, i + 2, f"expression must be -1 or 0..{n_classes - 1}, found {lines[i + 1]!r}")
    return header_t, values.astype(np.int16)


def _looks_numeric(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _strict_int(token: str) -> int:
    token = token.strip()
    if not _INT_RE.match(token):
        raise ValueError(token)
    return int(token)


def _to_array(rows: list[list[str]], dtype: type, path: Path, convert: Any, rule: str | None = None) -> np.ndarray:
    """``rows`` as an array; a value ``convert`` refuses is a :class:`DataFormatError` naming the line and stating
    ``rule`` (what the values must be), or saying "not a number" without one."""
    width = len(rows[0]) if rows else 1
    try:
        if convert is float:
            return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)
        return np.asarray([[convert(t) for t in r] for r in rows], dtype=dtype).reshape(len(rows), width)
    except ValueError:
        for i, r in enumerate(rows):  # slow path, only to name the line and the value
            for token in r:
                try:
                    convert(token)
                except ValueError:
                    line = ",".join(r)
                    message = f"{rule}; found {token.strip()!r} in {line!r}" if rule else f"not a number in {line!r}"
                    raise DataFormatError(path, i + 2, message) from None
        raise


def read_annotation_file(path: str | os.PathLike[str], task: str,
                         report: LoadReport | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """Read and parse one annotation file (see :func:`parse_annotation_text`)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM, which some editors add
    except UnicodeDecodeError as err:
        raise DataFormatError(path, raw[: err.start].count(b"\n") + 1, "not UTF-8 text") from None
    return parse_annotation_text(text, task, path, report)


# --------------------------------------------------------------------------------------------------- the table


def image_path(name: str, frame: int) -> str:
    """Path of a frame's crop relative to the root: ``cropped_aligned/<name>/<frame:05d>.jpg``."""
    return f"{IMAGE_DIR}/{name}/{frame:05d}.jpg"


def video_of(name: str) -> str:
    """The raw video a name comes from: ``<video>_left`` / ``<video>_right`` are two people of one video."""
    for suffix in ("_left", "_right"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_FRAME_RE = re.compile(r"^(\d{5,})\.jpg$")


def _scan_images(root: Path, report: LoadReport) -> dict[str, np.ndarray]:
    """Frame numbers that have a jpg, per name folder, from the file names (not the listing order)."""
    images: dict[str, np.ndarray] = {}
    base = root / IMAGE_DIR
    if not base.is_dir():
        return images
    with os.scandir(base) as it:
        for entry in it:
            if not entry.is_dir():
                continue
            frames = []
            with os.scandir(entry.path) as files:
                for f in files:
                    m = _FRAME_RE.match(f.name)
                    if m and int(m.group(1)) >= 1:
                        frames.append(int(m.group(1)))
                    else:
                        report.add("unexpected_file", f"{IMAGE_DIR}/{entry.name}/{f.name}")
            images[entry.name] = np.sort(np.asarray(frames, dtype=np.int64))
    return images


def _scan_annotations(root: Path, ed: Edition, split: str, report: LoadReport) -> dict[str, dict[str, dict[str, Path]]]:
    """The annotation files of every split, ``{split: {task: {name: path}}}``; everything else under annotations/
    is counted in ``report`` (see :data:`SKIP_KINDS`): the entries outside the split folders, and those inside the
    folders of ``split`` (the other split's are its own load's to count).

    Raises:
        DataFormatError: a folder named like a missing task or split folder of the edition (``Validaton_Set``,
            ``validation_set``, ``Train_Set`` in a 2020 root, ``AU_set``): read as it is, it would drop that task's
            labels of a split without a word (and, for validation, turn the cross-task leak masking off for it).
    """
    ann = root / ANNOTATION_DIR
    if not ann.is_dir():
        raise DataFormatError(ann, None, "no annotations folder: is data_root an Aff-Wild2 root?")
    files: dict[str, dict[str, dict[str, Path]]] = {s: {t: {} for t in TASKS} for s in SPLITS}
    task_of = {folder: t for t, folder in ed.task_dirs.items()}
    split_of = {folder: s for s, folder in ed.split_dirs.items()}

    def skip(kind: str, path: Path) -> None:
        report.add(kind, path.relative_to(root).as_posix())

    def outside_splits(entry: Path, known: dict[str, str]) -> bool:
        """Count ``entry`` when it is not a folder of ``known``; True when counted."""
        if entry.name.startswith("."):
            skip("annotation_hidden", entry)
        elif not entry.is_dir():
            skip("annotation_stray_file", entry)
        elif entry.name not in known:
            skip("annotation_unknown_folder", entry)
        else:
            return False
        return True

    entries = sorted(ann.iterdir())
    _refuse_misspelt(ann, entries, list(ed.task_dirs.values()), "task", ed)
    for task_dir in entries:
        if outside_splits(task_dir, task_of):
            continue
        task = task_of[task_dir.name]
        split_dirs = sorted(task_dir.iterdir())
        _refuse_misspelt(task_dir, split_dirs, list(ed.split_dirs.values()), "split", ed)
        for split_dir in split_dirs:
            if outside_splits(split_dir, split_of):
                continue
            s = split_of[split_dir.name]
            for path in sorted(split_dir.iterdir()):
                if path.name.startswith(".") or path.is_dir() or path.suffix != ".txt":
                    if s == split:
                        skip("annotation_hidden" if path.name.startswith(".") else
                             "annotation_unknown_folder" if path.is_dir() else "annotation_other_suffix", path)
                    continue
                files[s][task][path.stem] = path
    return files


def _refuse_misspelt(folder: Path, entries: list[Path], expected: list[str], kind: str, ed: Edition) -> None:
    """Raise when a sub-folder of ``folder`` is named like one of ``expected`` that is missing (case and a few
    letters aside: its closest expected name, at a :mod:`difflib` ratio of 0.6 or more)."""
    present = {e.name for e in entries}
    missing = [name for name in expected if name not in present]
    if not missing:
        return
    lowered = {name.lower(): name for name in expected}
    for entry in entries:
        if entry.name in expected or entry.name.startswith(".") or not entry.is_dir():
            continue
        close = difflib.get_close_matches(entry.name.lower(), list(lowered), n=1, cutoff=0.6)
        if close and lowered[close[0]] in missing:
            meant = lowered[close[0]]
            raise DataFormatError(entry, None, f"not a {kind} folder of the ABAW {ed.name} layout, which expects "
                                               f"{', '.join(expected)}; {folder.name} has no {meant}, whose labels "
                                               f"would be lost: rename {entry.name} to {meant} (or move it out of "
                                               f"{ANNOTATION_DIR}/)")


@dataclasses.dataclass
class FrameTable:
    """The frame table of one split with what it was read with."""

    frames: pd.DataFrame
    edition: Edition
    report: LoadReport
    root: Path


def read_split(root: str | os.PathLike[str], split: str, *, edition: str | Edition | None = None,
               allow_cross_task_leak: bool = False, verify_images: bool = False) -> FrameTable:
    """Read one split of an Aff-Wild2 root into a :class:`FrameTable`. See :func:`load_frames`."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if edition is None:
        ed = detect_edition(root)
    elif isinstance(edition, Edition):
        ed = edition
    else:
        ed = EDITIONS[str(edition)]
    report = LoadReport()

    # Which names each task has in each split: task membership is per file, not per video.
    files = _scan_annotations(root, ed, split, report)
    names = sorted(set().union(*(files[split][t].keys() for t in TASKS)))

    # Cross-task overlap: a video in one task's validation or test split and another task's training split.
    val_videos = {t: {video_of(n) for s in SPLITS if s != "train" for n in files[s][t]} for t in TASKS}
    any_val = set().union(*val_videos.values())
    overlap_rows = []
    for t in TASKS:
        for n in files["train"][t]:
            if video_of(n) in any_val:
                overlap_rows.append({"name": n, "train_task": t,
                                     "val_tasks": ",".join(v for v in TASKS if video_of(n) in val_videos[v])})
    report.cross_task_overlap = pd.DataFrame(overlap_rows, columns=["name", "train_task", "val_tasks"])
    masked = set()
    if split == "train" and not allow_cross_task_leak:
        masked = {(r["name"], r["train_task"]) for r in overlap_rows}

    images = _scan_images(root, report)
    annotated_anywhere = set().union(*(files[s][t].keys() for s in SPLITS for t in TASKS))
    for n in sorted(set(images) - annotated_anywhere):
        report.add("image_folder_without_annotations", f"{IMAGE_DIR}/{n}")

    au_names: tuple[str, ...] | None = None
    expr_names: tuple[str, ...] | None = None
    pieces = []
    for name in names:
        labels: dict[str, np.ndarray] = {}
        lengths = [0]
        for t in TASKS:
            path = files[split][t].get(name)
            if path is None:
                continue
            header, values = read_annotation_file(path, t, report)
            if t == "au":
                if au_names is None:
                    au_names, au_first = header, path
                elif header != au_names:
                    _header_mismatch("AU", header, path, au_names, au_first, ed.au_names, ed.name)
            if t == "expr":
                if expr_names is None:
                    expr_names, expr_first = header, path
                elif header != expr_names:
                    _header_mismatch("expression", header, path, expr_names, expr_first, ed.expr_names, ed.name)
            lengths.append(len(values))  # masked files still say how long the video is
            if (name, t) in masked:
                report.add("labels_masked_cross_task_leak", f"{name} ({t})", count=int(_count_labeled(t, values)))
                continue
            labels[t] = values
        n_rows = max(lengths)
        frames_with_image = images.get(name)
        if frames_with_image is None:
            report.add("annotated_name_without_images", name)
            frames_with_image = np.zeros(0, dtype=np.int64)
        beyond = frames_with_image[frames_with_image > n_rows]
        if beyond.size:
            report.add("images_beyond_annotations", f"{IMAGE_DIR}/{name} ({beyond.size} images past line {n_rows + 1})",
                       count=int(beyond.size))
        n_total = max(n_rows, int(frames_with_image.max()) if frames_with_image.size else 0)
        pieces.append((name, n_total, labels, frames_with_image,
                       {t: t in files[split] and name in files[split][t] for t in TASKS},
                       {t: next((s for s in SPLITS if s != split and name in files[s][t]), "") for t in TASKS}))

    au_names = au_names or ed.au_names
    expr_names = expr_names or ed.expr_names
    if au_names != ed.au_names or expr_names != ed.expr_names:
        # The headers are the truth (ABAW2020.md: read names from the header line); pick the matching edition.
        match = [e for e in EDITIONS.values() if e.au_names == au_names and e.expr_names == expr_names
                 and e.task_dirs == ed.task_dirs]
        ed = match[0] if match else dataclasses.replace(ed, name=f"{ed.name}-custom", au_names=au_names,
                                                         expr_names=expr_names)

    frames = _assemble(pieces, split, ed)
    if verify_images:
        frames = _verify_images(frames, root, report)
    frames.attrs["edition"] = ed.name
    frames.attrs["split"] = split
    frames.attrs["load_report"] = report.to_dict()
    return FrameTable(frames=frames, edition=ed, report=report, root=root)


def annotation_fingerprint(root: str | os.PathLike[str], *, edition: str | Edition | None = None) -> str:
    """SHA-256 of the annotation files training reads under ``root`` (train and validation; never the test split,
    whose labels must not reach training or selection): each file's path relative to ``root``, size and content
    digest, in path order.

    Two roots have the same fingerprint exactly when they hold the same labels in the same files, wherever they lie:
    a moved or copied root keeps it, an edited, added or removed annotation file changes it. The images are not part
    of it (see :func:`mtanet.data.packed_cache_key` for those), except on the synthetic twin, whose manifest's
    generator version, size and seed join the digest: a new generator draws new images over the same labels, and a run
    trained on the old ones must not be resumed or reused as if nothing changed.
    """
    root = Path(root)
    if edition is None:
        ed = detect_edition(root)
    else:
        ed = edition if isinstance(edition, Edition) else EDITIONS[str(edition)]
    files = _scan_annotations(root, ed, SPLITS[0], LoadReport())
    digest = hashlib.sha256()
    for path in sorted(p for s in ("train", "val") for t in TASKS for p in files[s][t].values()):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode() + hashlib.sha256(data).digest())
    manifest = root / _SYNTH_MANIFEST
    if manifest.is_file():
        try:
            made = json.loads(manifest.read_text())
            drawn_by = {k: made[k] for k in ("generator_version", "size", "seed")}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(manifest, None, f"not a synthetic-twin manifest ({exc}); regenerate the twin or "
                                                  "remove the file") from None
        digest.update(json.dumps(drawn_by, sort_keys=True).encode())
    return digest.hexdigest()


def _header_mismatch(kind: str, header: tuple[str, ...], path: Path, first: tuple[str, ...], first_path: Path,
                     expected: tuple[str, ...], edition: str) -> None:
    """Raise the :class:`DataFormatError` of two files of one task with different headers, naming the file that is
    wrong: the one whose header is not the edition's (the folders tell the edition), else the later one."""
    if header == expected:  # the first file read is the odd one
        raise DataFormatError(first_path, 1, f"{kind} header {','.join(first)!r} is not the ABAW {edition} header "
                                             f"{','.join(expected)!r} that {path} has; every {kind} file of a root "
                                             "needs the same header")
    raise DataFormatError(path, 1, f"{kind} header {','.join(header)!r} differs from {','.join(first)!r} of "
                                   f"{first_path}; every {kind} file of a root needs the same header")


def _count_labeled(task: str, values: np.ndarray) -> int:
    if task == "va":
        return int(np.isfinite(values).all(axis=1).sum())
    if task == "au":
        return int((values[:, 0] != LABEL_SENTINEL).sum())
    return int((values != LABEL_SENTINEL).sum())


def _assemble(pieces: list, split: str, ed: Edition) -> pd.DataFrame:
    """Concatenate per-name arrays into one DataFrame in a single pass (fast for millions of frames)."""
    n_au = len(ed.au_names)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("name", "frame", "has_image", "valence", "arousal",
                                                          "expression", "au", "split_va", "split_au", "split_expr")}
    for name, n_total, labels, with_image, in_split, in_other in pieces:
        frame = np.arange(1, n_total + 1, dtype=np.int32)
        has_image = np.zeros(n_total, dtype=bool)
        has_image[with_image - 1] = True
        va = np.full((n_total, 2), np.nan, dtype=np.float32)
        au = np.full((n_total, n_au), LABEL_SENTINEL, dtype=np.int16)
        expr = np.full(n_total, LABEL_SENTINEL, dtype=np.int16)
        if "va" in labels:
            va[: len(labels["va"])] = labels["va"]
        if "au" in labels:
            au[: len(labels["au"])] = labels["au"]
        if "expr" in labels:
            expr[: len(labels["expr"])] = labels["expr"]
        keep = has_image | np.isfinite(va).all(axis=1) | (au[:, 0] != LABEL_SENTINEL) | (expr != LABEL_SENTINEL)
        cols["name"].append(np.full(int(keep.sum()), name, dtype=object))
        for key, arr in (("frame", frame), ("has_image", has_image), ("expression", expr), ("au", au)):
            cols[key].append(arr[keep])
        cols["valence"].append(va[keep, 0])
        cols["arousal"].append(va[keep, 1])
        for t in TASKS:
            tag = split if in_split[t] else in_other[t]
            cols[f"split_{t}"].append(np.full(int(keep.sum()), tag, dtype=object))

    def cat(key: str, dtype: Any, shape: tuple = ()) -> np.ndarray:
        return np.concatenate(cols[key]) if cols[key] else np.zeros((0, *shape), dtype=dtype)

    name = cat("name", object)
    frame = cat("frame", np.int32)
    has_image = cat("has_image", bool)
    df = pd.DataFrame({
        "name": name,
        "video": [video_of(n) for n in name] if len(name) else np.zeros(0, dtype=object),
        "frame": frame,
        "image": np.where(has_image, [image_path(n, int(f)) for n, f in zip(name, frame)] if len(name) else [], ""),
        "split_va": cat("split_va", object),
        "split_au": cat("split_au", object),
        "split_expr": cat("split_expr", object),
        "valence": cat("valence", np.float32),
        "arousal": cat("arousal", np.float32),
        "expression": cat("expression", np.int16),
    })
    au = cat("au", np.int16, (n_au,))
    for j, au_name in enumerate(ed.au_names):
        df[au_name] = au[:, j] if len(au) else np.zeros(0, dtype=np.int16)
    return df


def _verify_images(frames: pd.DataFrame, root: Path, report: LoadReport) -> pd.DataFrame:
    bad = []
    for i, rel in zip(frames.index, frames["image"]):
        if rel and not _decodes(root / rel):
            report.add("unreadable_image", rel)
            bad.append(i)
    if bad:
        frames = frames.copy()
        frames.loc[bad, "image"] = ""
    return frames


def _decodes(path: Path) -> bool:
    try:
        decode_image_file(path)
    except DataFormatError:
        return False
    return True


def load_frames(root: str | os.PathLike[str], split: str, *, edition: str | Edition | None = None,
                allow_cross_task_leak: bool = False, verify_images: bool = False) -> pd.DataFrame:
    """One table, a row per (name, frame) that has an image or a label, for one split of every task.

    Args:
        root: an Aff-Wild2 root (``cropped_aligned/`` and ``annotations/``), real or written by :mod:`mtanet.synth`.
        split: ``"train"``, ``"val"`` or ``"test"``; each task's own split folder is read (``Training_Set``/``Train_Set``,
            ``Validation_Set``, ``Test_Set``; a missing ``Test_Set`` gives an empty table).
        edition: ``"2020"``, ``"2021"``, ``"2022"``; by default detected from the folder names and headers.
        allow_cross_task_leak: keep training labels of videos that are in another task's validation or test split (off by
            default: they are masked and counted, so no validation video is ever trained on).
        verify_images: decode every jpg once; unreadable ones lose their image (counted), keep their labels.

    Returns:
        A DataFrame with columns ``name``, ``video``, ``frame`` (1-based), ``image`` (path relative to ``root``, ``""``
        where the jpg is missing), ``split_va``/``split_au``/``split_expr`` (the split of that task's file for this
        name: ``split``, another split, or ``""``), ``valence``, ``arousal`` (NaN unlabeled), ``expression`` (-1
        unlabeled) and one int column per AU named as in the header (-1 unlabeled). ``df.attrs`` holds the edition,
        the split and the load report.
    """
    return read_split(root, split, edition=edition, allow_cross_task_leak=allow_cross_task_leak,
                      verify_images=verify_images).frames


# --------------------------------------------------------------------------------------------------- labels as arrays


def label_arrays(frames: pd.DataFrame, au_names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Targets and masks per task as numpy arrays aligned with ``frames`` (tasks as data)."""
    va = frames[["valence", "arousal"]].to_numpy(np.float32)
    au = frames[list(au_names)].to_numpy(np.float32)
    expr = frames["expression"].to_numpy(np.int64)
    targets = {"va": np.nan_to_num(va, nan=0.0), "au": np.clip(au, 0, 1), "expr": np.clip(expr, 0, None)}
    masks = {"va": np.isfinite(va).all(axis=1), "au": (au >= 0).all(axis=1), "expr": expr >= 0}
    return targets, masks


# --------------------------------------------------------------------------------------------------- images


def decode_image_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode one jpg to a (3, H, W) uint8 tensor, or raise :class:`DataFormatError` naming the file.

    It lives with the reader (not with :class:`mtanet.data.FrameDataset`, its main user) because ``verify_images``
    decodes every jpg while reading the table.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFormatError(path, None, f"cannot read image: {err.strerror}") from None
    if not data:
        raise DataFormatError(path, None, "empty image file")
    try:
        # decode_jpeg is about 2x faster than PIL here and raises on truncated files instead of padding them.
        # torchvision 0.29 marks its codecs deprecated in favour of TorchCodec, which needs FFmpeg; until that is a
        # plain pip dependency we keep the faster decoder and silence the notice.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DataFormatError(path, None, f"unreadable or truncated JPEG ({str(err).splitlines()[-1][:80]})") from None
