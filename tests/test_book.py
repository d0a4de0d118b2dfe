"""The book as a build artefact: sources, parameters, pairing, environment files, and the rendered smoke book."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from mtanet import book

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = book.notebooks(ROOT)


def test_every_notebook_is_a_chapter_and_every_chapter_a_notebook() -> None:
    assert NOTEBOOKS, "no notebooks found"
    assert [p.stem for p in NOTEBOOKS] == book.toc_chapters(ROOT)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_tagged_parameters_cell_that_papermill_parses(notebook: Path, caplog) -> None:
    import papermill

    nb = jupytext.read(notebook)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "a title first"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nb.ipynb"
        nb.metadata["kernelspec"] = {"name": book.KERNEL_NAME, "language": "python", "display_name": "mtanet"}
        nbformat.write(nb, path)
        with caplog.at_level(logging.WARNING):
            declared = papermill.inspect_notebook(str(path))
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()], "papermill could not parse a line"
    untyped = [name for name, p in declared.items() if p["inferred_type_name"] == "None"]
    assert not untyped, f"parameters without a type annotation: {untyped}"
    for profile in book.PROFILES:
        params = book.parameters_for(notebook, profile)
        unknown = set(params) - set(declared)
        assert not unknown, f"{profile}.yaml sets parameters the notebook does not declare: {unknown}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_py_percent_sources_are_canonical_and_pairs_in_sync(notebook: Path, tmp_path: Path) -> None:
    text = notebook.read_text()
    assert jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent") == text, (
        f"{notebook.name} is not in jupytext's canonical py:percent form: run jupytext --to py:percent on it")
    paired = notebook.with_suffix(".ipynb")
    if paired.exists():  # made by JupyterLab or `make sync-notebooks`; never committed (see .gitignore)
        cells = [c.source for c in jupytext.read(paired).cells]
        assert cells == [c.source for c in jupytext.reads(text, fmt="py:percent").cells], (
            f"{paired.name} and {notebook.name} differ: run `make sync-notebooks`")
    assert "injected-parameters" not in text, "papermill's injected parameters leaked into the source"


def _names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")
        names.add({"pytorch": "torch"}.get(name, name))
    return names


def test_environment_yml_and_pyproject_name_the_same_packages() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _names(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    conda_names = _names(conda + [p for p in pip if not p.startswith("-e")]) - {"python", "pip"}
    assert conda_names == declared
    assert "python=3.11" in conda


def test_notebooks_pair_with_ipynb_and_back_unchanged(tmp_path: Path) -> None:
    """`make sync-notebooks` (jupytext --sync with the project's jupytext.toml) on a copy of every chapter: each
    .ipynb it makes holds the chapter's cells and tags, and the .py made back from that .ipynb alone is the source,
    byte for byte. (The checkout's .ipynb are git-ignored, so they are made here rather than looked for.)"""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    shutil.copy2(ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    copies = [folder / nb.name for nb in NOTEBOOKS]
    for nb, copy in zip(NOTEBOOKS, copies):
        shutil.copy2(nb, copy)
    jupytext_cli = [sys.executable, "-m", "jupytext", "--sync"]
    made = subprocess.run([*jupytext_cli, *map(str, copies)], capture_output=True, text=True, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    for nb, copy in zip(NOTEBOOKS, copies):
        source = jupytext.reads(nb.read_text(), fmt="py:percent")
        paired = nbformat.read(copy.with_suffix(".ipynb"), as_version=4)
        assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in paired.cells] == [
            (c.cell_type, c.source, c.metadata.get("tags", [])) for c in source.cells], nb.name
        copy.unlink()  # the .ipynb alone makes the .py again
    back = subprocess.run([*jupytext_cli, *(str(c.with_suffix(".ipynb")) for c in copies)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert back.returncode == 0, back.stderr[-2000:]
    for nb, copy in zip(NOTEBOOKS, copies):
        assert copy.read_text() == nb.read_text(), f"{nb.name} changes on the way through its .ipynb"


def _ranges(requirements: list[str]) -> dict[str, SpecifierSet]:
    """Package name -> version range, for pip requirements and conda specs alike (``pytorch>=2.4,<2.15``)."""
    out = {}
    for req in requirements:
        parsed = Requirement(req)
        name = parsed.name.lower().replace("_", "-")
        out[{"pytorch": "torch"}.get(name, name)] = parsed.specifier
    return out


def test_environment_yml_pyproject_and_constraints_agree_on_versions() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _ranges(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str) and d not in ("pip",) and not d.startswith("python=")]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    in_env = _ranges(conda + [p for p in pip if not p.startswith("-e")])
    assert in_env.keys() == declared.keys()
    different = {name: (str(in_env[name]), str(declared[name])) for name in declared if in_env[name] != declared[name]}
    assert not different, f"environment.yml and pyproject.toml give other ranges (env, pyproject): {different}"
    assert all(str(spec) for spec in declared.values()), "every dependency has a range"
    # and the versions `make` installs lie inside those ranges
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    outside = {name: (pins[name], str(spec)) for name, spec in declared.items() if pins[name] not in spec}
    assert not outside, f"constraints.txt pins versions outside pyproject.toml's ranges: {outside}"


def test_constraints_pin_everything_the_project_declares() -> None:
    pinned = _names([line for line in (ROOT / "constraints.txt").read_text().splitlines()
                     if line and not line.startswith("#")])
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"] + project["optional-dependencies"]["test"]) <= pinned


def test_readme_gives_the_two_commands_and_ci_runs_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_a_failing_cell_names_the_notebook_and_the_cell(tmp_path: Path) -> None:
    nb = tmp_path / "99_broken.py"
    nb.write_text('# %% [markdown]\n# # Broken\n\n# %% tags=["parameters"]\nx: int = 1  # a number\n\n'
                  '# %%\ny = x + 1\n\n# %%\nraise ValueError(f"bad value {y}")\n')
    with pytest.raises(book.NotebookFailed) as info:
        book.execute(nb, tmp_path / "out" / "99_broken.ipynb", {"x": 41})
    message = str(info.value)
    assert message.startswith("99_broken.py: cell ") and "ValueError: bad value 42" in message
    assert (tmp_path / "out" / "99_broken.ipynb").exists()  # kept for reading the traceback


def test_cells_with_a_dropped_tag_are_not_executed(tmp_path: Path) -> None:
    nb = tmp_path / "98_tags.py"
    nb.write_text('# %% tags=["parameters"]\nx: int = 1  # a number\n\n# %% tags=["report"]\n'
                  'raise ValueError("a report cell ran")\n\n# %%\nprint("kept", x)\n')
    out = tmp_path / "out.ipynb"
    book.execute(nb, out, {"x": 5}, drop_tags=("report",))
    cells = json.loads(out.read_text())["cells"]
    assert not any("report" in c["metadata"].get("tags", []) for c in cells)
    assert any("kept 5" in "".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    with pytest.raises(book.NotebookFailed, match="a report cell ran"):
        book.execute(nb, out, {"x": 5})


def test_the_kernel_runs_in_the_notebooks_folder_and_the_caller_never_changes_folder(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    # os.chdir is process-wide: a sweep executing notebooks from two threads must not move its own process
    folder = tmp_path / "chapters"
    folder.mkdir()
    nb = folder / "97_cwd.py"
    nb.write_text('# %% tags=["parameters"]\nout: str = ""  # where to write the folder\n\n'
                  '# %%\nimport os, pathlib\npathlib.Path(out).write_text(os.getcwd())\n')

    before = Path.cwd()
    moves = []  # papermill's file handler re-enters the current folder around each read; any other target is a move
    real_chdir = os.chdir
    monkeypatch.setattr("os.chdir", lambda path: (moves.append(Path(path).resolve()), real_chdir(path))[1])
    book.execute(nb, tmp_path / "out" / "97_cwd.ipynb", {"out": str(tmp_path / "cwd.txt")})
    assert Path((tmp_path / "cwd.txt").read_text()).resolve() == folder.resolve()
    assert [m for m in moves if m != before.resolve()] == []
    assert Path.cwd() == before


def test_paths_become_project_relative_only_at_a_path_boundary() -> None:
    from mtanet.book.build import path_replacements, sanitise_paths

    swaps = path_replacements(Path("/home/ada/mtanet"), work=Path("/scratch/w"), home=Path("/home/ada"))
    assert sanitise_paths("run in /home/ada/mtanet/runs/x (see /home/ada/mtanet).", swaps) == "run in runs/x (see .)."
    assert sanitise_paths("/scratch/w/data/synth-smoke", swaps) == "$MTANET_WORK/data/synth-smoke"
    assert sanitise_paths("'/home/ada/.cache/torch'", swaps) == "'~/.cache/torch'"
    assert sanitise_paths("/home/ada/mtanet2/x /scratch/wide", swaps) == "~/mtanet2/x /scratch/wide"
    assert sanitise_paths("/srv/home/ada/mtanet/x", swaps) == "/srv/home/ada/mtanet/x"  # another folder's path


TINY_CHAPTER = """# %% [markdown]
# # Tiny
#
# The line is in {numref}`fig-tiny-line`.

# %% tags=["parameters"]
n: int = 1  # points
where: str = ""  # a folder to print

# %%
import os

print("tiny", n * 7, "in", where, "and", os.getcwd())

# %%
import matplotlib.pyplot as plt

plt.plot(range(n))
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-tiny-line)=
# A line of `n` points.

# %%
import ipywidgets

ipywidgets.IntSlider(value=n)
"""


def _tiny_project(tmp_path: Path, chapter: str = TINY_CHAPTER) -> tuple[Path, Path]:
    project = tmp_path / "project"
    (project / "notebooks" / "params" / "01_tiny").mkdir(parents=True)
    source = project / "notebooks" / "01_tiny.py"
    source.write_text(chapter)
    (project / "notebooks" / "params" / "01_tiny" / "smoke.yaml").write_text(f"n: 5\nwhere: {project / 'runs'}\n")
    return project, source


def test_a_finished_chapter_shows_relative_paths_captions_no_widget_and_a_provenance_box_that_reproduces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtanet.book.build import WIDGET_NOTE, finish_chapter
    from mtanet.runtime import WORK_ENV

    project, source = _tiny_project(tmp_path)
    monkeypatch.setenv(WORK_ENV, str(tmp_path / "work"))
    executed = project / "book" / "_build" / "src" / "book" / "chapters" / "01_tiny.ipynb"
    params = book.parameters_for(source, "smoke")
    seconds = book.execute(source, executed, params)
    raw = nbformat.read(executed, as_version=4)
    assert str(project) in json.dumps([c.get("outputs") for c in raw.cells]), "the fixture prints no absolute path"
    assert "widgets" in raw.metadata, "nbclient stored no widget state: the widget check below would prove nothing"

    labels = finish_chapter(executed, notebook=source, profile="smoke", parameters=params, seconds=seconds,
                            root=project)
    nb = nbformat.read(executed, as_version=4)
    text = json.dumps(nb)
    assert str(project) not in text and str(tmp_path) not in text
    assert "tiny 35 in runs and notebooks" in text  # the parameter and the kernel's folder, relative
    assert labels == ["fig-tiny-line"]
    assert not any("figure-caption" in c.metadata.get("tags", []) for c in nb.cells)
    figure = next(c for c in nb.cells if c.cell_type == "code" and "plt.plot" in c.source)
    assert figure.metadata["mystnb"]["figure"] == {"name": "fig-tiny-line", "caption": "A line of `n` points."}
    assert "widgets" not in nb.metadata and "application/vnd.jupyter.widget-view+json" not in text
    assert WIDGET_NOTE in text
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "hide-input" in injected.metadata["tags"] and 'where = "runs"' in injected.source
    box = nb.cells[-1]
    assert box.cell_type == "markdown" and "provenance" in box.source.splitlines()[1]
    for fact in ("`smoke`", "`n=5`", "Commit:", "torch ", "Hardware:", f"{seconds:.1f} s"):
        assert fact in box.source, fact
    command = re.search(r"```bash\n(.*?)\n\s*```", box.source, re.DOTALL).group(1)
    assert "-f notebooks/params/01_tiny/smoke.yaml" in command

    # the command, run as the box says (from the checkout, the venv's tools first), makes the same page
    again = command.replace("book/_build/src/book/chapters/01_tiny.ipynb", str(tmp_path / "again.ipynb"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ran = subprocess.run(["bash", "-c", again], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    streams = ["".join(o.get("text", "")) for c in nbformat.read(tmp_path / "again.ipynb", as_version=4).cells
               for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert any(f"tiny 35 in {project / 'runs'} and {project / 'notebooks'}" in s for s in streams), streams


def test_a_caption_needs_its_label_and_a_figure_shown_alone(tmp_path: Path) -> None:
    from mtanet.book.build import finish_chapter

    project, source = _tiny_project(tmp_path)

    def finished(cells: list) -> None:
        path = tmp_path / "executed.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
        finish_chapter(path, notebook=source, profile="smoke", parameters={}, seconds=1.0, root=project)

    image = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    table = nbformat.v4.new_output("display_data", data={"text/html": "<table></table>", "text/plain": "table"})
    caption = nbformat.v4.new_markdown_cell("(fig-x)=\nA caption.", metadata={"tags": ["figure-caption"]})
    with pytest.raises(book.NotebookFailed, match="displays 2 outputs"):
        finished([nbformat.v4.new_code_cell("draw()", outputs=[table, image]), caption])
    with pytest.raises(book.NotebookFailed, match=r"'\(fig-name\)=' line"):
        finished([nbformat.v4.new_code_cell("draw()", outputs=[image]),
                  nbformat.v4.new_markdown_cell("A caption without a label.", metadata={"tags": ["figure-caption"]})])
    finished([nbformat.v4.new_code_cell("draw()", outputs=[image]), caption])  # the figure alone: accepted


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `make test` installs it (Debian package chromium, as root)")
    return path


def _rendered_dom(html: Path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", html.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


#: Chapters whose plumbing is folded and whose figures are numbered and captioned (the book's convention, see
#: mtanet.book.build.CAPTION_TAG); each must show at least one of each.
FOLDED_AND_CAPTIONED = ("02_architecture", "03_losses", "06_real_faces")


def _tagged(notebook: Path, tag: str, cell_type: str) -> int:
    return sum(1 for c in jupytext.read(notebook).cells
               if c.cell_type == cell_type and tag in c.metadata.get("tags", []))


def _check_pages_for_readers(html: Path, tmp_path: Path) -> None:
    """What a reader of the published book meets, page by page, in Chromium: folded plumbing, numbered captions,
    a provenance box, no absolute path of the machine that built it, no request to the network (widgets included),
    and code that fits the page."""
    from playwright.sync_api import sync_playwright

    from mtanet.book.build import WIDGET_NOTE

    builders = {str(p) for p in (ROOT, ROOT.resolve(), tmp_path, tmp_path.resolve())} | {f"{Path.home()}/"}
    for page in sorted(html.rglob("*.html")):
        text = page.read_text()
        leaked = [p for p in builders if p in text]
        assert not leaked, f"{page.relative_to(html)} shows the builder's absolute paths {leaked}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": 1280, "height": 900})
            for nb in NOTEBOOKS:
                requests: list[str] = []

                def record(request, seen=requests) -> None:
                    seen.append(request.url)

                view.on("request", record)
                view.goto((html / "book" / "chapters" / f"{nb.stem}.html").as_uri(), wait_until="load")
                view.wait_for_timeout(500)
                view.remove_listener("request", record)
                remote = [u for u in requests if not u.startswith(("file:", "data:", "blob:", "about:"))]
                assert not remote, f"{nb.stem}: the page asks the network for {remote[:5]}"
                dom = view.content()
                assert "widget-state+json" not in dom and "embed-amd" not in dom, f"{nb.stem}: widget manager loaded"
                if "ipywidgets" in nb.read_text():
                    assert WIDGET_NOTE.strip("*").split(":")[0] in view.inner_text("main"), nb.stem
                box = view.locator("div.admonition.provenance")
                assert box.count() == 1, f"{nb.stem}: no provenance box"
                assert box.inner_text().strip().startswith("How this page was made")
                assert f"-f notebooks/params/{nb.stem}/smoke.yaml" in box.inner_text(), nb.stem
                # every hide-input cell of the source is folded (papermill's injected parameters too), every
                # remove-input cell shows its output only, every caption numbers its figure
                folded = view.locator("div.cell.tag_hide-input details.hide.above-input").count()
                assert folded == _tagged(nb, "hide-input", "code") + 1, f"{nb.stem}: {folded} folded cells"
                removed = view.locator("div.cell.tag_remove-input")
                assert removed.count() == _tagged(nb, "remove-input", "code"), nb.stem
                assert all(removed.nth(i).locator(".cell_input").count() == 0 for i in range(removed.count()))
                captions = view.locator("figure figcaption span.caption-number")
                assert captions.count() == _tagged(nb, "figure-caption", "markdown"), nb.stem
                numbers = [captions.nth(i).inner_text().strip() for i in range(captions.count())]
                assert all(re.fullmatch(r"Figure \d+", n) for n in numbers), numbers  # numbered through the book
                assert [int(n.split()[1]) for n in numbers] == list(range(int(numbers[0].split()[1]), int(
                    numbers[0].split()[1]) + len(numbers))) if numbers else True, numbers
                if nb.stem in FOLDED_AND_CAPTIONED:
                    assert folded > 1 and captions.count() > 0, f"{nb.stem}: no folded cells or no captions"
                # no code cell and no page scrolls sideways
                wide = view.evaluate("""() => [...document.querySelectorAll('div.cell_input pre')]
                    .filter(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
                    .map(e => e.textContent.slice(0, 60))""")
                assert not wide, f"{nb.stem}: code wider than the page: {wide[:3]}"
                assert view.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), nb.stem
        finally:
            browser.close()


def test_a_chapters_kernel_writes_where_mtanet_work_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the smoke-book test relies on: a kernel started by the build inherits $MTANET_WORK, and the generated
    # data and runs follow it while the sources stay in the checkout
    from mtanet.runtime import WORK_ENV

    nb = tmp_path / "96_work.py"
    nb.write_text('# %% tags=["parameters"]\nout: str = ""  # where to write\n\n'
                  '# %%\nimport json, pathlib\nfrom mtanet.book import project_root, sweep, work_root\n'
                  'from mtanet.synth import default_data_root\n'
                  'pathlib.Path(out).write_text(json.dumps([str(work_root()), str(project_root()), '
                  'str(default_data_root("smoke", create=False)), str(sweep.results_folder({}, "small"))]))\n')
    monkeypatch.setenv(WORK_ENV, str(tmp_path / "work"))
    book.execute(nb, tmp_path / "out" / "96_work.ipynb", {"out": str(tmp_path / "seen.json")})
    work, project, data, sweep_folder = map(Path, json.loads((tmp_path / "seen.json").read_text()))
    assert work == (tmp_path / "work").resolve()
    assert data == work / "data" / "synth-smoke" and sweep_folder.parent == work / "runs" / "sweep"
    assert project == ROOT.resolve()  # sources still come from the checkout
    monkeypatch.delenv(WORK_ENV)
    assert book.work_root(ROOT) == book.project_root(ROOT)  # unset: the checkout, as before


def _generated(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the checkout's data/ and runs/, with its size and modification time."""
    out = {}
    for top in ("data", "runs"):
        for folder, _, files in os.walk(root / top):
            for name in files:
                path = Path(folder) / name
                stat = path.lstat()
                out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.mark.book
def test_smoke_book_builds_and_every_chapter_shows_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline on the smoke profile from nothing, then each chapter page as Chromium renders it.

    The chapters write their data, training runs and sweep into an empty folder of their own ($MTANET_WORK, which
    their kernels inherit): nothing is reused from an earlier build in the checkout's data/ and runs/, and nothing
    there is touched."""
    from mtanet.runtime import WORK_ENV
    from mtanet.synth import MANIFEST_FILE

    work = tmp_path / "work"
    monkeypatch.setenv(WORK_ENV, str(work))
    checkout = _generated(ROOT)
    timings = book.build("smoke", root=ROOT, build_dir=tmp_path / "build")
    # made here, by this build: the synthetic set, the training chapter's run (the one chapter 06 uses) and the sweep
    assert (work / "data" / "synth-smoke" / MANIFEST_FILE).is_file()
    trained = book.recorded_run("04_training", "smoke")
    assert trained is not None and trained.is_relative_to(work.resolve()) and (trained / "metrics.json").is_file()
    assert list((work / "runs" / "sweep").glob("smoke-*/*/seed*/metrics.json"))
    assert _generated(ROOT) == checkout, "the book build wrote into the checkout's data/ or runs/"
    print("smoke book timings:", timings)  # the budget itself is measured by benchmarks, not asserted here
    html = tmp_path / "build" / "html"
    assert (html / "index.html").exists()
    for nb in NOTEBOOKS:
        page = html / "book" / "chapters" / f"{nb.stem}.html"
        assert page.exists(), f"{page} missing"
        dom = _rendered_dom(page)
        images = re.findall(r'<img[^>]+src="([^"]+\.png)"', dom)
        assert images, f"{nb.stem}: no figures in the rendered page"
        for src in images:
            assert (page.parent / src).resolve().exists(), f"{nb.stem}: figure {src} does not exist"
        for marker in ("Traceback (most recent call last)", 'class="output traceback', 'class="output stderr'):
            assert marker not in dom, f"{nb.stem}: the page shows an error output ({marker})"
    _check_pages_for_readers(html, tmp_path)
    # the equations are typeset by the MathJax copied into the book, not fetched from a CDN (CI has no network)
    losses = _rendered_dom(html / "book" / "chapters" / "03_losses.html")
    assert "_static/mathjax/tex-chtml.js" in losses and "<mjx-container" in losses
    intro = _rendered_dom(html / "book" / "intro.html")  # index.html redirects here
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", intro))
    assert "MTANet" in text and "make book" in text and "Pointing the book at the real Aff-Wild2" in text


def test_the_command_line_builds_what_it_is_asked_and_reports_a_failure_in_one_line(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    from mtanet.book import __main__ as cli

    build_dir = tmp_path / "build"
    assert cli.main(["--profile", "smoke", "--build-dir", str(build_dir), "--only", "none", "--no-html"]) == 0
    assert json.loads((build_dir / "timings-smoke.json").read_text())["notebooks"] == {}  # nothing executed
    assert (build_dir / "src" / "_toc.yml").is_file()  # the book's sources staged

    def failing(*args, **kwargs):
        raise book.NotebookFailed("04_training.py: cell 3 (train(config)) raised ValueError: bad")

    monkeypatch.setattr(cli, "build", failing)
    assert cli.main(["--profile", "smoke"]) == 1
    assert capsys.readouterr().err == "[book] FAILED: 04_training.py: cell 3 (train(config)) raised ValueError: bad\n"


def test_the_build_deletes_only_folders_it_wrote(tmp_path: Path, capsys) -> None:
    from mtanet.book import __main__ as cli
    from mtanet.errors import OutputExistsError

    build_dir = tmp_path / "build"
    book.stage_sources(ROOT, build_dir / "src")
    book.stage_sources(ROOT, build_dir / "src")  # the build's own staged sources are replaced
    assert (build_dir / "src" / "_toc.yml").is_file()
    mine = tmp_path / "mine"  # --build-dir pointed at a folder of the user's: its src/ and jb/ are not the build's
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "thesis.tex").write_text("mine")
    assert cli.main(["--profile", "smoke", "--build-dir", str(mine), "--only", "none", "--no-html"]) == 1
    assert "nothing was deleted" in capsys.readouterr().err
    (mine / "jb").mkdir()
    (mine / "jb" / "notes.md").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"jb was not written by the book build"):
        book.render_html(build_dir / "src", mine)
    assert (mine / "src" / "thesis.tex").read_text() == "mine" and (mine / "jb" / "notes.md").read_text() == "mine"


def test_a_chapter_finds_the_run_an_earlier_chapter_recorded(tmp_path: Path) -> None:
    assert book.recorded_run("04_training", "smoke", root=tmp_path) is None
    run = tmp_path / "somewhere" / "run"
    run.mkdir(parents=True)
    book.record_run("04_training", "smoke", run, root=tmp_path)
    assert book.recorded_run("04_training", "smoke", root=tmp_path) == run.resolve()
    assert book.recorded_run("04_training", "cpu", root=tmp_path) is None
    run.rmdir()
    assert book.recorded_run("04_training", "smoke", root=tmp_path) is None  # a deleted run is no run
