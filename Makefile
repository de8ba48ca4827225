# sapl: two commands on a fresh machine.
#   make demo  - install, then run the main job on the phantom and write reports/
#   make test  - install, then run every test (notebooks + unit tests)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sapl-installed
export OMP_NUM_THREADS ?= 2
export MPLBACKEND := Agg
export PYTHONUNBUFFERED := 1

.PHONY: install test demo reproduce docs export clean-cache help

help:
	@echo "make demo | make test | make reproduce | make docs"

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

export: install
	$(BIN)/nbdev_export

# The library is generated from nbs/: exporting must leave the tree unchanged.
test: install
	$(BIN)/nbdev_export
	@git diff --quiet -- sapl || { git status --short -- sapl; echo "nbdev_export changed sapl/: run nbdev_export and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- sapl)" || { git status --short -- sapl; echo "untracked files in sapl/"; exit 1; }
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

REPRO := $(BIN)/python -c 'import sys; from sapl.reproduce import main; main(sys.argv[1:])'

demo: install
	$(REPRO) --demo

reproduce: install
	$(REPRO) $(ARGS)
	$(REPRO) --table-v $(ARGS_V)

docs: install
	$(BIN)/python -m pip install -q -e ".[docs]"
	$(BIN)/python tools/build_docs.py

clean-cache:
	rm -rf data/*/.cache
