import datasets
import pytest
import torch

from lorascope import modeling
from lorascope import representations as rep
from lorascope.config import RepresentConfig
from lorascope.errors import InputError
from lorascope.tasks import tokenize

TEXTS = ["a fine film", "dull", "the plot holds together until the last ten minutes", "yes", "not bad at all"]


def _probe(tokenizer):
    raw = datasets.Dataset.from_dict({"text": TEXTS, "label": [1, 0, 1, 1, 0], "example_id": list(range(5))})
    return tokenize(datasets.DatasetDict(train=raw), tokenizer, 32)["train"]


def _setup(path):
    tokenizer = modeling.load_tokenizer(str(path))
    return modeling.load_model(str(path), ("n", "p"), 0, tokenizer.pad_token_id), tokenizer


def _states_alone(model, tokenizer, text):
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states, batch["input_ids"][0]


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_features_do_not_depend_on_batching_and_match_each_example_alone(fixture, request):
    model, tokenizer = _setup(request.getfixturevalue(fixture))
    probe = _probe(tokenizer)
    batched, layers = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=None, batch_size=5)
    single, _ = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=None, batch_size=1)
    assert layers == [0, 1, 2] and batched["mean"].shape == (3, 5, 32)
    for pooling in ("mean", "head"):
        torch.testing.assert_close(batched[pooling], single[pooling], atol=1e-5, rtol=1e-5)
    last = fixture == "tiny_llama_dir"
    assert rep.head_reads_last_token(model) is last
    hidden, _ = _states_alone(model, tokenizer, TEXTS[2])
    pooled = slice(1, None) if last else slice(None)  # decoders: the first position is left out of the mean
    for i, layer in enumerate(layers):
        torch.testing.assert_close(batched["mean"][i, 2], hidden[layer][0, pooled].mean(dim=0), atol=1e-5, rtol=1e-5)
    if not last:
        torch.testing.assert_close(batched["head"][:, 2], torch.stack([h[0, 0] for h in hidden]), atol=1e-5, rtol=1e-5)


def test_decoder_head_pooling_reads_the_token_the_classifier_reads(tiny_llama_dir):
    """pad = eos = [SEP] and the tokenizer appends [SEP]: transformers' head reads the rightmost
    non-pad token, the one before the trailing eos; the pooled `head` feature of the last layer
    put through the head must give the model's own logits, in a padded batch too."""
    model, tokenizer = _setup(tiny_llama_dir)
    probe = _probe(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and probe["input_ids"][0][-1] == tokenizer.eos_token_id
    features, _ = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=None, poolings=("head",), batch_size=5)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        torch.testing.assert_close(model.score(features["head"][-1]), logits, atol=1e-5, rtol=1e-5)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    last_attended = batch["attention_mask"].sum(dim=1) - 1  # the trailing eos, which the head does not read
    assert not torch.allclose(features["head"][-1], hidden[torch.arange(5), last_attended])


def test_decoder_mean_pooling_leaves_the_first_position_out_unless_asked(tiny_llama_dir):
    model, tokenizer = _setup(tiny_llama_dir)
    probe = _probe(tokenizer)
    hidden, _ = _states_alone(model, tokenizer, TEXTS[0])
    default, _ = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=[2], poolings=("mean",))
    kept, _ = rep.pooled_features(
        model, probe, tokenizer=tokenizer, layers=[2], poolings=("mean",), skip_first_position=False
    )
    torch.testing.assert_close(default["mean"][0, 0], hidden[2][0, 1:].mean(dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept["mean"][0, 0], hidden[2][0].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_special_tokens_can_be_left_out_of_the_mean(tiny_bert_dir):
    model, tokenizer = _setup(tiny_bert_dir)
    features, _ = rep.pooled_features(
        model, _probe(tokenizer), tokenizer=tokenizer, layers=[2], poolings=("mean",), skip_special_tokens=True
    )
    hidden, ids = _states_alone(model, tokenizer, TEXTS[0])
    words = ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    torch.testing.assert_close(features["mean"][0, 0], hidden[2][0, words].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_layer_subset_and_out_of_range(tiny_bert_dir):
    model, tokenizer = _setup(tiny_bert_dir)
    probe = _probe(tokenizer)
    features, layers = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=[2, 0])
    assert layers == [0, 2] and features["head"].shape[0] == 2
    with pytest.raises(InputError, match=r"represent.layers: \[7\] out of range; this model has layers 0..2"):
        rep.pooled_features(model, probe, tokenizer=tokenizer, layers=[7])


def test_saved_features_round_trip_with_ids_and_layers(tmp_path):
    from lorascope.study import is_current, write_current

    features = {"mean": torch.randn(2, 4, 3), "head": torch.randn(2, 4, 3)}
    path = tmp_path / "sst2" / "base.safetensors"
    write_current(path, rep.features_bytes(features, [10, 11, 12, 13], [0, 6]), "abc")
    loaded, ids, layers = rep.load_features(path)
    assert layers == [0, 6] and ids.tolist() == [10, 11, 12, 13] and is_current(path, "abc")
    assert all(torch.equal(loaded[k], features[k]) for k in features)


def test_left_out_positions_carry_a_recorded_share_of_the_norm(tiny_llama_dir, tmp_path):
    """The share of the token-norm mass the decoder mean leaves out (the first position) is
    saved beside the features and summarised per layer for the report."""
    model, tokenizer = _setup(tiny_llama_dir)
    probe = _probe(tokenizer)
    features, layers = rep.pooled_features(model, probe, tokenizer=tokenizer, layers=None, poolings=("mean",))
    hidden, _ = _states_alone(model, tokenizer, TEXTS[0])
    for i, layer in enumerate(layers):
        norms = hidden[layer][0].norm(dim=-1)
        torch.testing.assert_close(features[rep.EXCLUDED_SHARE][i, 0], norms[0] / norms.sum(), atol=1e-5, rtol=1e-5)
    settings = RepresentConfig()
    path = tmp_path / "base.safetensors"
    path.write_bytes(rep.features_bytes(features, probe["example_id"], layers, rep.pooled_positions(settings, model)))
    rows = rep.position_rows("sst2", path)
    assert [r["layer"] for r in rows] == layers
    assert {r["positions"] for r in rows} == {"all attended tokens but the first position and BOS"}
    assert rows[1]["excluded_norm_share"] == pytest.approx(features[rep.EXCLUDED_SHARE][1].mean().item())
    kept, _ = rep.pooled_features(
        model, probe, tokenizer=tokenizer, layers=None, poolings=("mean",), skip_first_position=False
    )
    assert rep.EXCLUDED_SHARE not in kept
    assert rep.pooled_positions(RepresentConfig(skip_first_position=False), model) == "all attended tokens"


def test_minilm_special_tokens_do_not_dominate_the_mean():
    """Why encoders keep [CLS] and [SEP] in the mean by default: in the real MiniLM they carry a
    share of the token-norm mass close to their share of the tokens (measured on 192 SST-2 probe
    examples: 7-9 % for 2 of ~25 tokens; [CLS] norm 0.7-1.1x the others')."""
    model, tokenizer = _setup("minilm-l6")
    probe = _probe(tokenizer)
    features, _ = rep.pooled_features(
        model, probe, tokenizer=tokenizer, layers=None, poolings=("mean",), skip_special_tokens=True
    )
    token_share = 2 / torch.tensor([len(ids) for ids in probe["input_ids"]], dtype=torch.float32)
    ratio = features[rep.EXCLUDED_SHARE] / token_share  # per layer and example: 1 = as many as their count
    assert ratio.max() < 1.6 and ratio.min() > 0.4
