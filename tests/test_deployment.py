"""Deployment benchmark on a tiny offline BERT with two real (non-zero) LoRA adapters and real
GLUE texts: correctness checks pass on the real serving paths and fail with numbers on a
corrupted one; statistics agree with numpy; the grid, order, inputs, memory and skips are
what the outputs say they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraModel

from lorascope import footprint, stats
from lorascope.config import STRATEGIES, DeployConfig
from lorascope.hparams import AdapterMethodConfig, LoraMethodConfig
from lorascope.modeling import load_model, load_tokenizer, prepare_for_method
from lorascope.report.figures import memory_figure, png_bytes
from lorascope.serving import benchmark, checks, grid, inputs, load, memory, strategies
from lorascope.serving.vllm_adapters import vllm_refusal

LABELS = ("negative", "positive")
GLUE = Path(os.environ["LORASCOPE_GLUE"])  # set by conftest


LORA = LoraMethodConfig(lr=1e-3, r=4)


def _adapter(base_dir, tokenizer, folder, seed, method="lora", hp=LORA):
    """Built as a study run builds it (head + pooler saved), then its trained weights perturbed
    so the adapter really changes the logits (B = 0 would make every check pass vacuously)."""
    model = load_model(str(base_dir), LABELS, seed, tokenizer.pad_token_id)
    model = prepare_for_method(model, method, hp)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_A" not in name:
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    adapters = {
        "sst2": _adapter(tiny_bert_dir, tokenizer, root / "sst2", 1),
        "rte": _adapter(tiny_bert_dir, tokenizer, root / "rte", 2),
    }
    full = load_model(str(tiny_bert_dir), LABELS, 3, tokenizer.pad_token_id)
    full.save_pretrained(root / "full")
    sst2 = pd.read_parquet(GLUE / "sst2" / "validation-00000-of-00001.parquet").head(24)
    rte = pd.read_parquet(GLUE / "rte" / "validation-00000-of-00001.parquet").head(24)
    examples = {
        "sst2": inputs.tokenize_texts(tokenizer, [(s, None) for s in sst2.sentence], 48, sst2.label.tolist()),
        "rte": inputs.tokenize_texts(tokenizer, list(zip(rte.sentence1, rte.sentence2)), 48, rte.label.tolist()),
    }
    models = inputs.Models(str(tiny_bert_dir), adapters, str(root / "full"))
    return models, examples, tokenizer


def _checks(models, examples, tokenizer):
    return checks.check_correctness(
        models, examples, 2, tokenizer.pad_token_id, inputs.forward_inputs(models.base), torch.device("cpu")
    )


def _cfg(compile=False, **changes):
    cells = {"batch_sizes": [1, 2], "seq_lens": ["natural", 8], "concurrency": [1], "warmup": 1, "repeats": 3}
    return DeployConfig(grid=cells | {"threads": 1} | changes, bootstrap=20, compile=compile)


def test_checks_pass_on_real_serving_paths(setup):
    models, examples, tokenizer = setup
    table = _checks(models, examples, tokenizer)
    assert sorted(table["check"].value_counts().items()) == [
        ("merged_vs_separate", 2),
        ("multi_vs_alone", 2),
        ("switch_vs_fresh", 2),
    ]
    assert table["passed"].all(), table
    assert (table["max_abs_diff"] < checks.ATOL).all() and (table["prediction_mismatches"] == 0).all()
    assert table["accuracy"].between(0, 1).all() and (table["n_examples"] == 24).all()
    # not vacuous: the two adapters and the base give clearly different logits
    names, pad = inputs.forward_inputs(models.base), tokenizer.pad_token_id
    rows = examples["sst2"]

    def served(strategy, served_models):
        model = strategies.REGISTRY[strategy].load(served_models, 2, pad)
        return checks.logits(model, rows, pad, names, torch.device("cpu"))

    logits = {s: served(s, models) for s in ("base", "separate")}
    logits["other"] = served("separate", inputs.Models(models.base, {"rte": models.adapters["rte"]}))
    assert (logits["separate"] - logits["base"]).abs().max() > 1e-2
    assert (logits["separate"] - logits["other"]).abs().max() > 1e-2


def test_corrupted_merge_stops_the_benchmark_with_numbers(setup, tmp_path, monkeypatch):
    models, examples, tokenizer = setup
    real_merge = LoraModel.merge_and_unload  # what PeftModel.merge_and_unload calls

    def bad_merge(model, *args, **kwargs):
        merged = real_merge(model, *args, **kwargs)
        with torch.no_grad():
            value = merged.bert.encoder.layer[0].attention.self.value.weight
            value.add_(0.05 * torch.randn(value.shape, generator=torch.Generator().manual_seed(0)))
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", bad_merge)
    with pytest.raises(checks.DeploymentCheckFailed, match=r"merged_vs_separate sst2: max \|Δlogit\| [0-9.e-]+") as err:
        benchmark.benchmark(
            models.base, models.adapters, models.full, examples, tokenizer, _cfg(), tmp_path, memory=False
        )
    failed = err.value.checks[~err.value.checks["passed"]]
    assert set(failed["check"]) == {"merged_vs_separate"} and (failed["max_abs_diff"] > checks.ATOL).all()
    written = pd.read_csv(tmp_path / "deployment_checks.csv")
    assert not written["passed"].all()
    assert json.loads((tmp_path / "deployment_checks.json").read_text())["passed"] is False
    assert not (tmp_path / "deployment.csv").exists()  # nothing timed after a failed check


def test_corrupted_adapter_in_multi_model_fails_switch_and_multi(setup, monkeypatch):
    models, examples, tokenizer = setup
    real_load_multi = strategies.load_multi

    def corrupt(*args):
        model = real_load_multi(*args)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B.rte" in name:
                    param.mul_(1.5)
        return model

    monkeypatch.setattr(checks, "load_multi", corrupt)
    table = _checks(models, examples, tokenizer).set_index(["check", "task"])
    assert table.loc[("merged_vs_separate", "rte"), "passed"]
    assert table.loc[("switch_vs_fresh", "sst2"), "passed"] and table.loc[("multi_vs_alone", "sst2"), "passed"]
    for check in ("switch_vs_fresh", "multi_vs_alone"):
        assert not table.loc[(check, "rte"), "passed"]
        assert table.loc[(check, "rte"), "max_abs_diff"] > checks.ATOL


def test_percentiles_throughput_and_overhead_match_numpy():
    rng = np.random.default_rng(7)
    a, b = rng.lognormal(1.0, 0.3, 57), rng.lognormal(0.8, 0.3, 57)
    padded, real = np.full(57, 4 * 16), rng.integers(20, 64, 57)
    row = grid.sequential("peft", grid.Cell(1, 4), {"a": a}, padded, real)[0].summary()
    assert [row["p50_ms"], row["p95_ms"], row["p99_ms"]] == pytest.approx(np.percentile(a, [50, 95, 99]))
    assert row["mean_ms"] == pytest.approx(a.mean())
    assert row["examples_per_s"] == pytest.approx(4 / (a.mean() / 1e3))
    assert row["tokens_per_s"] == pytest.approx(64 / (a.mean() / 1e3))
    assert row["real_tokens_per_s"] == pytest.approx(real.sum() / (a.sum() / 1e3))

    ratio, low, high = stats.ratio_of_medians(a, b, n_boot=500, seed=3)
    idx = np.random.default_rng(3).integers(0, 57, size=(500, 57))
    boot = [np.median(a[i]) / np.median(b[i]) for i in idx]
    assert ratio == pytest.approx(np.median(a) / np.median(b))
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    assert low < ratio < high
    assert np.isnan(stats.ratio_of_medians(a, b, n_boot=0)[1])

    paired, low, high = stats.median_paired_ratio(a, b, n_boot=500, seed=3)
    boot = [np.median(a[i] / b[i]) for i in idx]
    assert paired == pytest.approx(np.median(a / b))
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    # the same batch in both strategies: a content effect common to both cancels in the paired ratio
    content = rng.choice([1.0, 5.0], 57)
    assert stats.median_paired_ratio(1.1 * content, content, 0)[0] == pytest.approx(1.1)


def test_table_has_required_columns_and_one_row_per_cell(setup, tmp_path):
    models, examples, tokenizer = setup
    result = benchmark.benchmark(
        models.base,
        models.adapters,
        models.full,
        examples,
        tokenizer,
        _cfg(),
        tmp_path,
        memory=False,
        meta={"fingerprint": "abc"},
    )
    assert json.loads((tmp_path / "deployment_checks.json").read_text())["meta"] == {"fingerprint": "abc"}
    table = pd.read_csv(tmp_path / "deployment.csv")
    assert list(table.columns[:10]) == [
        "strategy",
        "method",
        "batch_size",
        "seq_len",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "examples_per_s",
        "overhead_vs_full",
    ]
    assert list(table.columns[10:15]) == ["tokens_per_s", "overhead_ci_low", "overhead_ci_high", "threads", "repeats"]
    assert table["method"].isna().all()  # a bench of adapters of no named method
    cells = table.groupby(["strategy", "batch_size", "seq_len"]).size()
    assert len(table) == len(cells) == 6 * 2 * 2 and (cells == 1).all()
    assert (table["repeats"] == 3).all() and (table["warmup"] == 1).all()
    assert set(table["strategy"]) == set(STRATEGIES) and (table["status"] == "ok").all()
    assert (table["p50_ms"] > 0).all() and (table["p95_ms"] >= table["p50_ms"]).all()
    assert (table["threads"] == 1).all()
    times = pd.read_csv(tmp_path / "deployment_times.csv")
    assert len(times) == len(table) * 3  # every timed call, 3 repeats per cell
    for (batch_size, seq_len), cell in times.groupby(["batch_size", "seq_len"]):
        ms = {s: g.sort_values("repetition")["ms"].to_numpy() for s, g in cell.groupby("strategy")}
        rows = table[(table["batch_size"] == batch_size) & (table["seq_len"] == seq_len)].set_index("strategy")
        for strategy in STRATEGIES:
            assert rows.loc[strategy, "p50_ms"] == pytest.approx(np.median(ms[strategy]))
            assert rows.loc[strategy, "overhead_vs_full"] == pytest.approx(np.median(ms[strategy] / ms["full"]))
    assert (table[table["seq_len"] == "8"]["mean_padded_length"] == 8).all()
    assert result.checks["passed"].all() and (tmp_path / "deployment_checks.csv").is_file()
    # the engines table holds the same measurements of PEFT's natural-length cells, with both overheads
    engines = pd.read_csv(tmp_path / "deployment_engines.csv")
    natural = table[table["seq_len"] == "natural"].set_index(["strategy", "batch_size"])
    assert set(engines["engine"]) == {"peft"} and len(engines) == len(natural) and (engines["concurrency"] == 1).all()
    for r in engines.itertuples():
        assert r.p50_ms == pytest.approx(natural.loc[(r.strategy, r.batch_size), "p50_ms"])
        assert r.overhead_vs_full == pytest.approx(natural.loc[(r.strategy, r.batch_size), "overhead_vs_full"])
        assert r.overhead_vs_merged == pytest.approx(natural.loc[(r.strategy, r.batch_size), "overhead_vs_merged"])
        assert r.max_in_flight == 1 and r.requests == 3


def test_one_client_cells_alternate_request_by_request_on_the_same_requests():
    """PEFT at one client: each strategy's warm-up requests (numbered below 0, from the stream
    before the timed ones) are never timed; then one request a turn, the first strategy rotating
    (load.round_robin), every strategy sent request k in round k, sequentially in this thread."""
    assert load.round_robin(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    log, me = [], threading.get_ident()

    def fake(name):
        def send(request):
            assert threading.get_ident() == me
            log.append((name, request.rows[0]["input_ids"][0], request.number))

        return send

    pool = [{"input_ids": [i], "task": "t"} for i in range(10)]
    workload = grid.Workload(pool, 0, ("input_ids", "attention_mask"), warmup=2)
    cfg = DeployConfig(grid={"concurrency": [1], "warmup": 2, "repeats": 3})
    measured = grid.measure(
        "peft", {s: fake(s) for s in "abc"}, workload, grid.Cell(1, 1), cfg.grid, load.TURNS["peft"]
    )
    warm = [entry for entry in log if entry[2] < 0]
    assert [(n, k) for n, _, k in warm] == [("a", -2), ("a", -1), ("b", -2), ("b", -1), ("c", -2), ("c", -1)]
    assert {ids for _, ids, _ in warm} == {0, 1}  # the stream before the timed requests
    timed = [entry for entry in log if entry[2] >= 0]
    assert [name for name, _, _ in timed] == [s for rep in load.round_robin(list("abc"), 3) for s in rep]
    for rep in range(3):
        assert {(ids, k) for _, ids, k in timed[3 * rep : 3 * rep + 3]} == {(rep + 2, rep)}
    assert [m.strategy for m in measured] == list("abc")
    assert all(len(m.taken.latencies_ms) == 3 and (m.taken.latencies_ms >= 0).all() for m in measured)
    assert all(m.turns == [range(0, 1), range(1, 2), range(2, 3)] for m in measured)


def test_natural_batches_come_from_real_texts_and_fixed_lengths_are_exact(setup):
    models, examples, tokenizer = setup
    pool = inputs.interleave(examples)
    assert [r["task"] for r in pool[:4]] == ["sst2", "rte", "sst2", "rte"]
    known = {tuple(r["input_ids"]) for rows in examples.values() for r in rows}
    names = inputs.forward_inputs(models.base)
    for batch in inputs.make_batches(pool, 3, "natural", 4, tokenizer.pad_token_id, names):
        mask = batch.inputs["attention_mask"].bool()
        assert mask.any(dim=0).all()  # padded to the longest of the batch, not beyond
        for ids, keep in zip(batch.inputs["input_ids"], mask):
            assert tuple(ids[keep].tolist()) in known
    for batch in inputs.make_batches(pool, 3, 8, 4, tokenizer.pad_token_id, names):
        assert batch.inputs["input_ids"].shape == (3, 8) and batch.inputs["token_type_ids"].shape == (3, 8)
        for ids in batch.inputs["input_ids"]:
            assert any(tuple(ids.tolist()) == k[:8] for k in known)


def test_memory_is_measured_in_a_fresh_process(setup):
    models, examples, tokenizer = setup
    pool = inputs.interleave(examples)
    batch = inputs.make_batches(pool, 4, "natural", 1, tokenizer.pad_token_id, inputs.forward_inputs(models.base))[0]
    spec = {
        "strategy": "multi",
        "models": {"base": models.base, "adapters": models.adapters, "full": models.full},
        "num_labels": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "device": "cpu",
        "threads": 1,
        "bf16": False,
        "batches": [{"inputs": {k: v.tolist() for k, v in batch.inputs.items()}, "tasks": batch.tasks}],
    }
    ballast = torch.ones(64 * 2**20)  # 256 MB in this process, which the measuring process must not carry
    row = memory.memory_in_subprocess(spec)
    assert row["loaded_mb"] > 1 and row["peak_mb"] > 0 and row["load_seconds"] > 0 and row["inference_mb"] >= 0
    assert row["measure"] == "cpu rss" and row["method"]
    # the engines table's PEFT memory: the whole process's peak, runtime included
    assert row["process_mb"] == pytest.approx(row["runtime_mb"] + row["peak_mb"]) and row["gpu_mb"] is None
    assert row["runtime_mb"] < footprint.rss() / footprint.MB - 200, "the measuring process inherited the driver's heap"
    del ballast
    broken = spec | {"models": spec["models"] | {"base": str(models.base) + "-missing"}}
    with pytest.raises(RuntimeError, match=r"memory measurement of multi failed: .*missing"):
        memory.memory_in_subprocess(broken)
    assert memory.disk_sizes("multi", models)[1] == pytest.approx(
        2 * memory.disk_sizes("separate", models)[1], rel=0.01
    )


def test_memory_of_strategies_measured_side_by_side_lands_in_strategy_order(setup, monkeypatch):
    models, examples, tokenizer = setup
    batch = inputs.make_batches(
        inputs.interleave(examples), 4, "natural", 1, tokenizer.pad_token_id, inputs.forward_inputs(models.base)
    )[0]
    spec = {
        "models": {"base": models.base, "adapters": models.adapters, "full": models.full},
        "num_labels": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "device": "cpu",
        "threads": 1,
        "bf16": False,
        "batches": [{"inputs": {k: v.tolist() for k, v in batch.inputs.items()}, "tasks": batch.tasks}],
    }
    monkeypatch.setattr(memory, "cores", lambda: 2)  # two processes at once, whatever this machine has
    table = memory.memory_table(["multi", "full", "separate"], models, spec)
    assert table["strategy"].tolist() == ["multi", "full", "separate"]
    assert table["adapter_disk_mb"].tolist() == pytest.approx(
        [memory.disk_sizes(s, models)[1] for s in ("multi", "full", "separate")]
    )
    assert (table["loaded_mb"] > 1).all() and (table["inference_mb"] >= 0).all()


def test_a_process_spinning_beside_the_timing_counts_as_busy():
    """The busy warning reads what other processes use now, not the minute-long load average
    that still counts the idle workers of the stages before."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        assert load.others_busy_cores(0.5) > 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_memory_figure():
    table = pd.DataFrame(
        {
            "strategy": ["full", "separate"],
            "load_seconds": [0.2, 0.3],
            "peak_mb": [90, 95],
            "loaded_mb": [85, 87],
            "inference_mb": [5, 8],
            "disk_mb": [86, 87],
            "measure": ["cpu rss"] * 2,
        }
    )
    assert len(png_bytes(memory_figure(table))) > 1000


