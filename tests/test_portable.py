"""Run folders that move: a LoRA run names its base so that it loads on a machine without the
training virtualenv or caches, onto exactly the weights it was trained on. The bundled MiniLM
is named by the Hub revision it is a bit-identical copy of (loaded here from a Hub cache the
test lays out); a converted base (a small stand-in for SmolLM2's GGUF conversion) is copied
once into the study, which then moves to another path and loads without the alias."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForSequenceClassification

from lorascope import bundled, modeling, runs, training
from lorascope.artifacts import CARD
from lorascope.bundled import MINILM_HUB, BundledModel, hub_copy, resolve_bundled
from lorascope.config_io import load_config
from lorascope.evaluation import evaluate
from lorascope.prepared import load_prepared
from lorascope.stages import BY_NAME, with_inputs
from lorascope.study import is_current, run_stages, stamp_of

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["a gripping, funny film", "dull and far too long", "not bad at all", "yes"]
LABELS = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}


def hub_cache(root: Path, repo_id: str, revision: str, folder: Path) -> Path:
    """A Hub cache (HF_HUB_CACHE's layout) holding a copy of `folder` as `repo_id` at `revision`,
    which is also its refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


@pytest.fixture
def cache_at(monkeypatch):
    """Points the Hub cache at a folder (transformers and huggingface_hub read it at call time)."""
    return lambda folder: monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def machine_paths(*more: Path) -> list[str]:
    """Paths of this machine a portable run folder must not name: the virtualenv, the home
    cache, lorascope's conversion cache, and `more`."""
    paths = {Path(sys.prefix), Path.home() / ".cache", bundled.cache_root(), *more}
    return sorted({str(p) for p in paths} | {str(p.resolve()) for p in paths})


def assert_names_no_machine_path(run: Path, *more: Path) -> None:
    for file in [*run.glob("*.json"), run / CARD]:
        text = file.read_text()
        for path in machine_paths(*more):
            assert path not in text, (file.name, path)


# ---------------------------------------------------------------- MiniLM: the Hub's revision


def test_the_bundled_minilm_is_the_hub_revision_bit_for_bit():
    """The digests are the Hub's at that revision (model.safetensors': its LFS object id,
    90,868,376 bytes); the bundled files have them, so the alias claims the Hub id."""
    folder = Path(resolve_bundled("minilm-l6"))
    assert MINILM_HUB.repo_id == MINILM_ID and MINILM_HUB.revision == "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
    weights = MINILM_HUB.sha256["model.safetensors"]
    assert weights == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    assert (folder / "model.safetensors").stat().st_size == 90_868_376
    for name, sha in MINILM_HUB.sha256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha, name
    assert hub_copy("minilm-l6") == hub_copy(MINILM_ID) == MINILM_HUB


def test_the_hub_id_resolves_to_the_bundled_copy_offline(cache_at, tmp_path):
    cache_at(tmp_path / "empty-hub-cache")
    folder = resolve_bundled("minilm-l6")
    assert modeling.resolve_model_path(MINILM_ID) == folder
    assert modeling.model_identity(MINILM_ID) == MINILM_ID  # a name, never this machine's folder
    assert modeling.load_tokenizer(MINILM_ID)("a film")["input_ids"] == [101, 1037, 2143, 102]


def test_a_package_with_other_bytes_claims_no_hub_id(monkeypatch):
    """Another version of the package may ship other weights: then the Hub id is not claimed."""
    other = dataclasses.replace(MINILM_HUB, sha256={**MINILM_HUB.sha256, "model.safetensors": "0" * 64})
    monkeypatch.setitem(
        bundled.BUNDLED_MODELS, "minilm-l6", dataclasses.replace(bundled.BUNDLED_MODELS["minilm-l6"], hub=other)
    )
    assert hub_copy("minilm-l6") is None and hub_copy(MINILM_ID) is None
    assert resolve_bundled(MINILM_ID) is None  # the Hub (or its cache) serves the id then
    assert modeling.resolve_model_path(MINILM_ID) == MINILM_ID


@pytest.fixture
def minilm_run(tmp_path) -> tuple[Path, datasets.Dataset]:
    """A LoRA run of the bundled MiniLM, two steps on 16 SST-2 examples, and its eval split."""
    config = load_config(
        None,
        "smoke",
        [
            "model.max_length=32",
            "tasks={sst2: {train_max: 16, eval_max: 16}}",
            "data.dev_max=8",
            "data.probe_size=8",
            "runtime.progress=false",
        ],
    )
    study = run_stages(config, tmp_path / "study", [BY_NAME["prepare"]])
    task, splits = load_prepared(study, "sst2")
    run = tmp_path / "run"
    training.train_run(
        runs.run_setup(config, task, "lora", 42, max_steps=2), splits, modeling.load_tokenizer("minilm-l6"), run
    )
    return run, splits["eval"]


def test_a_minilm_lora_run_loads_from_a_hub_cache_alone(minilm_run, cache_at, tmp_path):
    """AutoPeft reads the Hub id and revision, finds them in a Hub cache holding copies of the
    files (not the virtualenv's), and reproduces the run's own eval probabilities; lorascope's
    loader, given the name read back from adapter_config.json, builds the same model."""
    run, eval_split = minilm_run
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (MINILM_ID, MINILM_HUB.revision)
    assert ModelCard.load(run / CARD).data.base_model == MINILM_ID
    assert_names_no_machine_path(run, Path(resolve_bundled("minilm-l6")))

    cache_at(tmp_path / "empty")
    with pytest.raises(OSError):  # offline, the base comes from the cache or from nowhere
        AutoPeftModelForSequenceClassification.from_pretrained(run, **LABELS, pad_token_id=0)
    cache_at(hub_cache(tmp_path / "hub", MINILM_ID, MINILM_HUB.revision, Path(resolve_bundled("minilm-l6"))))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(run, **LABELS, pad_token_id=0)

    tokenizer = modeling.load_tokenizer("minilm-l6")
    scored = evaluate(
        loaded, eval_split, tokenizer=tokenizer, num_labels=2, batch_size=8, device=torch.device("cpu"), bf16=False
    )
    probs = ["prob_0", "prob_1"]
    saved = pd.read_csv(run / "predictions.csv")
    np.testing.assert_allclose(scored.predictions[probs], saved[probs], atol=1e-5)
    own = modeling.load_run_model(run, adapter["base_model_name_or_path"], ("negative", "positive"), 0)
    torch.testing.assert_close(logits(loaded, tokenizer), logits(own, tokenizer), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- a plain Hub id


def test_a_hub_id_is_recorded_at_the_revision_it_was_loaded_from(tiny_study_config, tiny_bert_dir, cache_at, tmp_path):
    revision = "a" * 40
    cache_at(hub_cache(tmp_path / "hub", "lorascope-test/tiny-bert", revision, tiny_bert_dir))
    config = tiny_study_config("model.name=lorascope-test/tiny-bert", "runtime.workers=1", "methods=[lora]")
    run = run_stages(config, tmp_path / "study", with_inputs("train")).run_dir("sst2", "lora", 42)
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("lorascope-test/tiny-bert", revision)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(run, **LABELS, pad_token_id=0)
    tokenizer = modeling.load_tokenizer("lorascope-test/tiny-bert")
    own = modeling.load_run_model(run, "lorascope-test/tiny-bert", ("negative", "positive"), 0)
    torch.testing.assert_close(logits(loaded, tokenizer), logits(own, tokenizer), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- a converted base: the study's copy


@pytest.fixture
def converted(monkeypatch, tmp_path, tiny_llama_dir) -> Path:
    """A bundled alias `tiny-gguf` converted (as bundled.build_folder converts a GGUF file, the
    conversion replaced by a copy of the tiny Llama) into a conversion cache of its own."""
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "conversions" / "tiny-gguf-0123"
    monkeypatch.setattr(
        bundled, "_convert_gguf", lambda _, out: shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    )
    bundled.build_folder(folder, gguf, hashlib.sha256(b"GGUF").hexdigest(), "tiny-gguf 1.0")
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "tiny-gguf", BundledModel(("torch",), "nothing", lambda *_: folder))
    return folder


def test_a_converted_base_is_copied_once_and_the_moved_study_loads_without_it(
    converted, tiny_study_config, cache_at, monkeypatch, tmp_path
):
    config = tiny_study_config("model.name=tiny-gguf", "runtime.workers=1", "seeds=[42, 7]")
    study = run_stages(config, tmp_path / "study", with_inputs("train"))
    (base,) = [p for p in (study.root / "base").iterdir() if not p.name.startswith(".")]  # one for both runs
    assert base.name == f"tiny-gguf-{modeling.folder_digest(str(converted))[7:19]}"
    assert is_current(base, stamp_of(base)) and stamp_of(base) == modeling.folder_digest(str(converted))
    for file in converted.iterdir():
        assert (base / file.name).read_bytes() == file.read_bytes(), file.name  # the weights trained on
    pad = modeling.load_tokenizer("tiny-gguf").pad_token_id
    reference = {}
    for seed in (42, 7):
        run = study.run_dir("sst2", "lora", seed)
        adapter = json.loads((run / "adapter_config.json").read_text())
        assert (adapter["base_model_name_or_path"], adapter["revision"]) == (f"base/{base.name}", None)
        card = ModelCard.load(run / CARD)
        assert card.data.base_model is None and "no Hub checkpoint" in card.text and "tiny.Q4_1.gguf" in card.text
        own = modeling.load_run_model(run, "tiny-gguf", ("negative", "positive"), pad)
        reference[seed] = logits(own, modeling.load_tokenizer("tiny-gguf"))
    for run in [study.run_dir("sst2", m, 42) for m in ("lora", "full")]:
        assert_names_no_machine_path(run, study.root, converted)

    moved = tmp_path / "elsewhere" / "study"  # another path, and neither the alias nor its conversion
    shutil.move(study.root, moved)
    shutil.rmtree(converted.parent)
    monkeypatch.delitem(bundled.BUNDLED_MODELS, "tiny-gguf")
    cache_at(tmp_path / "empty-hub-cache")
    for seed in (42, 7):
        run = moved / "runs" / "sst2" / "lora" / f"seed{seed}"
        code = ModelCard.load(run / CARD).text.split("```python\n")[1].split("```")[0]
        names = {"run_dir": str(run)}
        monkeypatch.chdir(tmp_path)
        exec(code, names)  # the card's lines, from outside the study
        torch.testing.assert_close(logits(names["model"], names["tokenizer"]), reference[seed], atol=1e-5, rtol=1e-5)
        monkeypatch.chdir(moved)  # from the study folder, AutoPeft finds base/ as adapter_config.json names it
        loaded = AutoPeftModelForSequenceClassification.from_pretrained(
            f"runs/sst2/lora/seed{seed}", **LABELS, pad_token_id=pad
        )
        torch.testing.assert_close(logits(loaded, names["tokenizer"]), reference[seed], atol=1e-5, rtol=1e-5)
