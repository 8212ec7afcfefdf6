"""The decoder path on the real SmolLM2-135M-Instruct (Llama architecture, grouped-query
attention, tied embeddings): padding, the token the head reads, LoRA targets, the saved head,
merge = separate, the run's own copy of its converted base, the first position left out of the
mean, and bf16 base vs base."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from safetensors import safe_open

from conftest import needs_decoder
from lorascope import drift, modeling
from lorascope import representations as rep
from lorascope import similarity as sim
from lorascope.config_io import load_config
from lorascope.hparams import LoraMethodConfig
from lorascope.stages import with_inputs
from lorascope.study import run_stages
from lorascope.tasks import tokenize

pytestmark = needs_decoder
TEXTS = [
    "a gripping, beautifully shot film",
    "dull and slow",
    "the plot holds together until the last ten minutes",
    "yes, really",
    "not bad at all, though far too long",
] * 4


@pytest.fixture(scope="module")
def decoder(smollm2_dir):
    tokenizer = modeling.load_tokenizer(str(smollm2_dir))
    model = modeling.load_model(str(smollm2_dir), ("negative", "positive"), 0, tokenizer.pad_token_id)
    raw = datasets.Dataset.from_dict({"text": TEXTS, "label": [1, 0, 0, 1, 1] * 4, "example_id": list(range(20))})
    return model, tokenizer, tokenize(datasets.DatasetDict(train=raw), tokenizer, 32)["train"]


def test_pads_with_eos_on_the_right_and_the_head_reads_the_last_real_token(decoder):
    model, tokenizer, probe = decoder
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.eos_token_id and model.score.bias is None
    features, layers = rep.pooled_features(
        model, probe, tokenizer=tokenizer, layers=None, poolings=("head",), batch_size=8
    )
    assert layers == list(range(31))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(model.score(features["head"][-1]), logits, atol=1e-4, rtol=1e-4)


def test_lora_targets_q_and_v_with_grouped_query_attention(decoder, smollm2_dir):
    model = modeling.load_model(str(smollm2_dir), ("negative", "positive"), 0, decoder[1].pad_token_id)
    lora = modeling.prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3, r=8, alpha=16))
    peft = lora.peft_config["default"]
    assert set(peft.target_modules) == {"q_proj", "v_proj"} and "score" in peft.modules_to_save
    attention = lora.base_model.model.model.layers[0].self_attn
    assert tuple(attention.q_proj.lora_B["default"].weight.shape) == (576, 8)
    assert tuple(attention.v_proj.lora_B["default"].weight.shape) == (192, 8)  # 3 key-value heads x 64
    trainable, _total = modeling.count_parameters(lora)
    assert trainable == 30 * ((8 * 576 + 576 * 8) + (8 * 576 + 192 * 8)) + 2 * 576


def test_trained_head_is_saved_with_the_adapter_and_merged_equals_separate(
    smollm2_dir, bundled_cache, monkeypatch, tmp_path
):
    """Trained through the alias: the run names the study's copy of the converted base (no Hub
    checkpoint holds these dequantized weights), which AutoPeft loads from the study folder."""
    monkeypatch.setenv("LORASCOPE_CACHE", str(bundled_cache))
    config = load_config(
        None,
        "smoke",
        [
            "model.name=smollm2-135m",
            "model.max_length=32",
            "tasks={sst2: {train_max: 16, eval_max: 16}}",
            "data.dev_max=8",
            "data.probe_size=8",
            "methods=[lora]",
            "runtime.progress=false",
            "training.lora.batch_size=8",
            "training.lora.lr=1e-3",
        ],
    )
    study = run_stages(config, tmp_path, with_inputs("train"))
    run = study.run_dir("sst2", "lora", 42)
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    head = next(v for k, v in saved.items() if k.endswith("score.weight"))
    tokenizer = modeling.load_tokenizer(str(smollm2_dir))
    base = modeling.load_model(str(smollm2_dir), ("negative", "positive"), 42, tokenizer.pad_token_id)
    assert not torch.equal(head, base.score.weight.detach())  # trained away from its seed-42 initialisation
    separate = modeling.load_adapter(base, str(run))
    merged = modeling.load_run_model(run, "smollm2-135m", ("negative", "positive"), tokenizer.pad_token_id)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, separate(**batch).logits, atol=1e-4, rtol=1e-4)

    named = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == f"base/smollm2-135m-{modeling.folder_digest(str(smollm2_dir))[7:19]}"
    assert (tmp_path / named / "model.safetensors").read_bytes() == (smollm2_dir / "model.safetensors").read_bytes()
    card = (run / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "no Hub checkpoint" in card
    monkeypatch.chdir(tmp_path)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(
        "runs/sst2/lora/seed42",
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, separate(**batch).logits, atol=1e-4, rtol=1e-4)


def test_the_massive_first_position_is_left_out_of_the_mean(decoder):
    model, tokenizer, probe = decoder
    default, _ = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=[1, 15, 30], poolings=("mean",))
    kept, _ = rep.pooled_features(
        model, probe, tokenizer=tokenizer, layers=[1, 15, 30], poolings=("mean",), skip_first_position=False
    )
    share = default[rep.EXCLUDED_SHARE].mean(dim=1)
    assert share[1] > 0.5 and share[1] > 2 * max(share[0], share[2])  # layer 15: most of the norm mass
    assert rep.EXCLUDED_SHARE not in kept
    assert sim.linear_cka(default["mean"][1], kept["mean"][1]) < 0.99  # the first position changes the feature


def test_bf16_base_vs_base_stays_within_the_bf16_tolerance(decoder):
    model, tokenizer, probe = decoder
    for bf16 in (False, True):
        a, layers = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=None, batch_size=8, bf16=bf16)
        b, _ = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=None, batch_size=3, bf16=bf16)
        for pooling in ("mean", "head"):
            worst = max(abs(1 - sim.linear_cka(a[pooling][i], b[pooling][i])) for i in range(len(layers)))
            assert worst <= drift.BASE_VS_BASE_TOLERANCE[bf16], (bf16, pooling, worst)
