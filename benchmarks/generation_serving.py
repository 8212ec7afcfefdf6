"""Generation serving of SmolLM2-135M-Instruct with two LoRA adapters: PEFT in-process vs vLLM.
Measured with lorascope's own machinery on real SQuAD v2 prompts.

    python benchmarks/generation_serving.py [--requests 100] [--output-tokens 32] [--quick] [--json FILE] [--out DIR]

Inputs: two random CAUSAL_LM LoRA adapters (the qa profile's r, alpha and target modules,
init_lora_weights=False: outputs change, seeds 0 and 1) on the bundled base, and the qa profile's
SQuAD v2 eval prompts (the `bench` command's task pipeline) that leave room for --output-tokens
within model.max_length. Every request generates exactly --output-tokens tokens (eos ignored).
Every vLLM server runs with --no-enable-prefix-caching unless --prefix-caching: the grid sends each
prompt several times (both adapters' streams hold the same prompts; every cell reuses requests
0..N-1), and a cached prompt skips its prefill (measured: vllm bench after lorascope on the same
prompts, TTFT p50 145 against 503 ms over 8 requests), where PEFT recomputes every prompt.

1. vLLM / PEFT: `serving.generation_benchmark.benchmark_generation` (checks, then the grid:
   strategies merged and separate, one prompt a request, concurrency 1 and 16, --requests timed
   requests a strategy and cell) run twice, the same process; TTFT and TPOT p50 at concurrency 1,
   output tokens/s at 16. PEFT runs as the `bench` command runs it (the qa profile's bf16
   autocast unless --fp32; one request at a time) on --threads torch threads (default 1: two
   threads took 3-5x longer a token while other jobs held the two cores), vLLM in float32 with
   continuous batching.
2. Separate over merged TPOT (tpot_overhead_vs_merged, median of per-request ratios) of both
   passes and their difference, per engine.
3. The LoRA path on vLLM, on fresh servers: a LoRA-enabled server (both adapters) and a merged
   server (no --enable-lora; vLLM CPU compiles it, the LoRA server runs eager). Adapter vs "base"
   (no adapter) on the LoRA server alternating request by request, then adapter, base on the LoRA
   server and the merged server in turns of 20 (serving.load.TURNS["vllm"]); TPOT ratios.
4. lorascope's load generator (grid.measure in one turn, summarised as the grid table) against
   `vllm bench serve` on the merged server, the same prompts (decoded to text: they re-tokenize to
   the same ids, checked; a ShareGPT-format file), output length and concurrency, warm-up
   requests on both sides (vllm bench's repeat its first prompt).
   vllm bench's output tokens/s spans its whole run, lorascope's the steady state (every client
   busy); the whole-run figure of lorascope is given too."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorascope import modeling, runtime
from lorascope.config import DeployConfig
from lorascope.config_io import load_config
from lorascope.prepared import split_and_tokenize
from lorascope.serving import peft_generation
from lorascope.serving.generation_benchmark import benchmark_generation, servable
from lorascope.serving.generation_grid import generation_examples, summary, tpot_ms
from lorascope.serving.grid import GENERATE, Cell, Workload, measure
from lorascope.serving.inputs import Models, interleave
from lorascope.serving.load import TURNS, Turns, say
from lorascope.serving.vllm_engine import write_merged
from lorascope.serving.vllm_generation import stream
from lorascope.serving.vllm_server import IDLE_SPIN_S, VllmServer, find_vllm_python
from lorascope.stats import median_paired_ratio
from lorascope.tasks import load_raw, resolve_task

warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TASK, SQUAD = "squad_v2", "/work/shared/data/squad_v2"
# `vllm bench serve` without the `vllm` console script (it fails before parsing, see vllm_server)
VLLM_BENCH = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\nadd_cli_args(parser)\nmain(parser.parse_args(sys.argv[1:]))\n"
)


def markdown(rows: list[dict]) -> None:
    def cell(v) -> str:
        return f"{v:,.3f}" if isinstance(v, float) else str(v)

    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(map(cell, row.values())) + " |")
    print(flush=True)


def ci(values) -> str:
    ratio, low, high = values
    return f"{ratio:.3f} [{low:.3f}, {high:.3f}]"


def make_adapters(base: str, lora, folder: Path) -> dict[str, str]:
    adapters = {}
    for seed, name in enumerate(("qa_a", "qa_b")):
        transformers.set_seed(seed)
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            target_modules=list(lora.target_modules),
            init_lora_weights=False,  # B random too: the adapter changes what the model answers
        )
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder / name)
        adapters[name] = str(folder / name)
    return adapters


def grid_config(config, args) -> DeployConfig:
    grid = {
        "batch_sizes": [1],
        "seq_lens": ["natural"],
        "concurrency": [1, 16],
        "repeats": args.requests,
        "requests": args.requests,
        "warmup": args.warmup,
        "output_tokens": args.output_tokens,
        "threads": args.threads,
    }
    return DeployConfig.model_validate(
        config.deploy.model_dump()
        | {
            "enabled": True,
            "engines": ["peft", "vllm"],
            "strategies": ["merged", "separate"],
            "bootstrap": args.bootstrap,
            "vllm": {"args": [] if args.prefix_caching else ["--no-enable-prefix-caching"]},
            "grid": grid,
            "checks": {"examples": args.check_examples},
        }
    )


def engines_table(passes: list) -> list[dict]:
    """Table 1: vLLM / PEFT per strategy, pass 1's values and both passes' ratios."""
    rows = []
    for strategy in ("merged", "separate"):
        for label, column, concurrency in (
            ("TTFT p50 ms", "ttft_p50_ms", 1),
            ("TPOT p50 ms", "tpot_p50_ms", 1),
            ("output tokens/s", "output_tokens_per_s", 16),
        ):
            value = {}
            for k, table in enumerate(passes):
                for engine in ("vllm", "peft"):
                    hit = table[(table.engine == engine) & (table.strategy == strategy)]
                    hit = hit[(hit.concurrency == concurrency) & (hit.status == "ok")]
                    value[k, engine] = float(hit[column].iloc[0]) if len(hit) else float("nan")
            rows.append(
                {
                    "strategy": strategy,
                    "metric": f"{label} @ {concurrency}",
                    "vLLM (pass 1)": value[0, "vllm"],
                    "PEFT (pass 1)": value[0, "peft"],
                    **{f"vLLM / PEFT pass {k + 1}": value[k, "vllm"] / value[k, "peft"] for k in range(len(passes))},
                }
            )
    return rows


def overhead_table(passes: list) -> list[dict]:
    """Table 2: separate's tpot_overhead_vs_merged in both passes and their difference."""
    rows = []
    for engine in ("peft", "vllm"):
        for concurrency in (1, 16):
            got = []
            for table in passes:
                hit = table[(table.engine == engine) & (table.strategy == "separate")]
                hit = hit[(hit.concurrency == concurrency) & (hit.status == "ok")]
                got.append(hit.iloc[0] if len(hit) else None)
            if any(g is None for g in got):
                continue
            rows.append(
                {
                    "engine": engine,
                    "concurrency": concurrency,
                    **{
                        f"pass {k + 1}": ci(g[[f"tpot_overhead_vs_merged{s}" for s in ("", "_ci_low", "_ci_high")]])
                        for k, g in enumerate(got)
                    },
                    "difference (pp)": 100 * (got[1].tpot_overhead_vs_merged - got[0].tpot_overhead_vs_merged),
                }
            )
    return rows


