"""The package's own layout, for the architecture chapter: each module, its layer, its size and its first line."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd

import mtanet

__all__ = ["LAYERS", "modules_table"]

#: The layers of the package, bottom first: a module imports only from its own layer or the ones above it in this
#: list (``tests/test_structure.py`` checks it on every import statement).
LAYERS: dict[str, tuple[str, ...]] = {
    "1 vocabulary": ("tasks", "errors", "runtime"),
    "2 leaves": ("data", "models", "losses", "metrics", "stats"),
    "3 composed": ("synth", "evaluate", "inference", "provenance"),
    "4 training": ("train",),
    "5 entry points": ("cli", "book", "sweep"),
}


def modules_table(package: Path | None = None) -> pd.DataFrame:
    """One row per module of the package: ``layer``, ``part``, ``module``, ``lines`` and ``summary`` (the first
    sentence of its docstring), in layer order."""
    package = package or Path(mtanet.__file__).parent
    layer_of = {part: layer for layer, parts in LAYERS.items() for part in parts}
    rows = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        rows.append({"layer": layer_of.get(part, "?"), "part": part, "module": str(rel),
                     "lines": len(text.splitlines()), "summary": doc.split("\n\n")[0].replace("\n", " ")})
    return pd.DataFrame(rows).sort_values(["layer", "part", "module"], kind="stable").reset_index(drop=True)
