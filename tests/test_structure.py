"""The package's layout: every import points one way (issue 12).

The graph is read with :mod:`ast` from the sources, so imports inside functions count as much as those at the top:
a cycle hidden in a function body still fails. Layers, from the bottom: vocabulary (tasks, errors, runtime), the
leaves (data, models, losses, metrics), what composes them (synth, evaluate, inference), training, then the command
line and the book kit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtanet"

#: The layer of each top-level part of the package; an import may only point to the same layer or a lower one.
LAYERS: dict[str, int] = {
    "mtanet": 0, "tasks": 0, "errors": 0, "runtime": 0,
    "data": 1, "models": 1, "losses": 1, "metrics": 1, "stats": 1,
    "synth": 2, "evaluate": 2, "inference": 2, "provenance": 2,
    "train": 3,
    "cli": 4, "book": 4, "sweep": 4,
}
CORE = {"data", "models", "losses", "metrics", "synth", "evaluate", "inference", "train"}
BOOK_KIT = {"book", "sweep"}
#: The command lines: the only modules allowed to import argparse.
COMMAND_LINES = ("mtanet.cli", "mtanet.book.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of the file, resolved to modules of the package
    (``from mtanet.data import load_frames`` is an import of ``mtanet.data``; ``from mtanet import data`` of
    ``mtanet.data``), and the standard library's names as they are."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.append((child if child in known else base, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {target for target, _ in imports(name, path, known) if target in known and target != name}
            for name, path in mods.items()}


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "mtanet"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_cycles_and_imports_inside_functions(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    source = tmp_path / "predictor.py"
    source.write_text("import argparse\n\ndef f():\n    from mtanet.train import train\n"
                      "    from mtanet import evaluate\n    from .sources import FrameSource\n")
    known = {"mtanet.train", "mtanet.evaluate", "mtanet.inference.sources"}
    assert [t for t, _ in imports("mtanet.inference.predictor", source, known)] == [
        "argparse", "mtanet.train", "mtanet.evaluate", "mtanet.inference.sources"]


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {part(m) for m in modules()} <= set(LAYERS), sorted({part(m) for m in modules()} - set(LAYERS))


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down() -> None:
    wrong = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
             if LAYERS[part(b)] > LAYERS[part(a)]]
    assert not wrong, "imports that point up a layer:\n" + "\n".join(sorted(wrong))


def test_inference_never_imports_training_and_the_core_never_the_book_kit() -> None:
    edges = graph()
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if (part(a) == "inference" and part(b) == "train") or (part(a) in CORE and part(b) in BOOK_KIT)]
    assert not bad, "\n".join(sorted(bad))


def test_argparse_only_in_the_command_lines() -> None:
    mods = modules()
    users = sorted(name for name, path in mods.items()
                   if any(target == "argparse" for target, _ in imports(name, path, set(mods))))
    assert users, "the command line imports argparse: the check must see it"
    outside = [u for u in users if not u.startswith(COMMAND_LINES)]
    assert not outside, f"argparse outside the command line: {outside}"


def test_nothing_imports_a_notebook() -> None:
    notebooks = {p.stem for p in (PACKAGE.parent / "notebooks").glob("[0-9][0-9]_*.py")}
    mods = modules()
    bad = [(name, target) for name, path in mods.items() for target, _ in imports(name, path, set(mods))
           if target.split(".")[-1] in notebooks or target.startswith("notebooks")]
    assert not bad, bad


def test_each_error_class_is_defined_once() -> None:
    defined: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (node.name.endswith(("Error", "Failed", "Conflict", "NotFound"))):
                defined.setdefault(node.name, []).append(name)
    assert all(where == ["mtanet.errors"] for where in defined.values()), defined


@pytest.mark.parametrize("name", ["resolve_device", "usable_cores", "project_root", "json_clean", "cpu_model"])
def test_each_shared_helper_is_defined_once(name: str) -> None:
    where = [m for m, path in modules().items() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == name]
    assert where == ["mtanet.runtime"], where


def test_the_architecture_chapter_describes_these_layers() -> None:
    from mtanet.book.layout import LAYERS as CHAPTER_LAYERS
    from mtanet.book.layout import modules_table

    chapter = {part: rank for rank, parts in enumerate(CHAPTER_LAYERS.values()) for part in parts}
    assert chapter == {part: rank for part, rank in LAYERS.items() if part != "mtanet"}
    table = modules_table()
    assert len(table) == len([p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE])
    assert (table["summary"] != "").all(), "every module says what it is for in its docstring"
