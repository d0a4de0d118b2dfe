"""Build the book: py:percent notebooks -> papermill (per-profile parameters) -> Jupyter Book HTML.

``python -m mtanet.book --profile cpu`` (:mod:`mtanet.book.__main__`) is what ``make book`` runs. Steps:

1. Each ``notebooks/NN_name.py`` is read with jupytext and executed by papermill with the parameters in
   ``notebooks/params/NN_name/<profile>.yaml``, with an explicit kernel and the notebooks folder as working directory
   (as in JupyterLab). Outputs go to ``<build>/src/book/chapters/``, never beside the paired notebooks.
2. Each executed chapter is finished for its readers (:func:`finish_chapter`): absolute paths of this machine in its
   outputs become project-relative, widget outputs (which need a kernel) become a note, figure captions move onto
   their figures, and a provenance box (profile, parameters, commit, versions, hardware, wall time, the command that
   reproduces the page) ends the page.
3. The book sources (``_config.yml``, ``_toc.yml``, ``book/``) are staged next to the executed chapters, and Jupyter
   Book renders them with execution off and warnings as errors.

``python -m mtanet.book --publish DIR`` (:func:`publish`) copies the rendered HTML to a folder for any static host.

A failing cell stops the build with the notebook's name, the cell's number and its first line.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mtanet.errors import NotebookFailed, OutputExistsError
from mtanet.train.preflight import check_profile_devices
from mtanet.runtime import WORK_ENV, cpu_model, git_info, project_root, usable_cores, versions, work_root, write_json

__all__ = [
    "CAPTION_TAG",
    "CELL_TIMEOUT_S",
    "KERNEL_NAME",
    "PROFILES",
    "WIDGET_NOTE",
    "build",
    "execute",
    "finish_chapter",
    "notebooks",
    "parameters_for",
    "path_replacements",
    "provenance_markdown",
    "publish",
    "record_run",
    "recorded_run",
    "render_html",
    "reproduce_command",
    "sanitise_paths",
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
    # A gpu profile on a machine whose torch cannot reach the GPU fails here in one line, not hours later on the CPU.
    check_profile_devices(nb.parent / "params" / nb.stem / f"{profile}.yaml" for nb in sources
                          if not only or nb.stem in only)
    timings: dict[str, Any] = {"profile": profile, "notebooks": {}}
    for nb in sources:
        if only and nb.stem not in only:
            continue
        params = parameters_for(nb, profile)
        executed = chapters_dir / f"{nb.stem}.ipynb"
        seconds = execute(nb, executed, params, kernel=kernel, timeout=CELL_TIMEOUT_S[profile])
        finish_chapter(executed, notebook=nb, profile=profile, parameters=params, seconds=seconds, root=root,
                       build_dir=build_dir)
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


# ---------------------------------------------------------------------------------------------------------------
# Finishing an executed chapter for its readers

#: A markdown cell with this tag is the caption of the figure that the code cell just before it draws: the build
#: moves it onto that figure (MyST-NB's ``mystnb.figure`` cell metadata), which numbers it. Its first line is the
#: label, ``(fig-name)=``; the rest is the caption. In JupyterLab it reads as a paragraph under the figure.
CAPTION_TAG = "figure-caption"

#: What a widget output becomes in the HTML, where no kernel runs its Python callbacks.
WIDGET_NOTE = ("*Interactive viewer: it runs in JupyterLab (`make lab`), where a kernel answers its controls. "
               "This page shows a static view instead.*")

_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
_TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/javascript")
_LABEL = re.compile(r"^\(([A-Za-z0-9_.:-]+)\)=\s*$")


def path_replacements(root: Path, *, work: Path | None = None, build_dir: Path | None = None,
                      home: Path | None = None) -> list[tuple[str, str]]:
    """``(absolute prefix, what the reader sees instead)`` pairs for :func:`sanitise_paths`, longest prefix first:
    the checkout becomes project-relative (``runs/...``; ``.`` for the checkout itself), ``$MTANET_WORK`` and the
    build folder keep their role as a name, and the home folder becomes ``~``. Each folder is given both as
    written and resolved (a symlinked checkout prints either)."""
    named: list[tuple[Path, str]] = [(root, "")]
    if work is not None:
        named.append((work, "$" + WORK_ENV))
    if build_dir is not None:
        named.append((build_dir, "<build>"))
    named.append((home if home is not None else Path.home(), "~"))
    pairs: dict[str, str] = {}
    for folder, name in named:
        for variant in (str(folder), str(folder.resolve())):
            if variant not in ("/", "") and variant not in pairs:
                pairs[variant] = name
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def sanitise_paths(text: str, replacements: list[tuple[str, str]]) -> str:
    """``text`` with every absolute path under a prefix of ``replacements`` rewritten (``/home/u/repo/runs/x`` ->
    ``runs/x``, ``/home/u`` -> ``~``). A prefix matches only at a path boundary: ``/home/u/repo2`` is not under
    ``/home/u/repo``."""
    for prefix, name in replacements:
        if prefix not in text:
            continue
        pattern = re.compile(r"(?<![\w.~-])" + re.escape(prefix) + r"(?=/|(?![\w-]|\.\w))(/)?")

        def swap(match: re.Match[str], name: str = name) -> str:
            if name == "":  # the checkout: relative paths, or "." for the checkout itself
                return "" if match.group(1) else "."
            return name + (match.group(1) or "")

        text = pattern.sub(swap, text)
    return text


def _sanitise_value(value: Any, replacements: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        return sanitise_paths(value, replacements)
    if isinstance(value, list):
        return [_sanitise_value(v, replacements) for v in value]
    if isinstance(value, dict):
        return type(value)((k, _sanitise_value(v, replacements)) for k, v in value.items())
    return value


def _sanitise_outputs(cell: Any, replacements: list[tuple[str, str]]) -> None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            output["text"] = _sanitise_value(output["text"], replacements)
        elif output.get("output_type") == "error":
            output["evalue"] = _sanitise_value(output.get("evalue", ""), replacements)
            output["traceback"] = _sanitise_value(output.get("traceback", []), replacements)
        for mime in _TEXT_MIMES:
            if mime in output.get("data", {}):
                output["data"][mime] = _sanitise_value(output["data"][mime], replacements)


def _replace_widgets(cell: Any) -> None:
    """Widget views need a kernel for their Python callbacks: in the HTML they would be an inert control or, without
    the widget manager's JavaScript, an empty box. Each becomes :data:`WIDGET_NOTE`."""
    for output in cell.get("outputs", []):
        if _WIDGET_MIME in output.get("data", {}):
            output["data"] = {"text/markdown": WIDGET_NOTE}
            output["metadata"] = {}


