"""Build the book: py:percent notebooks -> papermill (per-profile parameters) -> Jupyter Book HTML.

``python -m mtanet.book --profile cpu`` (:mod:`mtanet.book.__main__`) is what ``make book`` runs. Steps:

1. Each ``notebooks/NN_name.py`` is read with jupytext and executed by papermill with the parameters in
   ``notebooks/params/NN_name/<profile>.yaml``, with an explicit kernel and the notebooks folder as working directory
   (as in JupyterLab). Outputs go to ``<build>/src/book/chapters/``, never beside the paired notebooks.
2. The book sources (``_config.yml``, ``_toc.yml``, ``book/``) are staged next to the executed chapters, and Jupyter
   Book renders them with execution off and warnings as errors.

A failing cell stops the build with the notebook's name, the cell's number and its first line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mtanet.errors import NotebookFailed, OutputExistsError
from mtanet.runtime import project_root, work_root, write_json

__all__ = [
    "CELL_TIMEOUT_S",
    "KERNEL_NAME",
    "PROFILES",
    "build",
    "execute",
    "notebooks",
    "parameters_for",
    "record_run",
    "recorded_run",
    "render_html",
    "stage_sources",
    "toc_chapters",
]

PROFILES: tuple[str, ...] = ("smoke", "cpu", "gpu")
KERNEL_NAME = "mtanet"


def notebooks(root: Path | None = None) -> list[Path]:
    """The chapter sources, in book order (their ``NN_`` prefix)."""
    root = root or project_root()
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.py"))


def parameters_for(notebook: Path, profile: str) -> dict[str, Any]:
    """The profile's parameters for one notebook (``notebooks/params/<stem>/<profile>.yaml``)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    path = notebook.parent / "params" / notebook.stem / f"{profile}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no parameters for profile {profile!r}")
    return yaml.safe_load(path.read_text()) or {}


def toc_chapters(root: Path) -> list[str]:
    """The chapter files that ``_toc.yml`` lists under ``book/chapters/``, in order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(str(node["file"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    return [Path(f).name for f in files if f.startswith("book/chapters/")]


def _kernel_manager_logging_to(path: Path):
    """A kernel manager whose kernel writes its process-level stderr (start-up and shut-down chatter, crashes of
    native code) to ``path`` instead of inheriting ours; cell output still reaches the notebook."""
    from jupyter_client.manager import AsyncKernelManager  # here: the notebooks import this package, not Jupyter

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(path, "ab") as log:  # the child keeps its own copy of the descriptor
                kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


def execute(notebook: Path, output: Path, parameters: dict[str, Any], *, kernel: str = KERNEL_NAME,
            timeout: int | None = None, drop_tags: tuple[str, ...] = (), kernel_log: Path | None = None) -> float:
    """Execute one py:percent notebook with papermill; returns the wall time in seconds.

    Cells tagged with any of ``drop_tags`` are left out of the execution (and of the output). With ``kernel_log``,
    the kernel process's own stderr goes to that file (a notebook executed from inside another one would otherwise
    print it into the outer notebook).

    Raises:
        NotebookFailed: naming the notebook, the failing cell and its error (the partly executed notebook is still
            written to ``output`` so the traceback can be read).
    """
    # here, not at the top: papermill, nbclient and jupytext take seconds to import, and every chapter's kernel
    # imports this package (record_run, project_root) without executing notebooks
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    unexecuted = output.with_suffix(".unexecuted.ipynb")
    nb = jupytext.read(notebook)
    if drop_tags:
        nb.cells = [c for c in nb.cells if not set(c.metadata.get("tags", ())) & set(drop_tags)]
    # the py:percent sources carry no kernel metadata (jupytext.toml filters it), so name the kernel explicitly
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python (mtanet)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    jupytext.write(nb, unexecuted, fmt="ipynb")
    started = time.perf_counter()
    try:
        # The kernel starts in the notebook's folder through nbclient's ``resources`` path, not through papermill's
        # ``cwd``: that one calls os.chdir in this process, which is process-wide, so two notebooks executed from
        # threads (a sweep with jobs > 1) restore each other's folders and can leave this process in a deleted one.
        papermill.execute_notebook(str(unexecuted), str(output), parameters=parameters, kernel_name=kernel,
                                   language="python", progress_bar=False, execution_timeout=timeout,
                                   resources={"metadata": {"path": str(notebook.parent.resolve())}},
                                   **({"kernel_manager_class": _kernel_manager_logging_to(kernel_log)} if kernel_log else {}))
    except PapermillExecutionError as err:
        first_line = (err.source or "").strip().splitlines()[:1]
        raise NotebookFailed(f"{notebook.name}: cell {err.cell_index} ({first_line[0] if first_line else ''!s}) "
                             f"raised {err.ename}: {err.evalue}\n(executed notebook with the traceback: {output})") from None
    finally:
        unexecuted.unlink(missing_ok=True)
    return time.perf_counter() - started


def _remove_own(folder: Path, *, holds_only: set[str] | None = None, marker: str | None = None) -> None:
    """Delete ``folder``, a folder the build wrote, after checking it is one: all its entries are among
    ``holds_only``, or it holds Sphinx's ``marker`` file. Anything else (a ``--build-dir`` pointing at a folder of
    the user's) raises :class:`OutputExistsError` and nothing is deleted."""
    if not folder.exists() and not folder.is_symlink():
        return
    names = {p.name for p in folder.iterdir()} if folder.is_dir() and not folder.is_symlink() else None
    ours = names is not None and ((holds_only is not None and names <= holds_only)
                                  or (marker is not None and marker in names))
    if not ours:
        raise OutputExistsError(f"{folder} was not written by the book build (it is where the build writes); "
                                "nothing was deleted: move it away or choose another build folder")
    shutil.rmtree(folder)


