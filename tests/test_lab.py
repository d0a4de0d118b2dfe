"""JupyterLab as a researcher meets it, driven in headless Chromium (Playwright with the system's Chromium).

A temporary copy of the project's JupyterLab set-up (``jupytext.toml``, ``.jupyter/``) with one tiny chapter is served
the way ``make lab`` serves the checkout: from the project root, with ``.jupyter`` on ``JUPYTER_CONFIG_PATH``. The test
opens the chapter's ``.py`` by its URL (it must open as a notebook, not as text), checks that MyST markup renders,
runs every cell, saves, stops the kernel, opens the chapter again in a fresh page and finds the outputs, which can
only have come from the paired ``.ipynb`` that the save wrote; the ``.py`` is unchanged to the byte.

Run alone: ``make test-lab`` or ``pytest tests/test_lab.py`` (about a minute: JupyterLab takes 10-20 s to start).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "mtanet-lab-test"
CHAPTER = '''# %% [markdown]
# # A tiny chapter
#
# ```{note}
# Rendered by MyST.
# ```

# %% tags=["parameters"]
n: int = 5  # a number

# %%
print("tiny result", n * 7)
'''

pytestmark = pytest.mark.slow

#: True once the current notebook's kernel has started and answers (JupyterLab's own session state).
_KERNEL_IDLE = """() => {
    const widget = window.jupyterapp.shell.currentWidget;
    const kernel = widget && widget.sessionContext && widget.sessionContext.session
        && widget.sessionContext.session.kernel;
    return Boolean(kernel) && kernel.status === "idle" && widget.sessionContext.isReady;
}"""


def _make_lab_command() -> list[str]:
    """The ``jupyter lab`` options of the Makefile's lab target, so the test serves the way ``make lab`` does."""
    recipe = re.search(r"^lab:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "no lab target in the Makefile"
    text = recipe.group(1).replace("\\\n", " ")
    assert 'JUPYTER_CONFIG_PATH="$(CURDIR)/.jupyter"' in text, "make lab must put the project's .jupyter on the path"
    options = re.findall(r"--[\w.]+=\S+", text)
    assert '--ServerApp.root_dir="$(CURDIR)"' in options, "make lab must serve from the project root"
    return [o for o in options if not o.startswith("--ServerApp.root_dir")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, method: str = "GET") -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def test_a_chapter_opens_as_a_notebook_runs_saves_and_keeps_its_outputs(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (Debian package chromium, as root)")
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    shutil.copy2(ROOT / "jupytext.toml", project / "jupytext.toml")
    shutil.copytree(ROOT / ".jupyter", project / ".jupyter")
    source = project / "notebooks" / "01_tiny.py"
    source.write_text(CHAPTER)
    before = source.read_bytes()

    port = _free_port()
    # the user's own JupyterLab settings and saved workspaces stay out (a restored workspace reopens a file with the
    # viewer it had last time, whatever the default), and the test writes none into the home folder
    env = dict(os.environ, JUPYTER_CONFIG_PATH=str(project / ".jupyter"), JUPYTER_CONFIG_DIR=str(tmp_path / "user"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    log = (tmp_path / "lab.log").open("w")
    lab = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={project}",
         "--LabApp.expose_app_in_browser=True", *_make_lab_command()],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=project)
    try:
        for _ in range(120):  # the server answers within 10-30 s
            try:
                _api(port, "/api/status")
                break
            except OSError:
                if lab.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                # the landing page is the notebooks folder
                page.goto(f"http://127.0.0.1:{port}/?token={TOKEN}")
                page.wait_for_url(re.compile(r"/lab/tree/notebooks"), timeout=60_000)
                page.wait_for_selector(".jp-DirListing-item:has-text('01_tiny.py')", timeout=60_000)

                # the .py opens as a notebook by default, and MyST renders
                page.goto(f"http://127.0.0.1:{port}/lab/tree/notebooks/01_tiny.py?token={TOKEN}")
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell, .jp-MainAreaWidget .jp-FileEditor", timeout=60_000)
                assert page.locator(".jp-MainAreaWidget .jp-FileEditor").count() == 0, (
                    "the chapter opened as a text file, not as a notebook")
                page.wait_for_selector(".myst-admonition:has-text('Rendered by MyST.')", timeout=30_000)
                assert "{note}" not in page.locator(".jp-NotebookPanel").inner_text()

                # run only once the notebook's kernel is idle: a run-all sent while it still starts can be lost
                page.wait_for_function(_KERNEL_IDLE, timeout=120_000)
                page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
                page.wait_for_selector(".jp-OutputArea-output:has-text('tiny result 35')", timeout=60_000)
                page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
                paired = source.with_suffix(".ipynb")
                for _ in range(60):
                    if paired.exists() and "tiny result 35" in paired.read_text():
                        break
                    time.sleep(0.5)
                saved = nbformat.read(paired, as_version=4)
                outputs = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs]
                assert any("tiny result 35" in o.get("text", "") for o in outputs), "the .ipynb has no outputs"
                assert source.read_bytes() == before, "saving changed the .py source"

                # no kernel left: outputs seen from now on come from the .ipynb on disk
                for kernel in _api(port, "/api/kernels"):
                    _api(port, f"/api/kernels/{kernel['id']}", method="DELETE")
                page.close()
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/notebooks/01_tiny.py?token={TOKEN}")
                page.wait_for_selector(".jp-OutputArea-output:has-text('tiny result 35')", timeout=60_000)
            finally:
                browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(30)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
