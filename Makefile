# sapl: two commands on a fresh machine.
#   make demo  - install, then run the main job on the phantom and write reports/
#   make test  - install, then run every test (notebooks, unit tests, every method at 512 px)
#   make docs-check - build the docs site, then check it and the JupyterLab explorer in headless Chromium
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sapl-installed
export OMP_NUM_THREADS ?= 2
export MPLBACKEND := Agg
export PYTHONUNBUFFERED := 1
export PYTHONUTF8 := 1

.PHONY: install test test-fast demo reproduce docs docs-check lab scripts export clean-cache help

help:
	@echo "make demo | make test | make test-fast | make reproduce | make docs | make docs-check | make lab | make scripts"

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

export: install
	$(BIN)/nbdev_export
	$(BIN)/python tools/sync_scripts.py

# scripts/*.py: the notebooks as py:percent files (jupytext), for plain-text review; tests/test_scripts.py checks them.
scripts: install
	$(BIN)/python tools/sync_scripts.py

# glibc keeps freed memory for reuse instead of handing every large tensor back to the kernel and faulting fresh
# zeroed pages in for the next one (SA-CPS at 512 px: 139 -> 112 CPU s, peak memory 10.5 -> 13.7 GB).
TEST_ENV := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
PYTEST := $(TEST_ENV) $(BIN)/python -m pytest tests -q -p no:cacheprovider

# The library is generated from nbs/: exporting must leave the tree unchanged.
test: install
	$(BIN)/nbdev_export
	@git diff --quiet -- sapl || { git status --short -- sapl; echo "nbdev_export changed sapl/: run nbdev_export and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- sapl)" || { git status --short -- sapl; echo "untracked files in sapl/"; exit 1; }
	$(PYTEST)

# Every test but the 512-px tier (every registered method at 512 px with the paper's SEAN, tests marked slow).
test-fast: install
	$(PYTEST) -m "not slow"

REPRO := $(BIN)/python -c 'import sys; from sapl.reproduce import main; main(sys.argv[1:])'

demo: install
	$(REPRO) --demo

# The Table V analogue follows a full reproduction; with ARGS (a chosen subset) it runs only when ARGS_V is given.
reproduce: install
	$(REPRO) $(ARGS)
	@if [ -z "$(ARGS)" ] || [ -n "$(ARGS_V)" ]; then $(REPRO) --table-v $(ARGS_V); fi

DOCS_STAMP := $(VENV)/.sapl-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	@touch $(DOCS_STAMP)

# The site is built offline from the notebooks executed with the smoke profile; MathJax comes from the npm registry
# once (build/docs/), so npm is installed from Debian when missing.
docs: $(DOCS_STAMP)
	@command -v npm >/dev/null || { echo "installing npm from Debian (to fetch MathJax once)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	$(BIN)/python tools/build_docs.py

# Real-browser checks (headless Debian chromium, network blocked): the SA-CPS page, and the explorer in JupyterLab.
CHROMIUM ?= /usr/bin/chromium
docs-check: docs
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	SAPL_CHROMIUM=$(CHROMIUM) $(BIN)/python tools/check_docs.py

# JupyterLab on the project's kernel (python3 of .venv, where sapl is installed); figures inline.
lab: install
	env -u MPLBACKEND $(BIN)/jupyter lab --ip=127.0.0.1 --MappingKernelManager.default_kernel_name=python3 \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean-cache:
	rm -rf data/*/.cache
