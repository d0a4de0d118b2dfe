"""Column names that line up with the tools people already use: OpenFace and Py-Feat.

``mtanet predict --columns openface|pyfeat`` renames the columns of the documented schema
(``book/predict_schema.md``, style ``"mtanet"``) so that a predictions CSV can be joined with, or compared to, those
tools' files without renaming by hand. The values are the same; only names change, plus two conveniences each tool's
users expect: OpenFace's ``success`` (1 when a face was found, else 0) and Py-Feat's lower-case emotion name in
``emotion``. The table of every mapping is in ``book/predict_schema.md`` ("Column styles").

- **openface**: ``AU01_c`` (the 0/1 decision, OpenFace's presence column) and ``AU01_r`` (the probability in
  [0, 1]; OpenFace's ``_r`` is an intensity on 0-5, so compare ranks or thresholds, not values), ``face_id``,
  ``confidence``, ``success``; the face box and expression columns keep their names (OpenFace has none for them).
- **pyfeat**: ``AU01`` (the probability, as Py-Feat's detectors give), ``AU01_present`` (the decision),
  ``neutral``, ``anger``, ... (expression probabilities in lower case), ``emotion`` (the most probable one, lower
  case), ``FaceRectX``, ``FaceRectY``, ``FaceRectWidth``, ``FaceRectHeight``, ``FaceScore``, ``input`` (the file).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mtanet.errors import ConfigError

__all__ = ["COLUMN_STYLES", "DEFAULT_COLUMN_STYLE", "column_map", "styled_columns", "styled_row"]

#: The column styles of ``mtanet predict --columns``: the documented schema, OpenFace's names, Py-Feat's names.
COLUMN_STYLES: tuple[str, ...] = ("mtanet", "openface", "pyfeat")
DEFAULT_COLUMN_STYLE = "mtanet"

_AU_RE = re.compile(r"^AU(\d+)$")
_OPENFACE_FIXED = {"face": "face_id", "face_score": "confidence"}
_PYFEAT_FIXED = {"file": "input", "face_x": "FaceRectX", "face_y": "FaceRectY", "face_w": "FaceRectWidth",
                 "face_h": "FaceRectHeight", "face_score": "FaceScore", "expression": "emotion"}


def _padded(au: str) -> str | None:
    """``AU1`` -> ``AU01`` (OpenFace and Py-Feat pad AU numbers to two digits); ``None`` for a non-AU name."""
    m = _AU_RE.match(au)
    return f"AU{int(m.group(1)):02d}" if m else None


def _check(style: str) -> None:
    if style not in COLUMN_STYLES:
        raise ConfigError(f"columns style must be one of {', '.join(COLUMN_STYLES)}, got {style!r} (CLI --columns)")


def column_map(columns: Sequence[str], style: str, au_names: Sequence[str] = (),
               expr_names: Sequence[str] = ()) -> dict[str, str]:
    """``{schema column: styled column}`` for every column of ``columns`` (unchanged names map to themselves).

    Args:
        columns: the schema's columns (:meth:`mtanet.inference.Predictor.columns`).
        style: one of :data:`COLUMN_STYLES`.
        au_names, expr_names: the model's label names, so ``AU1`` is known to be an AU decision column and
            ``Happiness_prob`` an expression probability.

    Raises:
        ConfigError: an unknown style, or two columns that would get one name.
    """
    _check(style)
    aus, exprs = set(au_names), set(expr_names)
    out: dict[str, str] = {}
    for col in columns:
        new = col
        if style == "openface":
            if col in aus and _padded(col):
                new = f"{_padded(col)}_c"
            elif col.endswith("_prob") and col[:-5] in aus and _padded(col[:-5]):
                new = f"{_padded(col[:-5])}_r"
            else:
                new = _OPENFACE_FIXED.get(col, col)
        elif style == "pyfeat":
            if col in aus and _padded(col):
                new = f"{_padded(col)}_present"
            elif col.endswith("_prob") and col[:-5] in aus and _padded(col[:-5]):
                new = _padded(col[:-5])
            elif col.endswith("_prob") and col[:-5] in exprs:
                new = col[:-5].lower()
            else:
                new = _PYFEAT_FIXED.get(col, col)
        out[col] = new
    seen: dict[str, str] = {}
    for old, new in out.items():
        if new in seen:
            raise ConfigError(f"columns style {style}: {seen[new]!r} and {old!r} would both be named {new!r}")
        seen[new] = old
    return out


def styled_columns(columns: Sequence[str], style: str, au_names: Sequence[str] = (),
                   expr_names: Sequence[str] = ()) -> list[str]:
    """The header of a CSV in ``style``: the renamed columns, with OpenFace's ``success`` after ``status``."""
    mapping = column_map(columns, style, au_names, expr_names)
    out = []
    for col in columns:
        out.append(mapping[col])
        if style == "openface" and col == "status":
            out.append("success")
    return out


def styled_row(row: Mapping[str, Any], style: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    """One row under the names of ``mapping`` (from :func:`column_map`), with the style's derived values:
    OpenFace's ``success`` (1 for status ``ok``, else 0), Py-Feat's lower-case ``emotion``."""
    out = {mapping.get(k, k): v for k, v in row.items()}
    if style == "openface" and "status" in row:
        out["success"] = int(row["status"] == "ok")
    if style == "pyfeat" and isinstance(row.get("expression"), str):
        out["emotion"] = row["expression"].lower()
    return out
