# Two entry points on a fresh machine: `make book` and `make test`. Each creates .venv and installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
STAMP := $(VENV)/.installed

.PHONY: help install data book publish sweep reference-sweep bench chromium test test-fast test-lab lab sync-notebooks clean

help:
	@echo "make book  [PROFILE=cpu|smoke|gpu]  execute every notebook with papermill and build book/_build/html"
	@echo "make test                          run the test suite (includes a smoke-profile book build)"
	@echo "make sweep [PROFILE=cpu|smoke|gpu]  the ablation sweep (chapter 05 alone): resumes, skips finished runs"
	@echo "make reference-sweep [HOURS=3]      the committed ablation sweep (hours; resumes; writes book/results/)"
	@echo "make bench                         speed and memory benchmarks, ratios against their goals"
	@echo "make publish DIR=folder            copy the built HTML book to a folder for any static host"
	@echo "make test-lab                      JupyterLab in headless Chromium: run, save, reopen a chapter"
	@echo "make lab                           JupyterLab with the project's kernel; notebooks/*.py open as notebooks"
	@echo "make data  [PROFILE=...]           write the synthetic dataset data/synth-PROFILE if missing"

# The venv is rebuilt when the dependency declarations change. constraints.txt pins what gets installed.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@free_gb=$$(( $$(df -Pk . | awk 'NR==2 {print $$4}') / 1048576 )); [ $$free_gb -ge 8 ] || \
	  echo "warning: $$free_gb GB free here; the environment takes about 7 GB (torch's CUDA wheel alone 5.5 GB)" >&2
	$(PY) -m pip install -q --no-cache-dir --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name mtanet --display-name "Python (mtanet)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m mtanet.cli synth data/synth-$(PROFILE) --size $(PROFILE)

book: data
	$(PY) -m mtanet.book --profile $(PROFILE)
	@echo "open book/_build/html/index.html"

# A self-contained copy of the book built by `make book` (no page loads anything from the network), for any static
# host; DIR may be missing, empty or an earlier copy. GitHub Pages: .github/workflows/pages.yml does it on a push.
publish: install
	@test -n "$(DIR)" || { echo "usage: make publish DIR=folder" >&2; exit 2; }
	$(PY) -m mtanet.book --publish "$(DIR)"

# The ablation chapter alone: it runs the sweep (mtanet.sweep.run_sweep), which skips runs with stored results.
sweep: data
	$(PY) -m mtanet.book --profile $(PROFILE) --only 05_ablations --no-html

# The reference sweep chapter 05's verdicts rest on (notebooks/params/05_ablations/reference.yaml): seed by seed,
# book/results/ablations-reference.json rewritten after every run; stop it any time, commit the file, start again.
HOURS ?= 0
reference-sweep:
	$(MAKE) data PROFILE=cpu
	$(PY) -m mtanet.book --reference-sweep --hours $(HOURS)

# Chromium renders the built pages in the book test; installed here (as root, as in CI) when missing.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium missing and not root: the rendered-page test will fail"

# The wall time of a passing run is recorded for the benchmarks' report (book/_build is not tracked).
test: install chromium
	@start=$$(date +%s); $(PY) -m pytest -q; mkdir -p book/_build; \
	  echo "{\"make_test_seconds\": $$(( $$(date +%s) - start )), \"date\": \"$$(date +%F)\"}" > book/_build/timings-test.json

# Speed and memory against their goals, as ratios measured side by side (under 10 minutes on 2 cores).
bench: data
	$(PY) benchmarks/run_all.py

test-fast: install
	$(PY) -m pytest -q -m "not book"

# JupyterLab at the project root, so that jupytext finds jupytext.toml (a save writes the paired, git-ignored .ipynb
# with its outputs), opening in notebooks/. .jupyter/ (on JUPYTER_CONFIG_PATH) opens .py files as notebooks.
# (Jupyter refuses to run as root without --allow-root: containers and CI run as root.)
lab: install
	JUPYTER_CONFIG_PATH="$(CURDIR)/.jupyter" $(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" \
	  --LabApp.default_url=/lab/tree/notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# JupyterLab driven in headless Chromium: open a chapter, run it, save, reopen (about a minute)
test-lab: install chromium
	$(PY) -m pytest -q tests/test_lab.py

# Regenerate the paired .ipynb from the .py sources (never the other way: the .py files are the truth).
sync-notebooks: install
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

clean:
	rm -rf book/_build .pytest_cache