def lora_path(lora: VllmServer, merged: VllmServer, workload: Workload, cfg: DeployConfig, first: str) -> list[dict]:
    """Table 3: TPOT of the adapter against the base on the LoRA server (A/B request by request)
    and against the merged server (turns of 20)."""
    tokens, cell = cfg.grid.output_tokens, Cell(1, 1, kind=GENERATE)

    def send(server, name):
        return lambda request: stream(server, name, request.rows, tokens)

    ab = measure("vllm", {"adapter": send(lora, first), "base": send(lora, "base")}, workload, cell, cfg.grid, Turns())
    time.sleep(2 * IDLE_SPIN_S)
    sends = {"adapter": send(lora, first), "base": send(lora, "base"), "merged": send(merged, "base")}
    turns = {m.strategy: m for m in measure("vllm", sends, workload, cell, cfg.grid, TURNS["vllm"])}
    n = cfg.bootstrap

    def row(what, order, a, b):
        return {
            "comparison": what,
            "order": order,
            "TPOT p50 ms (A)": float(np.median(tpot_ms(a))),
            "TPOT p50 ms (B)": float(np.median(tpot_ms(b))),
            "A / B TPOT [95% CI]": ci(median_paired_ratio(tpot_ms(a), tpot_ms(b), n, blocks=a.turns)),
        }

    return [
        row("adapter / base, LoRA server", "alternating requests", *ab),
        row("adapter / base, LoRA server", "turns of 20", turns["adapter"], turns["base"]),
        row("base on LoRA server / merged server", "turns of 20", turns["base"], turns["merged"]),
        row(
            "adapter on LoRA server / merged server (= separate / merged)",
            "turns of 20",
            turns["adapter"],
            turns["merged"],
        ),
    ]


