# Two entry points on a fresh machine: `make book` and `make test`. Each creates .venv and installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
STAMP := $(VENV)/.installed

.PHONY: help install data book chromium test test-fast lab sync-notebooks clean

help:
	@echo "make book  [PROFILE=cpu|smoke|gpu]  execute every notebook with papermill and build book/_build/html"
	@echo "make test                          run the test suite (includes a smoke-profile book build)"
	@echo "make lab                           JupyterLab with the project's kernel; notebooks/*.py open as notebooks"
	@echo "make data  [PROFILE=...]           write the synthetic dataset data/synth-PROFILE if missing"

# The venv is rebuilt when the dependency declarations change. constraints.txt pins what gets installed.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name mtanet --display-name "Python (mtanet)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m mtanet.cli synth data/synth-$(PROFILE) --size $(PROFILE)

book: data
	$(PY) -m mtanet.book --profile $(PROFILE)
	@echo "open book/_build/html/index.html"

# Chromium renders the built pages in the book test; installed here (as root, as in CI) when missing.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium missing and not root: the rendered-page test will fail"

test: install chromium
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not book"

lab: install
	$(VENV)/bin/jupyter lab notebooks/

# Regenerate the paired .ipynb from the .py sources (never the other way: the .py files are the truth).
sync-notebooks: install
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

clean:
	rm -rf book/_build .pytest_cache