def _attach_captions(nb: Any, name: str) -> list[str]:
    """Move every :data:`CAPTION_TAG` cell onto the figure of the code cell before it; returns the labels.

    Raises:
        NotebookFailed: a caption without a label line or after a cell that is not code, or a figure cell with other
            displayed outputs besides its one image (MyST-NB would put them all in the figure).
    """
    labels, kept = [], []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown" or CAPTION_TAG not in cell.metadata.get("tags", []):
            kept.append(cell)
            continue
        lines = cell.source.strip().splitlines()
        label = _LABEL.match(lines[0].strip()) if lines else None
        if label is None or len(lines) < 2:
            raise NotebookFailed(f"{name}: cell {index} is tagged {CAPTION_TAG} but does not start with a "
                                 "'(fig-name)=' line followed by the caption")
        figure_cell = kept[-1] if kept else None
        if figure_cell is None or figure_cell.cell_type != "code":
            raise NotebookFailed(f"{name}: caption {label.group(1)} (cell {index}) does not follow a code cell")
        shown = [o for o in figure_cell.get("outputs", [])
                 if o.get("output_type") in ("display_data", "execute_result")]
        images = [o for o in shown if any(m in o.get("data", {}) for m in _IMAGE_MIMES)]
        if not images:  # the chapter chose not to draw it (a parameter without that figure): the caption goes too
            print(f"[book] {name}: no figure before caption {label.group(1)}; caption left out", flush=True)
            continue
        if len(shown) != 1:
            raise NotebookFailed(f"{name}: the cell before caption {label.group(1)} (cell {index}) displays "
                                 f"{len(shown)} outputs; a captioned figure's cell must display its figure alone "
                                 "(move the other displays to a cell of their own)")
        caption = " ".join(line.strip() for line in lines[1:] if line.strip())
        figure_cell.metadata.setdefault("mystnb", {})["figure"] = {"name": label.group(1), "caption": caption}
        labels.append(label.group(1))
    nb.cells = kept
    return labels


