"""Generation serving from the table to the verdict and the report: deployment_generation.csv built
by its own writer (serving.generation_grid) from streamed requests whose token times are set by
hand, so every latency, throughput and overhead in it is known; the deployment criterion and the
throughput row read from it (verdict, analysis); the report's section and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorascope import analysis, report, runs, verdict
from lorascope.config_io import validate
from lorascope.serving import generation_grid, grid, load, streaming
from lorascope.study import Study
from test_report import performance_rows

OUTPUT_TOKENS = 8
TTFT_MS = (10.0, 20.0, 30.0, 40.0, 50.0)  # per request: p50 30, p95 48, p99 49.6 (linear interpolation)
TPOT_MS = 5.0  # merged's and full's time per output token
PER_S = 20.0  # requests/s of merged and full; vLLM multiplies it by its clients, PEFT (no batching) does not
SLOWER = {"full": 1.0, "merged": 1.0, "separate": 1.1, "multi": 1.2}  # time per output token vs merged
THROUGHPUT = {"full": 1.0, "merged": 1.0, "separate": 0.8, "multi": 0.7}  # requests/s vs merged
CLIENTS = {"peft": (1, 4), "vllm": (1, 4, 16)}
PROMPT_LENGTHS = (10, 20, 30, 40, 100)  # mean 40, p50 30, p95 88
NOT_TIMED = "switch sets one adapter for the whole model: PEFT only"


def streamed(sent: float, ttft_ms: float, tpot_ms: float, prompts: int) -> streaming.Streamed:
    """A request whose prompts' first tokens came ttft_ms after sending, then one every tpot_ms."""
    first = sent + ttft_ms / 1e3
    times = [first + i * tpot_ms / 1e3 for i in range(OUTPUT_TOKENS)]
    return streaming.Streamed(sent, [list(times) for _ in range(prompts)], done=times[-1])


def measured(engine: str, strategy: str, clients: int, slower, prompts: int = 1) -> grid.Measured:
    """Five timed requests of one cell, request k's time per output token merged's times slower[k]."""
    cell = grid.Cell(clients, prompts, kind=grid.GENERATE)
    answers = {k: streamed(float(k), TTFT_MS[k], TPOT_MS * f, prompts) for k, f in enumerate(slower)}
    per_s = PER_S * THROUGHPUT[strategy] * (clients if engine == "vllm" else 1)
    taken = load.Taken(np.array([a.e2e_ms for a in answers.values()]), 10, 10 / per_s, clients)
    memory = {"server_rss_mb": 1500.0 + clients, "server_gpu_mb": 7000.4} if engine == "vllm" else {}
    turns = [range(k, k + 1) for k in range(len(slower))]
    return grid.Measured(engine, strategy, cell, taken, np.zeros(5), np.zeros(5), turns, memory, answers=answers)


def generation_rows(separate=(SLOWER["separate"],) * 5, vllm_separate_at_one: bool = True) -> pd.DataFrame:
    """Both engines, four strategies, their clients (and a four-prompt cell on vLLM), overheads by
    grid.overheads on time per output token, through generation_table."""
    out = [
        measured(engine, strategy, clients, separate if strategy == "separate" else (SLOWER[strategy],) * 5)
        for engine, all_clients in CLIENTS.items()
        for clients in all_clients
        for strategy in SLOWER
        if vllm_separate_at_one or (engine, strategy, clients) != ("vllm", "separate", 1)
    ]
    out += [measured("vllm", s, 1, (SLOWER[s],) * 5, prompts=4) for s in ("merged", "separate")]
    grid.overheads(out, 200, value=generation_grid.tpot_ms, prefix="tpot_overhead")
    extra = grid.not_measured("vllm", "switch", [grid.Cell(1, 1)], "skipped", NOT_TIMED, "cpu")
    if not vllm_separate_at_one:
        extra += grid.not_measured("vllm", "separate", [grid.Cell(1, 1)], "failed", "server died", "cpu")
    return generation_grid.generation_table(out, extra, OUTPUT_TOKENS, PROMPT_LENGTHS, "cpu")


