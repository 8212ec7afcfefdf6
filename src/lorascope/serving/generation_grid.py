"""Generation in the one serving grid: prompts as requests of kind `generate` (grid.GENERATE), each
answered by a fixed number of streamed tokens (serving.streaming), and the table of what that
costs per engine, strategy and cell: time to first token, time per output token, inter-token and
end-to-end latency (p50 / p95 / p99), output tokens/s and requests/s in steady state, memory, and
the time-per-output-token overhead of every strategy over merged and full (grid.overheads)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lorascope.serving.grid import Measured, in_strategy_order
from lorascope.study import Table

PERCENTILES = (50, 95, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
BATCHING = {
    "peft": "none: one request at a time, as a single-worker server without batching",
    "vllm": "continuous batching",
}
DEPLOYMENT_GENERATION = Table(
    "deployment_generation",
    (
        "engine",
        "strategy",
        "concurrency",
        "prompts",
        "requests",
        "output_tokens",
        *(f"{name}_p{q}_ms" for name in LATENCIES for q in PERCENTILES),
        "output_tokens_per_s",
        "requests_per_s",
        "tokens_per_s_vs_merged",
        "tpot_overhead_vs_merged",
        "tpot_overhead_vs_merged_ci_low",
        "tpot_overhead_vs_merged_ci_high",
        "tpot_overhead_vs_full",
        "tpot_overhead_vs_full_ci_low",
        "tpot_overhead_vs_full_ci_high",
        "prompt_tokens_mean",
        "prompt_tokens_p50",
        "prompt_tokens_p95",
        "server_rss_mb",
        "server_gpu_mb",
        "max_in_flight",
        "tokens_per_chunk",
        "batching",
        "device",
        "status",
        "note",
    ),
)


def generation_examples(split) -> list[dict]:
    """A prepared generative split (prompt + completion + eos in input_ids, prompt_length) to
    serving examples: the prompt's token ids (input_ids) and the reference completion's
    (completion_ids, what the checks score)."""
    return [
        {"input_ids": ids[:n], "completion_ids": ids[n:]} for ids, n in zip(split["input_ids"], split["prompt_length"])
    ]


def tpot_ms(m: Measured) -> np.ndarray:
    """Time per output token of each timed request, by request number."""
    return np.array([m.answers[k].tpot_ms for k in range(len(m.taken.latencies_ms))])


def summary(m: Measured, output_tokens: int) -> dict:
    """Percentiles (numpy's linear interpolation) over the timed requests (inter-token: over every
    gap of every request), throughput over the turns' steady states (load.closed_loop)."""
    streams = [m.answers[k] for k in range(len(m.taken.latencies_ms))]
    values = {
        "ttft": [s.ttft_ms for s in streams],
        "tpot": tpot_ms(m),
        "itl": [gap for s in streams for gap in s.itl_ms],
        "e2e": m.taken.latencies_ms,
    }
    out = {
        f"{name}_p{q}_ms": p
        for name, v in values.items()
        for q, p in zip(PERCENTILES, np.percentile(np.asarray(v, dtype=float), PERCENTILES))
    }
    return out | {
        "requests": len(streams),
        "output_tokens": output_tokens,
        "requests_per_s": m.taken.requests_per_s,
        "output_tokens_per_s": m.taken.requests_per_s * m.cell.size * output_tokens,
        "max_in_flight": m.taken.max_in_flight,
        "tokens_per_chunk": float(np.mean([s.tokens_per_chunk for s in streams])),
    }


def generation_table(
    measured: list[Measured], extra: list[dict], output_tokens: int, prompt_lengths, device: str
) -> pd.DataFrame:
    """One row per engine x strategy x cell, the strategies not timed with their reason (`extra`);
    prompt_tokens_* describe the prompts the requests were drawn from."""
    lengths = np.asarray(prompt_lengths, dtype=float)
    prompts = {
        "prompt_tokens_mean": lengths.mean(),
        "prompt_tokens_p50": np.percentile(lengths, 50),
        "prompt_tokens_p95": np.percentile(lengths, 95),
    }
    rows = [r | {"batching": BATCHING[r["engine"]], "prompts": r.pop("batch_size")} for r in map(dict, extra)]
    merged = {(m.engine, m.cell): summary(m, output_tokens) for m in measured if m.strategy == "merged"}
    for m in measured:
        row = summary(m, output_tokens)
        reference = merged.get((m.engine, m.cell))
        rows.append(
            {
                "engine": m.engine,
                "strategy": m.strategy,
                "concurrency": m.cell.concurrency,
                "prompts": m.cell.size,
                **row,
                "tokens_per_s_vs_merged": row["output_tokens_per_s"] / reference["output_tokens_per_s"]
                if reference
                else np.nan,
                **m.overheads,
                **prompts,
                **m.memory,
                "batching": BATCHING[m.engine],
                "device": device,
                "status": "ok",
                "note": "",
            }
        )
    table = pd.DataFrame(rows).reindex(columns=DEPLOYMENT_GENERATION.columns)
    return DEPLOYMENT_GENERATION.frame(in_strategy_order(table, "prompts"))