def stage_sources(root: Path, src: Path) -> None:
    """Copy the book's own pages and configuration next to where the executed chapters go."""
    _remove_own(src, holds_only={"_config.yml", "_toc.yml", "book"})
    (src / "book").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, src / name)
    for item in (root / "book").iterdir():
        if item.name.startswith("_") or item.name == "chapters":
            continue
        if item.is_dir():
            shutil.copytree(item, src / "book" / item.name)
        else:
            shutil.copy2(item, src / "book" / item.name)


#: Longest a single cell may run per profile before the build fails (a hung kernel must not hang CI).
CELL_TIMEOUT_S: dict[str, int | None] = {"smoke": 600, "cpu": 1800, "gpu": None}


def build(profile: str = "cpu", *, root: Path | None = None, build_dir: Path | None = None,
          only: list[str] | None = None, html: bool = True, kernel: str = KERNEL_NAME) -> dict[str, Any]:
    """Execute every chapter for ``profile`` and render the HTML book.

    Args:
        profile: ``smoke``, ``cpu`` or ``gpu`` (selects the parameter files).
        root: the checkout (default: found from cwd).
        build_dir: where ``src/`` (staged sources and executed chapters) and ``html/`` go; default ``book/_build``.
        only: stems of the notebooks to execute (default: all); the others must already be executed in build_dir.
        html: render with Jupyter Book after executing.

    Returns:
        A summary with the wall time of each notebook and of the HTML build; also written to
        ``<build_dir>/timings-<profile>.json``.
    """
    build_started = time.perf_counter()
    root = root or project_root()
    build_dir = Path(build_dir or root / "book" / "_build")
    src = build_dir / "src"
    chapters_dir = src / "book" / "chapters"
    executed_keep = {p.name: p.read_bytes() for p in chapters_dir.glob("*.ipynb")} if chapters_dir.exists() else {}
    stage_sources(root, src)
    chapters_dir.mkdir(parents=True, exist_ok=True)
    for name, content in executed_keep.items():  # keep chapters that this call does not re-execute
        (chapters_dir / name).write_bytes(content)
    sources = notebooks(root)
    listed = toc_chapters(root)
    missing = sorted({p.stem for p in sources} ^ set(listed))
    if missing:
        raise RuntimeError(f"_toc.yml and notebooks/ disagree on {missing}: every notebook is a chapter, and only those")
    timings: dict[str, Any] = {"profile": profile, "notebooks": {}}
    for nb in sources:
        if only and nb.stem not in only:
            continue
        params = parameters_for(nb, profile)
        seconds = execute(nb, chapters_dir / f"{nb.stem}.ipynb", params, kernel=kernel,
                          timeout=CELL_TIMEOUT_S[profile])
        timings["notebooks"][nb.stem] = round(seconds, 1)
        print(f"[book] {nb.stem}: {seconds:.1f} s", flush=True)
    if html:
        started = time.perf_counter()
        render_html(src, build_dir)
        timings["html_seconds"] = round(time.perf_counter() - started, 1)
        print(f"[book] html: {timings['html_seconds']:.1f} s -> {build_dir / 'html' / 'index.html'}", flush=True)
    timings["total_seconds"] = round(time.perf_counter() - build_started, 1)
    timings["date"] = time.strftime("%Y-%m-%d")
    write_json(build_dir / f"timings-{profile}.json", timings)
    return timings


def render_html(src: Path, build_dir: Path) -> None:
    """Run Jupyter Book (Sphinx) on the staged sources: warnings are errors, the HTML lands in ``build_dir/html``."""
    out = build_dir / "jb"
    _remove_own(out, holds_only={"_build"})  # Jupyter Book's output of an earlier build
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(src), "--path-output", str(out), "--all",
           "-W", "-n", "--keep-going", "--builder", "html"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Jupyter Book build failed ({' '.join(cmd)}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    html = build_dir / "html"
    _remove_own(html, marker=".buildinfo")  # Sphinx writes .buildinfo into every HTML build
    shutil.move(str(out / "_build" / "html"), str(html))
    shutil.rmtree(out, ignore_errors=True)


def record_run(chapter: str, synth_size: str, run_dir: str | os.PathLike[str], root: Path | None = None) -> Path:
    """Note where a chapter's run lives, so a later chapter can use its model (``runs/book/<chapter>-<size>.json``
    under ``root``, default :func:`mtanet.runtime.work_root`: the checkout, or ``$MTANET_WORK``)."""
    root = root or work_root()
    pointer = root / "runs" / "book" / f"{chapter}-{synth_size}.json"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    write_json(pointer, {"run_dir": str(Path(run_dir).resolve())})
    return pointer


def recorded_run(chapter: str, synth_size: str, root: Path | None = None) -> Path | None:
    """The run folder :func:`record_run` noted for ``chapter`` and size, or ``None`` if there is none (yet)."""
    pointer = (root or work_root()) / "runs" / "book" / f"{chapter}-{synth_size}.json"
    if not pointer.is_file():
        return None
    run_dir = Path(json.loads(pointer.read_text())["run_dir"])
    return run_dir if run_dir.is_dir() else None