def test_skipped_strategies_are_reported_with_their_reason(setup, tmp_path, monkeypatch, capsys):
    models, examples, tokenizer = setup

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    one = {"sst2": models.adapters["sst2"]}
    result = benchmark.benchmark(
        models.base,
        one,
        None,
        examples,
        tokenizer,
        _cfg(batch_sizes=[1], seq_lens=[8], compile=True),
        tmp_path,
        memory=False,
    )
    table = pd.read_csv(tmp_path / "deployment.csv").set_index("strategy")
    assert list(table.index) == [*STRATEGIES, "merged_compiled", "separate_compiled"]
    notes = table[table["status"] == "skipped"]["note"]
    assert notes["switch"] == notes["multi"] == "needs 2 or more adapters, 1 given"
    assert notes["full"] == "no fully fine-tuned model given"
    assert notes["merged_compiled"] == "torch.compile failed: no C++ compiler here"
    assert table.loc["separate", "status"] == "ok" and np.isnan(table.loc["separate", "overhead_vs_full"])
    assert table.loc["separate", "overhead_vs_merged"] > 0
    assert "switch skipped: needs 2 or more adapters" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "deployment_checks.json").read_text())["skipped"]
    assert skipped == result.skipped and skipped["full"] == "no fully fine-tuned model given"


