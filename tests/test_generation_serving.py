"""Generation serving: streamed timing against a fake server with known delays, fixed-length
requests, the checks that catch a wrong adapter, the PEFT grid on a tiny decoder, bad input, and
a real vLLM run where its environment exists."""

from __future__ import annotations

import http.server
import json
import threading
import time
import types

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import VLLM_PYTHON, needs_vllm
from lorascope.config import DeployConfig
from lorascope.serving import peft_generation, vllm_generation
from lorascope.serving.generation_benchmark import DEPLOYMENT_GENERATION_CHECKS, benchmark_generation
from lorascope.serving.generation_grid import DEPLOYMENT_GENERATION
from lorascope.serving.grid import GENERATE, Cell, Workload
from lorascope.serving.inputs import Models
from lorascope.serving.streaming import Streamed
from lorascope.serving.vllm_server import VllmServerError

FIRST_S, EVERY_S = 0.15, 0.04  # the fake server's first token, then one token every EVERY_S


class FakeCompletions(http.server.BaseHTTPRequestHandler):
    """/v1/completions streamed as vLLM streams it: the first chunk after FIRST_S, then a chunk of
    one token every EVERY_S (two tokens in the last chunk when `pair_last`), then [DONE]."""

    pair_last = False
    short = 0  # tokens left unsent

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunks = [1] * (body["max_tokens"] - self.short)
        if self.pair_last:
            chunks = [*chunks[:-2], 2]
        for i, n in enumerate(chunks):
            time.sleep(FIRST_S if i == 0 else EVERY_S)
            event = {"choices": [{"index": 0, "text": "x" * n, "token_ids": [7] * n}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(tmp_path):
    handler = type("Handler", (FakeCompletions,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield types.SimpleNamespace(
        host="127.0.0.1", port=httpd.server_address[1], request_timeout=30, log_path=tmp_path / "x.log", handler=handler
    )
    httpd.shutdown()


def test_streamed_ttft_and_tpot_are_the_servers_delays(fake_server):
    """Time to first token = the first delay, time per output token = the delay between tokens,
    each within the overshoot of sleep and HTTP on a busy machine. One gap may overshoot by tens of
    milliseconds when the test workers share the cores (101 ms against 40 once), so the typical gap
    is checked, and that no gap is shorter than the server's delay allows."""
    streamed = vllm_generation.stream(fake_server, "m", [{"input_ids": [1, 2, 3]}], 6)
    assert streamed.output_tokens == 6
    assert FIRST_S <= streamed.ttft_ms / 1e3 < FIRST_S + 0.1
    gaps = sorted(gap / 1e3 for gap in streamed.itl_ms)
    assert len(gaps) == 5 and gaps[2] == pytest.approx(EVERY_S, abs=0.015)  # the median gap
    assert gaps[0] > EVERY_S - 0.02  # a gap is short only by what the one before it overshot
    assert streamed.tpot_ms == pytest.approx(sum(streamed.itl_ms) / 5)  # the decode time over its tokens
    assert streamed.e2e_ms / 1e3 >= FIRST_S + 5 * EVERY_S


def test_a_chunk_of_two_tokens_counts_two_arrivals_at_its_time(fake_server):
    fake_server.handler.pair_last = True
    streamed = vllm_generation.stream(fake_server, "m", [{"input_ids": [1]}], 5)
    assert streamed.output_tokens == 5 and streamed.itl_ms[-1] == 0.0
    # the decode took 3 gaps of EVERY_S for 4 tokens after the first
    assert streamed.tpot_ms / 1e3 == pytest.approx(3 * EVERY_S / 4, abs=0.01)


def test_a_server_that_stops_early_fails_the_fixed_length_request(fake_server):
    fake_server.handler.short = 2
    with pytest.raises(VllmServerError, match="streamed 4 tokens, 6 were asked for"):
        vllm_generation.stream(fake_server, "m", [{"input_ids": [1]}], 6)


def test_streamed_figures_average_over_a_requests_prompts():
    streamed = Streamed(sent=10.0, arrivals=[[10.1, 10.2, 10.3], [10.3, 10.4, 10.5]], done=10.6)
    assert streamed.ttft_ms == pytest.approx(200.0)
    assert streamed.tpot_ms == pytest.approx(100.0)
    assert streamed.itl_ms == pytest.approx([100.0] * 4)
    assert streamed.e2e_ms == pytest.approx(600.0)


# -- a tiny decoder (head dim 32, as vLLM's CPU attention needs) and two adapters ------------------


@pytest.fixture(scope="module")
def decoder(smollm2_dir, tmp_path_factory):
    """A random two-block Llama with SmolLM2's tokenizer whose end-of-sequence token is the likely
    next token after every prompt; adapters `a` and `b` (random B: they change outputs) and a
    'fully fine-tuned' copy."""
    folder = tmp_path_factory.mktemp("gen-serving")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # end-of-sequence wins often: greedy stops early unless told not to
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight.mean(0) + 0.4
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    for seed, name in enumerate(("a", "b"), start=1):
        torch.manual_seed(seed)
        lora = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(LlamaForCausalLM.from_pretrained(folder / "base"), lora).save_pretrained(folder / name)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.save_pretrained(folder / "full")
    tokenizer.save_pretrained(folder / "full")
    texts = ["The capital of France is", "Context: a cat sat. Question: who sat? Answer:", "One two three", "Hello"]
    completion = tokenizer(" Paris")["input_ids"] + [tokenizer.eos_token_id]
    examples = [{"input_ids": tokenizer(t)["input_ids"], "completion_ids": completion} for t in texts * 3]
    return types.SimpleNamespace(folder=folder, tokenizer=tokenizer, examples=examples)


def _models(decoder, *names, full=True) -> Models:
    return Models(
        str(decoder.folder / "base"),
        {n: str(decoder.folder / n) for n in names},
        str(decoder.folder / "full") if full else None,
    )


def test_a_timed_request_generates_exactly_output_tokens_where_greedy_stops_early(decoder):
    tokenizer, rows = decoder.tokenizer, [{**r, "task": "a"} for r in decoder.examples[:4]]
    models = _models(decoder, "a")
    model = peft_generation.load(["separate"], {}, models, tokenizer.pad_token_id, torch.device("cpu"))["separate"]
    free = peft_generation.greedy(model, rows, 8, tokenizer.pad_token_id, tokenizer.eos_token_id, "cpu")
    assert min(map(len, free)) < 8  # left alone, some prompt stops at end-of-sequence
    generation = peft_generation.fixed_length(8, tokenizer.pad_token_id, tokenizer.eos_token_id)
    send = peft_generation.sender(model, "separate", ["a"], torch.device("cpu"), False, generation)
    workload = Workload(rows, tokenizer.pad_token_id, peft_generation.INPUTS, 0, kind=GENERATE)
    request = workload.requests(Cell(1, 4), 0, 1)[0]
    assert (request.batch.inputs["attention_mask"][:, -1] == 1).all()  # left-padded
    streamed = send(request)
    assert streamed.output_tokens == 4 * 8 and all(len(times) == 8 for times in streamed.arrivals)
    assert 0 < streamed.ttft_ms < streamed.e2e_ms


def test_checks_fail_when_another_adapter_or_the_base_answers(decoder):
    tokenizer, rows = decoder.tokenizer, decoder.examples[:6]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def answers(strategy, *names):
        model = peft_generation.load([strategy], {}, _models(decoder, *names), pad, "cpu")[strategy]
        return peft_generation.answers(model, rows, 6, pad, eos, "cpu")

    a = answers("separate", "a")
    assert peft_generation.compare("same", "a", answers("merged", "a"), a)["passed"]
    for wrong in (answers("separate", "b"), answers("base", "a")):
        row = peft_generation.compare("wrong", "a", wrong, a)
        assert not row["passed"] and row["max_abs_diff"] > 0.05


GRID = {"concurrency": [1, 2], "batch_sizes": [1, 3], "seq_lens": ["natural"], "requests": 6, "repeats": 6}


def _cfg(engines=("peft",), **grid) -> DeployConfig:
    return DeployConfig(
        engines=list(engines),
        strategies=["full", "merged", "separate", "multi"],
        grid=GRID | {"output_tokens": 5, "warmup": 1} | grid,
        bootstrap=50,
        vllm={"python": VLLM_PYTHON, "args": ["--enforce-eager"], "startup_timeout": 600},
    )


def test_peft_generation_grid_on_two_adapters(decoder, tmp_path):
    long_prompt = {"input_ids": [5] * 60, "completion_ids": [6]}
    examples = {"a": [*decoder.examples, long_prompt], "b": decoder.examples}
    result = benchmark_generation(
        str(decoder.folder / "base"),
        {n: str(decoder.folder / n) for n in ("a", "b")},
        str(decoder.folder / "full"),
        examples,
        decoder.tokenizer,
        _cfg(),
        tmp_path,
        max_length=64,
    )
    assert result.left_out == 1  # 60 prompt tokens + 5 output tokens > 64
    checks = DEPLOYMENT_GENERATION_CHECKS.read(tmp_path)
    assert checks["passed"].all() and set(checks["check"]) == {
        "merged_vs_separate",
        "multi_vs_alone",
        "switch_vs_fresh",
    }
    assert checks["max_abs_diff"].max() < 1e-4
    table = DEPLOYMENT_GENERATION.read(tmp_path)
    assert (table["status"] == "ok").all() and (table["engine"] == "peft").all()
    assert len(table) == 4 * 3  # strategies x cells (1 client x 1 and 3 prompts, 2 clients x 1)
    assert set(zip(table["concurrency"], table["prompts"])) == {(1, 1), (1, 3), (2, 1)}
    assert (table["requests"] == 6).all() and (table["output_tokens"] == 5).all()
    throughput = table["requests_per_s"] * table["prompts"] * table["output_tokens"]
    pd.testing.assert_series_equal(table["output_tokens_per_s"], throughput, check_names=False)
    assert (table["ttft_p50_ms"] < table["e2e_p50_ms"]).all() and (table["tpot_p50_ms"] > 0).all()
    merged = table[table["strategy"] == "merged"]
    assert (merged["tpot_overhead_vs_merged"] == 1).all() and (merged["tokens_per_s_vs_merged"] == 1).all()
    assert table["prompt_tokens_p50"].nunique() == 1 and table["prompt_tokens_mean"].iloc[0] < 20
    assert table["batching"].str.startswith("none: one request at a time").all()


def test_bad_generation_serving_input_is_one_line_and_exit_2(tmp_path, capsys):
    from lorascope.cli import main

    for override, message in (
        ("deploy.grid.output_tokens=0", "output_tokens"),
        ("deploy.grid.concurrency=[0]", "concurrency"),
        ("deploy.vllm.args=[--max-loras, '1']", "--max-loras 1 is fewer than the 2 adapters served"),
    ):
        argv = ["run", "--profile", "smoke", "--out", str(tmp_path / "s"), "--set", override]
        argv += ["--set", "seeds=[1, 2]", "--set", "tasks={squad_v2: {}}"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()


@needs_vllm
def test_vllm_generation_matches_peft_and_is_timed(decoder, tmp_path):
    """A real vLLM run on the tiny decoder (one adapter server: separate and multi): both pass the
    check against PEFT and are timed with streamed requests, multi one prompt a request."""
    cfg = _cfg(("vllm",), concurrency=[1, 2], batch_sizes=[1, 2])
    cfg.strategies = ["separate", "multi"]
    result = benchmark_generation(
        str(decoder.folder / "base"),
        {n: str(decoder.folder / n) for n in ("a", "b")},
        None,
        {"a": decoder.examples, "b": decoder.examples},
        decoder.tokenizer,
        cfg,
        tmp_path,
        max_length=64,
    )
    vllm_checks = result.checks[result.checks["engine"] == "vllm"]
    assert list(vllm_checks["strategy"]) == ["separate", "multi", "multi"] and vllm_checks["passed"].all()
    assert vllm_checks["max_abs_diff"].max() < vllm_generation.VLLM_LOGPROB_ATOL
    table = result.table.set_index(["strategy", "concurrency", "prompts"])
    assert (table["engine"] == "vllm").all() and table.loc[("multi", 1, 2), "note"] == vllm_generation.ONE_PROMPT
    timed = table[table["status"] == "ok"]
    assert len(timed) == 5 and (timed["server_rss_mb"] > 100).all() and (timed["requests"] == 6).all()
    assert timed.loc[("separate", 2, 1), "max_in_flight"] == 2
    assert (timed["ttft_p50_ms"] < timed["e2e_p50_ms"]).all() and (timed["tokens_per_chunk"] >= 1).all()
    assert (tmp_path / "logs" / "vllm-generation-adapters.log").is_file()


@needs_vllm
def test_vllm_check_fails_when_the_server_answers_with_another_adapter_or_the_base(decoder, tmp_path):
    from lorascope.serving.vllm_server import VllmServer

    tokenizer, rows = decoder.tokenizer, decoder.examples[:6]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = peft_generation.load(["separate"], {}, _models(decoder, "a"), pad, "cpu")["separate"]
    answers = peft_generation.answers(model, rows, 6, pad, eos, "cpu")
    server = VllmServer(
        decoder.folder / "base",
        lora_modules={"a": decoder.folder / "a", "b": decoder.folder / "b"},
        runner="generate",
        python=VLLM_PYTHON,
        log_path=tmp_path / "server.log",
        startup_timeout=600,
        extra_args=["--enforce-eager"],
    )
    with server:
        # `merged` asks the base's name: this server's base has no adapter merged into it
        for served, strategy, passed in (("a", "separate", True), ("b", "separate", False), ("a", "merged", False)):
            references = {strategy: {served: answers}}
            kind = vllm_generation.generation(Models("base", {served: "x"}), {served: rows}, references, 6, eos)
            [row] = kind.check(server, strategy)
            assert row["passed"] is passed, row
        streamed = kind.sender(server, "separate")(
            Workload(rows, pad, (), 0, kind=GENERATE).requests(Cell(1, 2), 0, 1)[0]
        )
        assert streamed.output_tokens == 2 * 6  # end-of-sequence ignored


def test_bench_times_generation_of_anyones_causal_lm_adapters(decoder, squad_sample, tmp_path):
    from lorascope.cli import main

    argv = ["bench", "--base", str(decoder.folder / "base"), "--full", str(decoder.folder / "full")]
    argv += ["--adapter", f"a={decoder.folder / 'a'}", "--adapter", f"b={decoder.folder / 'b'}", "--task", "squad_v2"]
    for override in (
        f"data.squad_v2={squad_sample}",
        "tasks.squad_v2.eval_max=8",
        "model.max_length=400",
        "deploy.strategies=[full, merged, separate, multi]",
        "deploy.grid={batch_sizes: [1], seq_lens: [natural], concurrency: [1], warmup: 0, repeats: 3, output_tokens: 3}",
        "deploy.checks.examples=4",
        "deploy.bootstrap=0",
    ):
        argv += ["--set", override]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    table = DEPLOYMENT_GENERATION.read(tmp_path)
    assert list(table["strategy"]) == ["full", "merged", "separate", "multi"] and (table["status"] == "ok").all()
    assert (table["prompt_tokens_mean"] > 100).all()  # SQuAD prompts: a paragraph and a question
    assert DEPLOYMENT_GENERATION_CHECKS.read(tmp_path)["passed"].all()
    assert (tmp_path / "deployment_generation.png").stat().st_size > 0
    assert (tmp_path / "deployment_generation_latency.png").stat().st_size > 0