def row(table: pd.DataFrame, engine: str, strategy: str, clients: int, prompts: int = 1) -> pd.Series:
    found = table[
        (table["engine"] == engine)
        & (table["strategy"] == strategy)
        & (table["concurrency"] == clients)
        & (table["prompts"] == prompts)
    ]
    assert len(found) == 1
    return found.iloc[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> pd.DataFrame:
    """The table as the report and the verdict read it: written, then read back."""
    folder = tmp_path_factory.mktemp("tables")
    generation_grid.DEPLOYMENT_GENERATION.write(folder, generation_rows())
    return generation_grid.DEPLOYMENT_GENERATION.read(folder)


def test_the_table_holds_the_known_latencies_and_throughput(written):
    merged = row(written, "peft", "merged", 1)
    assert [merged[f"ttft_p{q}_ms"] for q in (50, 95, 99)] == pytest.approx([30.0, 48.0, 49.6])
    assert merged["tpot_p50_ms"] == pytest.approx(TPOT_MS) and merged["itl_p99_ms"] == pytest.approx(TPOT_MS)
    assert merged["e2e_p50_ms"] == pytest.approx(30.0 + 7 * TPOT_MS)
    assert merged["requests"] == 5 and merged["output_tokens"] == OUTPUT_TOKENS and merged["status"] == "ok"
    for r in (row(written, "vllm", "separate", 16), row(written, "vllm", "merged", 1, prompts=4)):
        assert r["output_tokens_per_s"] == pytest.approx(r["requests_per_s"] * r["prompts"] * OUTPUT_TOKENS)
    assert row(written, "vllm", "merged", 16)["output_tokens_per_s"] == pytest.approx(PER_S * 16 * OUTPUT_TOKENS)
    separate = row(written, "vllm", "separate", 16)
    assert separate["tokens_per_s_vs_merged"] == pytest.approx(0.8)
    assert separate[["tpot_overhead_vs_merged", "tpot_overhead_vs_merged_ci_high"]].tolist() == pytest.approx(
        [1.1, 1.1]
    )
    assert separate["tpot_overhead_vs_full"] == pytest.approx(1.1)
    assert [merged[f"prompt_tokens_{s}"] for s in ("mean", "p50", "p95")] == pytest.approx([40.0, 30.0, 88.0])
    skipped = written[written["status"] == "skipped"].iloc[0]
    assert (skipped["engine"], skipped["strategy"], skipped["note"]) == ("vllm", "switch", NOT_TIMED)
    assert "one request at a time" in merged["batching"] and pd.isna(merged["server_gpu_mb"])


@pytest.mark.parametrize(
    "separate, outcome",
    [
        ((1.1,) * 5, "met"),
        ((1.29,) * 5, "met"),  # just under the threshold
        ((1.5,) * 5, "not met"),
        ((1.1, 1.5, 1.2, 1.45, 1.3), "inconclusive"),  # median +30 %, interval across it
    ],
)
def test_deployment_criterion_reads_separate_over_merged_on_vllm(separate, outcome):
    table = generation_rows(separate)
    r = verdict.row("squad_v2", verdict.generation_deployment(table, 0.30))
    assert r["outcome"] == outcome and r["criterion"] == "deployment" and r["direction"] == "at most"
    assert r["value"] == pytest.approx(float(np.median(separate)) - 1)
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert f"Engine vllm: {r['value']:+.1%}" in r["rule"]


def test_deployment_criterion_falls_back_to_peft_without_a_timed_vllm_cell():
    table = generation_rows((1.5,) * 5, vllm_separate_at_one=False)
    assert (row(table, "vllm", "merged", 1)["status"], len(table[table["status"] == "failed"])) == ("ok", 1)
    r = verdict.row("squad_v2", verdict.generation_deployment(table, 0.30))
    assert r["outcome"] == "not met" and "Engine peft: +50.0%" in r["rule"]
    nothing = table[table["strategy"] != "separate"]
    assert verdict.row("t", verdict.generation_deployment(nothing, 0.30))["outcome"] == "not run"


def test_throughput_row_informs_and_a_classification_result_keeps_deciding(written):
    classification = verdict.Criterion("deployment", (0.05, 0.01, 0.09), 0.30, False, "classification rule")
    kept, throughput = verdict.serving_criteria(classification, written, 0.30)
    assert kept is classification
    shown = verdict.row("t", throughput)
    assert shown["criterion"] == "generation throughput" and shown["outcome"] == "shown"
    assert shown["value"] == pytest.approx(0.8)
    assert (
        "vllm at 16 clients: separate 0.800, multi 0.700 (the value); peft at 4 clients: separate 0.800"
        in (shown["rule"])
    )
    undecided = verdict.Criterion("deployment", None, 0.30, False, "classification rule")
    deployment, _ = verdict.serving_criteria(undecided, written, 0.30)
    assert "Engine vllm" in deployment.rule and deployment.estimate.value == pytest.approx(0.1)
    assert verdict.serving_criteria(classification, None, 0.30) == [classification]


def generative_study(root: Path, table: pd.DataFrame) -> Study:
    """A study whose runs trained one generative task and whose deploy stage served it only."""
    study = Study(root)
    for metrics in performance_rows({"squad_v2": "f1"}):
        folder = study.run_dir(metrics["task"], metrics["method"], metrics["seed"])
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    runs.write_performance_table(study)
    generation_grid.DEPLOYMENT_GENERATION.write(study.tables, table)
    return study


def test_analyze_judges_deployment_from_the_generation_table(tmp_path, written):
    study = generative_study(tmp_path / "s", written)
    config = validate({"name": "gen", "tasks": {"squad_v2": {}}, "analysis": {"bootstrap": 200}})
    analysis.analyze(study, config)
    table = analysis.VERDICT.read(study.tables).set_index(["task", "criterion"])
    deployment = table.loc[("squad_v2", "deployment")]
    assert deployment["outcome"] == "met" and deployment["value"] == pytest.approx(0.1)
    assert "Engine vllm: +10.0%" in deployment["rule"]
    assert table.loc[("squad_v2", "generation throughput"), "outcome"] == "shown"
    assert "generation throughput" not in table.loc[("squad_v2", "recommended"), "rule"]


def section(md: str, heading: str) -> str:
    start = md.index(f"\n## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end > 0 else None]


def test_report_section_shows_the_tables_numbers_and_its_figures(tmp_path, written):
    study = generative_study(tmp_path / "s", written)
    md_path, html_path = report.write_report(study.root)
    md, html = md_path.read_text(), html_path.read_text()
    text = section(md, "Generation serving")
    assert "| vLLM server: output tokens/s | concurrency 1 | concurrency 4 | concurrency 16 |" in text
    assert f"| separate | {0.8 * PER_S * OUTPUT_TOKENS:.1f} | {0.8 * PER_S * 4 * OUTPUT_TOKENS:.1f} |" in text
    assert f"| merged | {PER_S * OUTPUT_TOKENS:.1f} | {PER_S * 4 * OUTPUT_TOKENS:.1f} | 2560.0 |" in text
    assert "| PEFT in-process | merged | 4 | 30.0 (48.0 / 49.6) | 5.0 (5.0 / 5.0) |" in text
    assert "| vLLM server | separate | +10.0 [+10.0, +10.0] | 16 | +10.0 [+10.0, +10.0] | 0.800 |" in text
    assert "| vLLM server | multi | +20.0 [+20.0, +20.0] | 16 | +20.0 [+20.0, +20.0] | 0.700 |" in text
    assert "| vLLM server | merged | 1516 | 7000 |" in text and "| PEFT in-process | merged | — |" not in text
    assert f"| vLLM server | switch | skipped | {NOT_TIMED} |" in text
    assert "40.0 tokens long on average (median 30, p95 88)" in text and "exactly 8 tokens per prompt" in text
    assert "ignoring end-of-sequence" in text and "PEFT in-process: none: one request at a time" in text
    for name in ("generation_throughput", "generation_latency"):
        png = study.figures / f"report_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{png.name}" in text
    assert html.count("<img ") == 3  # training cost, and the two above
    (tmp_path / "empty").mkdir()
    assert "Generation serving" not in report.write_report(tmp_path / "empty")[0].read_text()


def test_a_table_without_timed_cells_reads_not_run(tmp_path):
    folder = Study(tmp_path).tables
    extra = grid.not_measured("vllm", "merged", [grid.Cell(1, 1)], "failed", "server died", "cpu")
    table = generation_grid.generation_table([], extra, OUTPUT_TOKENS, PROMPT_LENGTHS, "cpu")
    generation_grid.DEPLOYMENT_GENERATION.write(folder, table)
    text = section(report.write_report(tmp_path)[0].read_text(), "Generation serving")
    assert (
        "*not run: no cell of one prompt per request was timed*" in text and "| vLLM server | merged | failed |" in text
    )
    assert math.isnan(verdict.row("t", verdict.generation_throughput(table))["value"])