def _hardware() -> str:
    memory = ""
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
        memory = f", {kib / 2**20:.0f} GiB memory"
    except (OSError, StopIteration, ValueError):
        pass
    gpus = "none"
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            found = subprocess.run([nvidia_smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30).stdout.split("\n")
            gpus = ", ".join(g.strip() for g in found if g.strip()) or "none"
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{cpu_model()} ({usable_cores()} cores usable{memory}), {platform.system()}; GPU: {gpus}"


def reproduce_command(notebook: Path, profile: str, root: Path, output: Path, kernel: str = KERNEL_NAME) -> str:
    """The shell command that executes ``notebook`` as the build did: jupytext turns the py:percent source into a
    notebook for ``kernel`` on a pipe, papermill runs it with the profile's parameter file and the notebooks folder as
    working directory. Paths are relative to the checkout (run it from there)."""
    def rel(path: Path) -> str:
        path = path.resolve()
        return str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else path.name

    params = notebook.parent / "params" / notebook.stem / f"{profile}.yaml"
    return (f"jupytext --to ipynb --set-kernel {kernel} -o - {rel(notebook)} \\\n"
            f"  | papermill - {rel(output)} \\\n"
            f"      -f {rel(params)} --cwd {rel(notebook.parent)}")


def provenance_markdown(*, notebook: Path, profile: str, parameters: dict[str, Any], seconds: float, root: Path,
                        output: Path, replacements: list[tuple[str, str]], kernel: str = KERNEL_NAME) -> str:
    """The box that ends a chapter: how this page was made, and the command that makes it again."""
    git = git_info()
    commit = "not a git checkout" if not git["commit"] else (
        f"`{git['commit'][:12]}`" + (" with uncommitted changes to tracked files" if git["dirty"] else ""))
    shown = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in parameters.items()) or "none (the notebook's defaults)"
    packages = dict(versions())
    for tool in ("papermill", "jupytext", "jupyter-book"):
        try:
            from importlib.metadata import version
            packages[tool] = version(tool)
        except Exception:  # a tool that is not installed is not part of this page's provenance
            continue
    listed = ", ".join(f"{k} {v}" for k, v in packages.items() if v)
    work = os.environ.get(WORK_ENV, "").strip()
    command = reproduce_command(notebook, profile, root, output, kernel)
    lines = [
        "````{admonition} How this page was made",
        ":class: note provenance",
        "",
        f"- **Profile:** `{profile}`; parameters from `notebooks/params/{notebook.stem}/{profile}.yaml`: {shown}",
        f"- **Commit:** {commit}",
        f"- **Packages:** {listed}",
        f"- **Hardware:** {_hardware()}",
        f"- **Wall time:** {seconds:.1f} s to execute, finished {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- **Reproduce** this page's notebook from the checkout"
        + (f" (the build ran with `{WORK_ENV}` set: generated data and runs went there)" if work else "") + ":",
        "",
        "  ```bash",
        *("  " + line for line in command.splitlines()),
        "  ```",
        "",
        f"  or with the book's runner, which also renders the page: "
        f"`python -m mtanet.book --profile {profile} --only {notebook.stem}`.",
        "````",
    ]
    return sanitise_paths("\n".join(lines), replacements)