def vllm_bench(server: VllmServer, texts: list[str], concurrency: int, warmups: int, tokens: int, folder: Path) -> dict:
    """`vllm bench serve` on `texts` in order; its result JSON. They go as a ShareGPT file (first
    turn: the prompt, sent as it is): the `custom` dataset reads JSONL with pandas, which vLLM's
    environment lacks."""
    data, result = folder / "prompts.json", folder / f"vllm-bench-{concurrency}.json"
    turns = [{"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": ""}]} for t in texts]
    data.write_text(json.dumps(turns))
    command = [server.python, "-c", VLLM_BENCH, "--backend", "openai", "--host", server.host]
    command += ["--port", str(server.port), "--model", str(server.model_dir), "--served-model-name", server.model]
    command += ["--dataset-name", "sharegpt", "--dataset-path", str(data), "--disable-shuffle", "--no-oversample"]
    command += ["--num-prompts", str(len(texts)), "--output-len", str(tokens), "--ignore-eos", "--temperature", "0"]
    command += ["--max-concurrency", str(concurrency), "--num-warmups", str(warmups), "--disable-tqdm"]
    command += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95,99"]
    command += ["--save-result", "--result-dir", str(folder), "--result-filename", result.name]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    with open(folder / f"vllm-bench-{concurrency}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return json.loads(result.read_text())


def cross_check(server: VllmServer, workload: Workload, cfg: DeployConfig, tokenizer, folder: Path) -> list[dict]:
    """Table 4: lorascope's closed loop (one turn) vs `vllm bench serve`, alternating which goes first."""
    rows, tokens, grid = [], cfg.grid.output_tokens, cfg.grid.model_copy(update={"rounds": 1})
    n = grid.requests
    ids = [r.rows[0]["input_ids"] for r in workload.requests(Cell(1, 1, kind=GENERATE), 0, n).values()]
    texts = [tokenizer.decode(i) for i in ids]
    if differ := sum(tokenizer(t)["input_ids"] != list(i) for t, i in zip(texts, ids)):
        say(f"cross-check: {differ} of {n} prompt texts re-tokenize to other ids")
    for concurrency in (1, 16):
        cell, warmups = Cell(concurrency, 1, kind=GENERATE), Turns().first_warmup(concurrency, grid.warmup)
        got = {}
        for side in ("lorascope", "vllm bench") if concurrency == 1 else ("vllm bench", "lorascope"):
            time.sleep(2 * IDLE_SPIN_S)
            if side == "lorascope":
                send = {"lorascope": lambda request: stream(server, server.model, request.rows, tokens)}
                (m,) = measure("vllm", send, workload, cell, grid, Turns())
                timed = m.answers.values()  # whole run: first timed request sent to last answer, as vllm bench
                wall = max(a.done for a in timed) - min(a.sent for a in timed)
                got[side] = summary(m, tokens) | {"whole_run": n * tokens / wall}
            else:
                out = vllm_bench(server, texts, concurrency, warmups, tokens, folder)
                got[side] = {
                    "ttft_p50_ms": out["p50_ttft_ms"],
                    "tpot_p50_ms": out["p50_tpot_ms"],
                    "output_tokens_per_s": out["output_throughput"],
                    "sent": f"{out['completed']} + {warmups} warm-up + 1 test",
                }
        ours, theirs = got["lorascope"], got["vllm bench"]
        rows.append(
            {
                "concurrency": concurrency,
                "prompts sent (lorascope)": f"{n} + {warmups} warm-up",
                "prompts sent (vllm bench)": theirs["sent"],
                "TTFT p50 ms lorascope / vllm bench": f"{ours['ttft_p50_ms']:.1f} / {theirs['ttft_p50_ms']:.1f}",
                "TTFT ratio": ours["ttft_p50_ms"] / theirs["ttft_p50_ms"],
                "TPOT p50 ms lorascope / vllm bench": f"{ours['tpot_p50_ms']:.2f} / {theirs['tpot_p50_ms']:.2f}",
                "TPOT ratio": ours["tpot_p50_ms"] / theirs["tpot_p50_ms"],
                "tokens/s lorascope (whole run) / vllm bench": (
                    f"{ours['output_tokens_per_s']:.1f} ({ours['whole_run']:.1f}) / {theirs['output_tokens_per_s']:.1f}"
                ),
                "tokens/s ratio": ours["output_tokens_per_s"] / theirs["output_tokens_per_s"],
                "whole-run tokens/s ratio": ours["whole_run"] / theirs["output_tokens_per_s"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="timed requests per strategy and cell, and per arm")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per client before a cell")
    parser.add_argument("--check-examples", type=int, default=32, help="prompts per adapter the checks score")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of PEFT (1 is steadiest on a shared machine)"
    )
    parser.add_argument("--fp32", action="store_true", help="PEFT in float32 (default: the qa profile's bf16 autocast)")
    parser.add_argument(
        "--prefix-caching", action="store_true", help="leave vLLM's prefix caching on (the grid repeats prompts)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 requests, 2 check prompts")
    parser.add_argument("--json", help="write every table here as JSON")
    parser.add_argument("--out", help="keep outputs and server logs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.check_examples, args.bootstrap = 16, 1, 2, 100
    started = time.perf_counter()

    config = load_config(None, "qa", [f"data.squad_v2={SQUAD}", "runtime.progress=false"])
    tokenizer = modeling.load_tokenizer(config.model.name)
    base = modeling.resolve_model_path(config.model.name)
    task, train, evaluation = load_raw(resolve_task(TASK, config.tasks[TASK], config.data))
    _, splits, _ = split_and_tokenize(task, train, evaluation, tokenizer, config)
    examples, _ = servable({TASK: generation_examples(splits["eval"])}, config.model.max_length, args.output_tokens)
    examples = examples[TASK]
    out = Path(args.out or tempfile.mkdtemp(prefix="generation-serving-"))
    adapters = make_adapters(base, config.training.lora, out / "adapters")
    cfg = grid_config(config, args)
    device = runtime.pick_device(config.runtime)
    bf16 = runtime.uses_bf16(config.runtime, device) and not args.fp32
    served = {name: examples for name in adapters}

    passes = []
    with runtime.threads(args.threads):
        for k in (1, 2):
            say(f"grid pass {k}")
            result = benchmark_generation(
                base, adapters, None, served, tokenizer, cfg, out / f"pass{k}", config.model.max_length, device, bf16
            )
            passes.append(result.table)

    say("LoRA path and cross-check servers")
    models = Models(base, adapters)
    merged_dir = write_merged(models, None, tokenizer.pad_token_id, tokenizer, out / "merged")
    workload = Workload(
        interleave(served), tokenizer.pad_token_id, peft_generation.INPUTS, cfg.grid.warmup, kind=GENERATE
    )
    common = {
        "runner": "generate",
        "max_model_len": config.model.max_length,
        "python": find_vllm_python(cfg.vllm.python),
    }
    common |= {"startup_timeout": cfg.vllm.startup_timeout, "extra_args": cfg.vllm.args}
    with (
        VllmServer(base, lora_modules=adapters, log_path=out / "logs" / "lora.log", **common) as lora,
        VllmServer(merged_dir, log_path=out / "logs" / "merged.log", **common) as merged,
    ):
        lora_rows = lora_path(lora, merged, workload, cfg, next(iter(adapters)))
        bench_rows = cross_check(merged, workload, cfg, tokenizer, out)

    prompts = np.array([len(r["input_ids"]) for r in examples])
    print(
        f"## Generation serving: SmolLM2-135M-Instruct + 2 LoRA adapters (r {config.training.lora.r}, "
        f"{len(config.training.lora.target_modules)} target modules), {len(examples)} SQuAD v2 eval prompts "
        f"({prompts.mean():.0f} tokens mean, {prompts.max()} max), {args.output_tokens} output tokens, "
        f"{args.requests} timed requests per cell, PEFT {'bf16 autocast' if bf16 else 'fp32'} on {device.type} "
        f"({args.threads} threads), vLLM float32\n"
    )
    print("### 1. vLLM / PEFT (grid passes 1 and 2)\n")
    markdown(engine_rows := engines_table(passes))
    print("### 2. Separate over merged TPOT (tpot_overhead_vs_merged [95% CI]), two passes in one run\n")
    markdown(overhead_rows := overhead_table(passes))
    print("### 3. vLLM separate: the LoRA path (concurrency 1)\n")
    markdown(lora_rows)
    print("### 4. lorascope's load generator / `vllm bench serve`, merged server\n")
    markdown(bench_rows)
    print(f"(outputs: {out}; {(time.perf_counter() - started) / 60:.1f} min)")
    if args.json:
        tables = {"vllm_vs_peft": engine_rows, "separate_over_merged": overhead_rows, "lora_path": lora_rows}
        tables |= {"cross_check": bench_rows, "passes": [json.loads(t.to_json(orient="records")) for t in passes]}
        Path(args.json).write_text(json.dumps({"args": vars(args), **tables}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