def test_checks_pass_for_a_decoder_with_a_score_head(tiny_llama_dir, tmp_path):
    """Llama: no pooler, no token_type_ids, pad = eos, the head reads the last real token."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    adapters = {t: _adapter(tiny_llama_dir, tokenizer, tmp_path / t, seed) for t, seed in (("a", 1), ("b", 2))}
    models = inputs.Models(str(tiny_llama_dir), adapters)
    assert inputs.forward_inputs(models.base) == ("input_ids", "attention_mask")
    texts = pd.read_parquet(GLUE / "sst2" / "validation-00000-of-00001.parquet").sentence.head(12)
    rows = inputs.tokenize_texts(tokenizer, [(s, None) for s in texts], 32)
    table = _checks(models, {"a": rows, "b": rows[::-1]}, tokenizer)
    assert len(table) == 6 and table["passed"].all(), table


def test_further_methods_are_checked_and_served_merged_and_separate_beside_the_first(setup, tmp_path):
    """DoRA and IA3 adapters of the first task: each merged adapter gives its unmerged logits, and
    each is timed merged and separate in the same turns as the study's first method, its
    separate-over-merged overhead against its own merged model."""
    models, examples, tokenizer = setup
    further = {
        "dora": _adapter(
            models.base, tokenizer, tmp_path / "dora", 4, "dora", LoraMethodConfig(lr=1e-3, r=4, use_dora=True)
        ),
        "ia3": _adapter(models.base, tokenizer, tmp_path / "ia3", 5, "ia3", AdapterMethodConfig(type="ia3", lr=1e-2)),
    }
    cfg = _cfg(batch_sizes=[1], seq_lens=["natural"])
    result = benchmark.benchmark(
        *(models.base, models.adapters, models.full, examples, tokenizer, cfg, tmp_path / "out"),
        memory=False,
        methods=further,
        names=("lora", "full"),
    )
    merged = result.checks[result.checks["check"] == "merged_vs_separate"]
    assert list(merged["method"]) == ["lora", "lora", "dora", "ia3"] and merged["passed"].all()
    assert (merged.loc[merged["method"] != "lora", "max_abs_diff"] > 0).all()  # computed, not skipped
    table = result.timings.set_index(["strategy", "method"])
    assert list(table.index) == [
        *((s, "full" if s == "full" else "lora") for s in STRATEGIES),
        *((s, m) for m in further for s in ("merged", "separate")),
    ]
    assert (table["status"] == "ok").all()
    times = pd.read_csv(tmp_path / "out" / "deployment_times.csv")
    ms = {key: g.sort_values("repetition")["ms"].to_numpy() for key, g in times.groupby(["strategy", "method"])}
    for m in further:
        own = np.median(ms[("separate", m)] / ms[("merged", m)])
        assert table.loc[("separate", m), "overhead_vs_merged"] == pytest.approx(own)
        assert table.loc[("separate", m), "overhead_vs_full"] == pytest.approx(
            np.median(ms[("separate", m)] / ms[("full", "full")])
        )
    engines = pd.read_csv(tmp_path / "out" / "deployment_engines.csv")
    assert set(zip(engines["strategy"], engines["method"])) == set(table.index)


def test_vllm_says_why_it_serves_no_further_method(setup, tmp_path):
    models, _, tokenizer = setup
    dora = _adapter(models.base, tokenizer, tmp_path / "dora", 4, "dora", LoraMethodConfig(lr=1e-3, r=4, use_dora=True))
    ia3 = _adapter(models.base, tokenizer, tmp_path / "ia3", 5, "ia3", AdapterMethodConfig(type="ia3", lr=1e-2))
    assert vllm_refusal(dora) == "vLLM does not serve DoRA adapters (use_dora)"
    assert vllm_refusal(ia3) == "vLLM serves LoRA adapters only; this one is IA3"
    assert vllm_refusal(models.adapters["sst2"]).startswith("not served: lorascope starts vLLM servers")
