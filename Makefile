# One command to set up and run the default CPU study, one to set up and pass the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
GLUE    ?= $(abspath ../shared/data/glue)
export LORASCOPE_GLUE := $(GLUE)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup study test bench clean

$(BIN)/lorascope: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0   # first and pinned: an unpinned torch pulls CUDA
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/lorascope

study: setup
	$(BIN)/lorascope run --profile quick --out studies/quick

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) studies
