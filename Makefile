# The README's two commands: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use and install the pinned versions (constraints.txt keeps
# torch on its CPU build: without the pin pip would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-quick test test-integration lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/post demo --out runs/demo

demo-quick: $(STAMP)
	$(BIN)/post demo --quick --out runs/demo-quick

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

bench: $(STAMP)
	$(BIN)/python bench/scoring.py

clean:
	rm -rf $(VENV) runs .pytest_cache
