import pytest
import torch

from lorascope import modeling
from lorascope.config_io import load_config
from lorascope.errors import InputError
from lorascope.hparams import LoraMethodConfig, MethodConfig

LABELS = ("negative", "positive")


def _model(path, seed=42):
    tokenizer = modeling.load_tokenizer(str(path))
    return modeling.load_model(str(path), LABELS, seed, tokenizer.pad_token_id), tokenizer


def test_head_is_a_function_of_the_seed(tiny_bert_dir):
    a, _ = _model(tiny_bert_dir, seed=42)
    torch.randn(1000)  # whatever ran before must not matter
    b, _ = _model(tiny_bert_dir, seed=42)
    c, _ = _model(tiny_bert_dir, seed=1337)
    head_a, head_b, head_c = (modeling.head_parameters(m) for m in (a, b, c))
    assert set(head_a) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    assert not torch.equal(head_a["classifier.weight"], head_c["classifier.weight"])
    assert head_a["classifier.weight"].std().item() == pytest.approx(0.02, rel=0.3)  # initializer_range


def test_lora_init_is_a_function_of_the_seed_alone(tiny_bert_dir):
    def adapter(seed, draws_before):
        torch.rand(draws_before)  # whatever the process ran before must not matter
        lora = modeling.prepare_for_method(_model(tiny_bert_dir)[0], "lora", LoraMethodConfig(lr=1e-3), seed)
        return {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_A" in n}

    a, b, c = adapter(42, 0), adapter(42, 1000), adapter(7, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], c[next(iter(c))])
    model = _model(tiny_bert_dir)[0]
    state = torch.random.get_rng_state()
    modeling.prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3), 42)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is untouched


def test_lora_wraps_query_value_and_trains_the_head(tiny_bert_dir):
    model, _ = _model(tiny_bert_dir)
    hidden, layers, r = 32, 2, 4
    lora = modeling.prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3, r=r))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("query.lora_A" in n for n in trainable) and any("value.lora_B" in n for n in trainable)
    assert not any("key.lora" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("pooler.modules_to_save" in n for n in trainable)  # BERT reads CLS through its pooler
    lora_params = 2 * layers * 2 * hidden * r  # q and v, A and B, per layer
    head = 2 * hidden + 2 + hidden * hidden + hidden  # classifier + pooler
    assert modeling.count_parameters(lora)[0] == lora_params + head


def test_lora_targets_can_be_overridden_and_bad_ones_are_named(tiny_bert_dir):
    model, _ = _model(tiny_bert_dir)
    lora = modeling.prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3, target_modules=["key"]))
    assert any("key.lora_A" in n for n, _ in lora.named_parameters())
    model, _ = _model(tiny_bert_dir)
    with pytest.raises(InputError, match="target_modules"):
        modeling.prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3, target_modules=["nope"]))


def test_head_only_freezes_the_backbone(tiny_bert_dir):
    model, _ = _model(tiny_bert_dir)
    model = modeling.prepare_for_method(model, "head", MethodConfig(lr=1e-3))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]


def test_weights_are_fp32(tiny_bert_dir):
    model, _ = _model(tiny_bert_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_decoder_pads_with_eos_on_the_right_and_reads_the_last_real_token(tiny_llama_dir):
    model, tokenizer = _model(tiny_llama_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    model.eval()
    short, long = "a short one", "a much longer sentence that needs no padding at all"
    batch = tokenizer([short, long], padding=True, return_tensors="pt")
    alone = tokenizer([short], return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    with torch.no_grad():
        padded = model(**batch).logits[0]
        single = model(**alone).logits[0]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-4)


def test_paper_profile_builds_on_a_tiny_llama_of_the_same_architecture(tiny_llama_dir):
    config = load_config(None, "paper", [f"model.name={tiny_llama_dir}"])
    model, tokenizer = _model(tiny_llama_dir)
    assert model.config.model_type == "llama"
    lora = modeling.prepare_for_method(model, "lora", config.training.lora)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    assert lora.peft_config["default"].r == 8
    assert any("score.modules_to_save" in n for n, p in lora.named_parameters() if p.requires_grad)
    # one step with gradient checkpointing, as the paper profile trains
    lora.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora.train()
    batch = tokenizer(["one", "two words"], padding=True, return_tensors="pt")
    loss = lora(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_missing_model_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no model found"):
        modeling.resolve_model_path(str(tmp_path / "nothing"))
