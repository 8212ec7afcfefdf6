import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from lorascope import weights

D = torch.float64


def test_relative_update_on_hand_values():
    base = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ‖W‖_F = 5
    assert weights.relative_update(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), base) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="base weight is all zeros"):
        weights.relative_update(base, torch.zeros(2, 2))


def test_effective_rank():
    assert weights.effective_rank(torch.eye(8)) == pytest.approx(8.0, abs=1e-10)
    g = torch.Generator().manual_seed(0)
    rank_one = torch.outer(torch.randn(16, generator=g, dtype=D), torch.randn(12, generator=g, dtype=D))
    assert weights.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-10)
    p = (0.75, 0.25)  # singular values 3 and 1
    assert weights.effective_rank(torch.diag(torch.tensor([3.0, 1.0, 0.0]))) == pytest.approx(
        math.exp(-sum(q * math.log(q) for q in p)), abs=1e-12
    )
    assert weights.effective_rank(torch.zeros(4, 3)) == 0.0


def _base_matrix(rows=64, cols=48):
    """W = U diag(s) Vᵀ with well-separated singular values, so its singular vectors are stable."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=D))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=D))
    s = torch.linspace(10.0, 1.0, cols, dtype=D)
    return u[:, :cols] @ torch.diag(s) @ v.T, u, v


def test_intruder_dimensions():
    w, u, v = _base_matrix()
    assert weights.intruder_dimensions(w, w) == 0
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    assert weights.intruder_dimensions(w + 1e-3 * noise, w) == 0
    # A strong rank-1 direction spread over the directions outside W's top 10 on both sides.
    g = torch.Generator().manual_seed(2)
    left = u[:, 10:] @ torch.randn(u.shape[1] - 10, generator=g, dtype=D)
    right = v[:, 10:] @ torch.randn(v.shape[1] - 10, generator=g, dtype=D)
    spike = 30.0 * torch.outer(left / left.norm(), right / right.norm())
    assert weights.intruder_dimensions(w + spike, w) == 1
    assert weights.intruder_dimensions(w + spike, w, epsilon=0.0) == 0
    with pytest.raises(ValueError, match="shapes differ"):
        weights.intruder_dimensions(w, w.T)


def test_layer_index_and_block_selection():
    assert weights.layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert weights.layer_index("model.layers.3.self_attn.q_proj") == 3
    assert weights.layer_index("transformer.h.2.attn.c_attn") == 2
    assert weights.layer_index("bert.pooler.dense") is None
    assert not weights.in_block("bert.embeddings.word_embeddings")


@pytest.fixture(scope="module")
def peft_bert(tiny_bert_dir, tmp_path_factory):
    """A LoRA-wrapped tiny BERT classifier with non-zero B, saved the way training saves it."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    def build(use_rslora: bool):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier", "pooler"],
            use_rslora=use_rslora,
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, config)
        folder = tmp_path_factory.mktemp("adapter")
        peft_model.save_pretrained(folder)
        return peft_model, base_state, load_file(folder / "adapter_model.safetensors")

    return build


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_deltas_equal_merged_minus_base(peft_bert, use_rslora):
    peft_model, base_state, saved = peft_bert(use_rslora)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in saved
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    deltas = list(weights.lora_deltas(saved, base_state, alpha=8, r=4, use_rslora=use_rslora))
    assert [name for name, _, _ in deltas] == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    ]
    for name, base, delta in deltas:
        assert base.dtype == delta.dtype == D
        expected = merged[name + ".weight"].double() - base_state[name + ".weight"].double()
        assert delta.abs().max() > 0.1
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)


def test_lora_deltas_from_memory_keys_and_a_backbone_checkpoint(peft_bert, tiny_bert_dir):
    peft_model, base_state, saved = peft_bert(False)
    in_memory = {k: v.detach() for k, v in peft_model.state_dict().items()}
    assert any(k.endswith("query.lora_A.default.weight") for k in in_memory)
    backbone = load_file(tiny_bert_dir / "model.safetensors")  # keys lack the `bert.` prefix
    reference = {name: delta for name, _, delta in weights.lora_deltas(saved, base_state, 8, 4)}
    for state, base in ((in_memory, base_state), (saved, backbone)):
        got = {name.removeprefix("bert."): d for name, _, d in weights.lora_deltas(state, base, 8, 4)}
        assert got.keys() == {name.removeprefix("bert.") for name in reference}
        for name, delta in reference.items():
            torch.testing.assert_close(got[name.removeprefix("bert.")], delta, rtol=0, atol=0)


def test_lora_deltas_reject_what_they_cannot_represent(peft_bert):
    _, base_state, saved = peft_bert(False)
    with pytest.raises(ValueError, match="lora_A has rank 4, expected r=8"):
        list(weights.lora_deltas(saved, base_state, alpha=8, r=8))
    magnitude = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    dora = dict(saved, **{magnitude: torch.ones(32)})
    with pytest.raises(ValueError, match="not a plain LoRA weight"):
        list(weights.lora_deltas(dora, base_state, alpha=8, r=4))
    with pytest.raises(ValueError, match="no matching weight in the base model"):
        list(weights.lora_deltas(saved, {"other.weight": torch.zeros(2, 2)}, alpha=8, r=4))


def test_full_deltas_select_block_matrices(peft_bert):
    _, base_state, _ = peft_bert(False)
    g = torch.Generator().manual_seed(0)
    ft_state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_state.items()}
    deltas = list(weights.full_deltas(ft_state, base_state))
    names = [name for name, _, _ in deltas]
    assert len(names) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all(weights.in_block(n) for n in names)
    for name, _base, delta in deltas:
        torch.testing.assert_close(delta, (ft_state[name + ".weight"] - base_state[name + ".weight"]).double())
    everything = [name for name, _, _ in weights.full_deltas(ft_state, base_state, include=lambda name: True)]
    assert {"bert.embeddings.word_embeddings", "bert.pooler.dense", "classifier"} <= set(everything)
    with pytest.raises(ValueError, match="no weight matrices in common"):
        list(weights.full_deltas({"x.weight": torch.zeros(2, 2)}, base_state))


def test_weight_change_rows():
    w, _, _ = _base_matrix(16, 12)
    update = 0.01 * torch.outer(torch.ones(16, dtype=D), torch.ones(12, dtype=D))
    deltas = iter([("model.layers.3.self_attn.q_proj", w, update), ("model.norm_proj", w, 2 * update)])
    first, second = weights.weight_change_rows(deltas)
    assert first == {
        "module": "model.layers.3.self_attn.q_proj",
        "layer": 3,
        "kind": "q_proj",
        "rows": 16,
        "cols": 12,
        "relative_update": pytest.approx(update.norm().item() / w.norm().item()),
        "effective_rank": pytest.approx(1.0),
        "intruder_dimensions": 0,
    }
    assert second["layer"] is None and second["relative_update"] == pytest.approx(2 * first["relative_update"])
    cache = {}
    spike = 5 * torch.outer(torch.eye(16, dtype=D)[0], torch.eye(12, dtype=D)[0])
    for _ in range(2):  # the second run of the same base reads the cached base singular vectors
        rows = weights.weight_change_rows(
            iter([("model.layers.3.self_attn.q_proj", w, update + spike)]), base_vectors=cache
        )
        assert rows[0]["intruder_dimensions"] == weights.intruder_dimensions(w + update + spike, w)
    assert list(cache) == ["model.layers.3.self_attn.q_proj"] and cache[rows[0]["module"]].shape == (16, 12)