def finish_chapter(executed: Path, *, notebook: Path, profile: str, parameters: dict[str, Any], seconds: float,
                   root: Path, build_dir: Path | None = None, kernel: str = KERNEL_NAME) -> list[str]:
    """Prepare an executed chapter for the HTML, in place; returns the labels of its captioned figures.

    - outputs (streams, text, HTML, markdown, errors), the injected-parameters cell and papermill's record of the run
      lose the absolute paths of this machine (:func:`sanitise_paths`);
    - the injected-parameters cell is folded (``hide-input``): the provenance box lists the values too;
    - widget outputs become :data:`WIDGET_NOTE`, and the notebook's stored widget state goes, so no page loads the
      widget manager (from a CDN) for controls that could not run anyway;
    - figure captions (:data:`CAPTION_TAG` cells) move onto their figures;
    - a provenance box (:func:`provenance_markdown`) is appended.
    """
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    replacements = path_replacements(root, work=Path(os.environ[WORK_ENV]).expanduser()
                                     if os.environ.get(WORK_ENV, "").strip() else None, build_dir=build_dir)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags:
            cell.source = sanitise_paths(cell.source, replacements)
            if "hide-input" not in tags:
                cell.metadata["tags"] = [*tags, "hide-input"]
        if cell.cell_type == "code":
            _replace_widgets(cell)
            _sanitise_outputs(cell, replacements)
    nb.metadata.pop("widgets", None)
    if "papermill" in nb.metadata:  # its input and output paths and parameters: the page offers the .ipynb for download
        nb.metadata["papermill"] = _sanitise_value(nb.metadata["papermill"], replacements)
    labels = _attach_captions(nb, notebook.name)
    nb.cells.append(nbformat.v4.new_markdown_cell(provenance_markdown(
        notebook=notebook, profile=profile, parameters=parameters, seconds=seconds, root=root, output=executed,
        replacements=replacements, kernel=kernel), metadata={"tags": ["provenance"]}))
    nbformat.write(nb, executed)
    return labels


def _external_references(html_dir: Path) -> list[str]:
    """``file: URL`` for every script, stylesheet, image or frame that a page of ``html_dir`` loads from the network
    (links a reader follows are fine; what the page needs to display is not)."""
    loads = re.compile(r"<(?:script|img|iframe|source)\b[^>]*\bsrc=[\"'](https?:)?//[^\"']*|"
                       r"<link\b[^>]*\bhref=[\"'](?:https?:)?//[^\"']*", re.IGNORECASE)
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        for match in loads.finditer(page.read_text(errors="replace")):
            found.append(f"{page.relative_to(html_dir)}: {match.group(0)[:160]}")
    return found


def publish(html_dir: Path, dest: Path) -> Path:
    """Copy the rendered book (``html_dir``, e.g. ``book/_build/html``) to ``dest`` for any static host.

    The copy is checked to be self-contained (no page loads a script, stylesheet or image from the network) and
    gets a ``.nojekyll`` file, so GitHub Pages serves its ``_static`` folders as they are. ``dest`` may be missing,
    empty, or an earlier copy (it holds Sphinx's ``.buildinfo``); anything else raises
    :class:`OutputExistsError` and nothing is deleted.

    Raises:
        FileNotFoundError: ``html_dir`` holds no rendered book (run ``make book`` first).
        RuntimeError: a page loads something from the network.
    """
    html_dir, dest = Path(html_dir), Path(dest)
    if not (html_dir / "index.html").is_file() or not (html_dir / ".buildinfo").is_file():
        raise FileNotFoundError(f"{html_dir}: no rendered book there (run `make book` first)")
    external = _external_references(html_dir)
    if external:
        raise RuntimeError("the book is not self-contained; these pages load from the network:\n"
                           + "\n".join(external[:20]))
    if dest.resolve() == html_dir.resolve() or dest.resolve().is_relative_to(html_dir.resolve()):
        raise OutputExistsError(f"{dest}: is the build's own HTML folder or inside it; choose another folder")
    if dest.exists() or dest.is_symlink():
        usable = (dest.is_dir() and not dest.is_symlink()
                  and (not any(dest.iterdir()) or (dest / ".buildinfo").is_file()))
        if not usable:
            raise OutputExistsError(f"{dest} is neither empty nor an earlier copy of the book; nothing was deleted: "
                                    "choose another folder")
    staging = dest.with_name(dest.name + ".publishing")
    _remove_own(staging, marker=".buildinfo")  # what an interrupted earlier call left
    shutil.copytree(html_dir, staging)
    (staging / ".nojekyll").touch()
    if dest.exists():  # replaced only once the new copy is complete
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest


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
