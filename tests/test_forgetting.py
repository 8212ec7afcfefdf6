"""Forgetting: probes on features of known separability, the base against itself and against a
damaged copy, LM loss of the base against itself, the correlation against scipy, the verdict
row, and the `forget` stage's cache."""

import copy
import math

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sp

from lorascope import analysis, forgetting, modeling, verdict
from lorascope import representations as rep
from lorascope.config import AnalysisConfig, DataConfig, TaskConfig
from lorascope.stages import BY_NAME
from lorascope.study import run_stages
from lorascope.tasks import load_raw, make_splits, resolve_task, tokenize


def _gaussian(n: int, shift: float, dims: int, seed: int):
    """Two classes whose first feature is N(±shift, 1); the other features are noise. The best
    possible accuracy is Phi(shift)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, dims))
    x[:, 0] += np.where(y == 1, shift, -shift)
    return x, y


@pytest.mark.parametrize(
    "shift, expected, tolerance", [(4.0, 1.0, 0.01), (1.0, sp.norm.cdf(1.0), 0.03), (0.0, 0.5, 0.04)]
)
def test_probe_scores_features_as_their_separability_allows(shift, expected, tolerance):
    train_x, train_y = _gaussian(600, shift, 20, seed=0)
    eval_x, eval_y = _gaussian(3000, shift, 20, seed=1)
    fit = forgetting.probe(train_x * 50 + 7, train_y, eval_x * 50 + 7, eval_y)  # scale: standardised away
    assert fit.correct.mean() == pytest.approx(expected, abs=tolerance)
    assert fit.c in forgetting.C_GRID


def test_the_fixed_sample_is_stratified_and_the_same_every_time():
    labels = np.array([0] * 80 + [1] * 20)
    rows = forgetting.fixed_sample(labels, 50, seed=3)
    assert len(rows) == 50 and list(rows) == sorted(rows) and np.bincount(labels[rows]).tolist() == [40, 10]
    assert (forgetting.fixed_sample(labels, 50, seed=3) == rows).all()
    assert (forgetting.fixed_sample(labels, None, seed=3) == np.arange(100)).all()
    assert forgetting.probe_layers(6, None) == [6] and forgetting.probe_layers(6, 2) == [2, 4, 6]


@pytest.fixture(scope="module")
def sst2_probe_split():
    """200 dev and 200 eval SST-2 examples, tokenized for the bundled MiniLM."""
    tokenizer = modeling.load_tokenizer("minilm-l6")
    data = DataConfig(dev_max=200)
    task, train, evaluation = load_raw(resolve_task("sst2", TaskConfig(train_max=400, eval_max=200), data))
    splits = tokenize(make_splits(task, train, evaluation, data), tokenizer, 64)
    return tokenizer, task, datasets.concatenate_datasets([splits["dev"], splits["eval"]]), len(splits["dev"])


def _probe_correct(model, tokenizer, split, n_train):
    features, _ = rep.pooled_features(model, split, tokenizer=tokenizer, layers=[6], poolings=("mean",))
    x, y = features["mean"][0].double().numpy(), np.asarray(split["label"])
    return forgetting.probe(x[:n_train], y[:n_train], x[n_train:], y[n_train:]).correct


def test_the_base_forgets_nothing_and_a_damaged_backbone_forgets_a_lot(sst2_probe_split):
    tokenizer, task, split, n_train = sst2_probe_split
    base = modeling.load_model("minilm-l6", task.label_names, 0, tokenizer.pad_token_id)
    base_correct = _probe_correct(base, tokenizer, split, n_train)
    assert base_correct.mean() > 0.7  # MiniLM's features separate SST-2 sentiment
    again = _probe_correct(
        modeling.load_model("minilm-l6", task.label_names, 1, tokenizer.pad_token_id), tokenizer, split, n_train
    )  # another head, same backbone
    same = forgetting.forgetting(base_correct, again, bootstrap=500, confidence=0.95, seed=0)
    assert same == (0.0, 0.0, 0.0)
    damaged = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in damaged.bert.encoder.layer[1].parameters():  # every weight of one block, shuffled
            param.copy_(param.flatten()[torch.randperm(param.numel(), generator=generator)].view_as(param))
    lost = forgetting.forgetting(
        base_correct, _probe_correct(damaged, tokenizer, split, n_train), bootstrap=500, confidence=0.95, seed=0
    )
    assert lost.value > 0.1 and lost.low > 0.02


# ---------------------------------------------------------------- language modelling


def _lm_folder(tmp_path, source, cls):
    model = cls.from_pretrained(source)
    model.save_pretrained(tmp_path)
    modeling.load_tokenizer(str(source)).save_pretrained(tmp_path)
    return tmp_path


def _documents(tokenizer, n=12):
    texts = [f"the film number {i} was {'good' if i % 2 else 'a dull and tired mess'} ." for i in range(n)]
    encoded = tokenizer(texts, truncation=True, max_length=32)
    return datasets.Dataset.from_dict({**encoded, "length": [len(ids) for ids in encoded["input_ids"]]})


def _losses(lm, classifier, tokenizer, documents, decoder):
    forgetting.with_backbone(lm, classifier)
    return forgetting.document_losses(
        lm, documents, tokenizer, decoder=decoder, batch_size=5, device=torch.device("cpu"), bf16=False
    )


@pytest.mark.parametrize("decoder", [True, False])
def test_lm_forgetting_of_the_base_against_itself_is_zero(decoder, tiny_llama_dir, tiny_bert_dir, tmp_path):
    from transformers import BertForMaskedLM, LlamaForCausalLM

    folder = _lm_folder(
        tmp_path, *((tiny_llama_dir, LlamaForCausalLM) if decoder else (tiny_bert_dir, BertForMaskedLM))
    )
    tokenizer = modeling.load_tokenizer(str(folder))
    lm, note = forgetting.lm_with_head(str(folder), decoder)
    assert lm is not None and note == ""
    base = modeling.load_model(str(folder), ("a", "b"), 0, tokenizer.pad_token_id)
    documents = _documents(tokenizer)
    base_sums, base_counts = _losses(lm, base, tokenizer, documents, decoder)
    again = _losses(
        lm, modeling.load_model(str(folder), ("a", "b"), 1, tokenizer.pad_token_id), tokenizer, documents, decoder
    )
    assert (base_counts > 0).all() and (base_sums > 0).all()
    assert forgetting.loss_change(base_sums, base_counts, *again, bootstrap=200, confidence=0.95, seed=0) == (0, 0, 0)
    if decoder:  # every next token after the first is scored
        assert base_counts.tolist() == [n - 1 for n in documents["length"]]
    damaged = copy.deepcopy(base)
    with torch.no_grad():
        damaged.base_model.get_input_embeddings().weight.mul_(-3.0)  # the head must stay the base's
    head_before = lm.get_output_embeddings().weight.detach().clone()
    change = forgetting.loss_change(
        base_sums,
        base_counts,
        *_losses(lm, damaged, tokenizer, documents, decoder),
        bootstrap=200,
        confidence=0.95,
        seed=0,
    )
    assert torch.equal(lm.get_output_embeddings().weight, head_before)
    assert change.value != 0 and change.low <= change.value <= change.high


def test_checkpoints_without_an_lm_head_are_skipped_with_a_reason(tiny_llama_dir, tiny_bert_dir):
    for folder, decoder, kind in ((tiny_bert_dir, False, "masked-LM"), (tiny_llama_dir, True, "causal-LM")):
        lm, note = forgetting.lm_with_head(str(folder), decoder)
        assert lm is None and f"no {kind} head" in note and "skipped" in note


def test_loss_change_is_the_difference_of_token_weighted_means():
    base_sums, base_counts = np.array([2.0, 6.0, 3.0]), np.array([1, 3, 2])
    run_sums = np.array([3.0, 6.0, 5.0])
    change = forgetting.loss_change(
        base_sums, base_counts, run_sums, base_counts, bootstrap=500, confidence=0.9, seed=0
    )
    assert change.value == pytest.approx(14 / 6 - 11 / 6)
    assert change.low <= change.value <= change.high


# ---------------------------------------------------------------- drift vs forgetting


def test_spearman_and_its_interval_agree_with_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=18)
    y = x + rng.normal(size=18)
    y[3] = y[4]  # ties take average ranks, as in scipy
    rho, p = forgetting.spearman_interval(x, y, n_resamples=4000, confidence=0.9, seed=0)
    reference = sp.spearmanr(x, y)
    assert rho.value == pytest.approx(reference.statistic) and p == pytest.approx(reference.pvalue)
    scipy_interval = sp.bootstrap(
        (x, y),
        lambda a, b: sp.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=2000,
        confidence_level=0.9,
        method="percentile",
        rng=np.random.default_rng(1),
    ).confidence_interval
    assert rho.low == pytest.approx(scipy_interval.low, abs=0.05)
    assert rho.high == pytest.approx(scipy_interval.high, abs=0.05)
    monotone, _ = forgetting.spearman_interval(x, x**3, n_resamples=200, confidence=0.9, seed=0)
    assert tuple(monotone) == pytest.approx((1.0, 1.0, 1.0))
    assert all(
        math.isnan(v) for v in forgetting.spearman_interval(x[:2], y[:2], n_resamples=10, confidence=0.9, seed=0)[0]
    )


def _probe_table(values: dict) -> pd.DataFrame:
    """A forgetting.csv with one row per (task, method, seed, probe_task) -> forgetting."""
    rows = [
        {
            "task": t,
            "method": m,
            "seed": s,
            "probe_task": p,
            "layer": 6,
            "metric": "accuracy",
            "score": 0.8 - v,
            "base_score": 0.8,
            "forgetting": v,
            "ci_low": v,
            "ci_high": v,
            "own_task": t == p,
            "n_train": 9,
            "n_eval": 9,
            "probe_c": 1.0,
        }
        for (t, m, s, p), v in values.items()
    ]
    return forgetting.FORGETTING.frame(rows)


def _flags(tasks, seeds) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"task": t, "method": m, "seed": s, "status": "ok", "flagged": False}
            for t in tasks
            for m in ("lora", "full")
            for s in seeds
        ]
    )


def test_the_verdict_row_is_lora_minus_full_forgetting_on_the_other_tasks():
    seeds = (1, 2, 3)
    lost = {("a", "lora", s, "b"): 0.01 * s for s in seeds} | {("a", "full", s, "b"): 0.05 + 0.02 * s for s in seeds}
    lost |= {("a", "lora", s, "c"): 0.0 for s in seeds} | {("a", "full", s, "c"): 0.03 for s in seeds}
    lost |= {("a", m, s, "a"): -0.2 for m in ("lora", "full") for s in seeds}  # the own task: gain, left out
    table = _probe_table(lost)
    criterion = analysis.forgetting_criterion(table, _flags(["a"], seeds), "a", AnalysisConfig())
    gaps = [100 * ((0.01 * s + 0.0) / 2 - (0.05 + 0.02 * s + 0.03) / 2) for s in seeds]
    assert criterion.estimate.value == pytest.approx(np.mean(gaps))
    row = verdict.row("a", criterion)
    assert row["outcome"] == verdict.SHOWN and row["ci_high"] < 0  # LoRA forgot less, and it only informs
    counted = analysis.forgetting_criterion(
        table, _flags(["a"], seeds), "a", AnalysisConfig(forgetting_in_verdict=True)
    )
    rows = verdict.verdict_rows(
        "a",
        [
            verdict.Criterion("quality", (1, 0, 2), 3, False, ""),
            verdict.Criterion("drift", (0.5, 0.3, 0.7), 0.2, True, ""),
            counted,
        ],
    )
    assert [r["outcome"] for r in rows] == ["met", "met", "met", "met"]
    assert rows[-1]["rule"] == f"quality and (drift or deployment) and {analysis.FORGETTING_CRITERION}"
    assert verdict.recommended("met", "met", "not run", "not met") == "not met"


def test_drift_points_pair_each_run_with_its_forgetting_elsewhere():
    lost = {
        ("a", m, s, p): v
        for (m, s, p), v in {
            ("lora", 1, "b"): 0.1,
            ("lora", 1, "a"): -0.3,
            ("full", 1, "b"): 0.2,
            ("full", 1, "a"): -0.3,
        }.items()
    }
    summary = pd.DataFrame(
        [
            {
                "task": "a",
                "method": m,
                "seed": 1,
                "pooling": "mean",
                "measure": "linear_cka",
                "mean_over_layers": cka,
                "mean_last_third": cka,
                "comparison": "run_vs_base",
            }
            for m, cka in (("lora", 0.9), ("full", 0.6))
        ]
    )
    points = forgetting.drift_points(_probe_table(lost), summary, None, "mean", "linear_cka")
    mean = points[points["probe_task"] == forgetting.OTHER_TASKS].set_index("method")
    assert mean.loc["lora", "drift"] == pytest.approx(0.1) and mean.loc["full", "drift"] == pytest.approx(0.4)
    assert mean.loc["full", "forgetting"] == pytest.approx(0.2) and set(points["probe_task"]) == {
        "b",
        forgetting.OTHER_TASKS,
    }


# ---------------------------------------------------------------- the stage


STAGES = [BY_NAME[s] for s in ("prepare", "train", "represent", "drift", "forget", "analyze", "report")]


@pytest.fixture(scope="module")
def study(tiny_bert_dir, tmp_path_factory):
    from lorascope.config_io import load_config

    config = load_config(
        None,
        "smoke",
        [
            f"model.name={tiny_bert_dir}",
            "model.max_length=48",
            "runtime.progress=false",
            "data.dev_max=24",
            "data.probe_size=16",
            "tasks={sst2: {train_max: 48, eval_max: 40}, rte: {train_max: 48, eval_max: 40}}",
            "training.lora.lr=1e-2",
            "training.full.lr=1e-3",
            "drift.bootstrap=20",
            "forget.bootstrap=50",
            "forget.layer_every=1",
            "analysis.bootstrap=200",
        ],
    )
    return run_stages(config, tmp_path_factory.mktemp("forget"), STAGES), config


def test_the_stage_probes_every_model_on_every_task(study):
    study, _ = study
    table = forgetting.FORGETTING.read(study.tables)
    runs = table[table["method"] != "base"]
    assert (
        len(table[table["method"] == "base"]) == 2 * 2 and len(runs) == 4 * 2 * 2
    )  # (base + 4 runs) x 2 tasks x 2 layers
    assert set(runs.loc[runs["own_task"], "task"]) == {"sst2", "rte"} and set(table["n_train"]) == {24}
    assert (runs["forgetting"] == runs["base_score"] - runs["score"]).all()
    lm = forgetting.LM_FORGETTING.read(study.tables)
    assert set(lm["status"]) == {"skipped"} and "masked-LM" in lm["note"].iloc[0]
    verdict_rows = pd.read_csv(study.tables / "verdict.csv")
    assert (verdict_rows["criterion"] == analysis.FORGETTING_CRITERION).sum() == 2
    assert forgetting.FORGET_CORRELATION.read(study.tables) is not None
    text = (study.root / "report.md").read_text()
    assert "## Forgetting" in text and "no masked-LM head" in text and "Does drift predict forgetting?" in text


def test_a_second_pass_recomputes_nothing_and_a_lost_file_is_redone_alone(study):
    study, config = study
    files = [
        *sorted((study.root / "forget").rglob("*.safetensors")),
        forgetting.FORGETTING.path(study.tables),
        forgetting.LM_FORGETTING.path(study.tables),
    ]
    before = {p: p.stat().st_mtime_ns for p in files}
    run_stages(config, study.root, [BY_NAME["forget"]])
    assert {p: p.stat().st_mtime_ns for p in files} == before
    lost = study.root / "forget" / "features" / "rte" / "sst2-full-seed42.safetensors"
    lost.unlink()  # as a kill before its rename would leave it
    run_stages(config, study.root, [BY_NAME["forget"]])
    after = {p: p.stat().st_mtime_ns for p in files}
    changed = {p for p in files if after[p] != before[p]}
    assert changed == {lost}  # the same fingerprint again: the table it fed is still valid


def test_a_named_text_file_gives_the_lm_documents(study, tmp_path):
    from lorascope.stages.forgetting import lm_documents

    study, config = study
    text = tmp_path / "held_out.txt"
    text.write_text("a first document .\n\n  a second one  \na third\n")
    config = config.model_copy(
        update={"forget": config.forget.model_copy(update={"lm_text": str(text), "lm_documents": 2})}
    )
    documents = lm_documents(config, {}, modeling.load_tokenizer(config.model.name))
    assert list(documents) == ["text"] and len(documents["text"]) == 2
    assert documents["text"]["length"] == [len(ids) for ids in documents["text"]["input_ids"]]
