"""Do two identical PyTorch processes stay equally fast on this machine? The check behind the
README's account of vLLM's run-to-run spread (vLLM beside PEFT): two identical vLLM servers drifted
apart by 10-19 % over minutes, and it matters whether any two processes do.

    python benchmarks/identical_processes.py [--minutes 6] [--window 30] [--core 0]

Two worker processes, pinned to the same core with one torch thread each (as vLLM's CPU worker
binds one core), hold the same randomly initialised Llama classifier of SmolLM2-135M's shape and
take turns on the same one-example requests (10-40 tokens, like SST-2 sentences): request by
request, or in turns of `--turn` requests as the engine grid sends them, the first turn
alternating. Each worker times its own forward pass, so pipes and the driver are not in
the time. Printed: B over A per window and over the whole run (median of per-request ratios,
bootstrap interval) and how far the windows spread."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from lorascope import stats

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}  # fmt: skip


def worker(core: int, requests) -> None:
    """Serve forward passes from the pipe until it sends None; answer each with its seconds."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**SMOLLM2_135M, num_labels=2, pad_token_id=0)).eval()
    requests.send("ready")
    with torch.inference_mode():
        while (ids := requests.recv()) is not None:
            started = time.perf_counter()
            model(input_ids=torch.tensor([ids]))
            requests.send(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    parser.add_argument("--core", type=int, default=0, help="the core both workers are pinned to")
    parser.add_argument("--turn", type=int, default=1, help="requests a worker serves before the other's turn "
                        "(1: every request alternates; the engine grid's turns are 20 at one client)")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for _ in range(2):
        mine, theirs = spawn.Pipe()
        processes.append(spawn.Process(target=worker, args=(args.core, theirs), daemon=True))
        processes[-1].start()
        pipes.append(mine)
    assert all(pipe.recv() == "ready" for pipe in pipes)
    rng = np.random.default_rng(0)

    def turn(pipe, ids):
        pipe.send(ids)
        return pipe.recv()

    for _ in range(5):  # warm-up
        ids = rng.integers(1, SMOLLM2_135M["vocab_size"], size=25).tolist()
        for pipe in pipes:
            turn(pipe, ids)
    seconds, at, started = [], [], time.perf_counter()
    while time.perf_counter() - started < args.minutes * 60:
        work = [rng.integers(1, SMOLLM2_135M["vocab_size"], size=int(rng.integers(10, 41))).tolist()
                for _ in range(args.turn)]
        order = pipes if len(seconds) // args.turn % 2 == 0 else pipes[::-1]
        took = {id(pipe): [turn(pipe, ids) for ids in work] for pipe in order}
        seconds += zip(*(took[id(pipe)] for pipe in pipes))
        at += [time.perf_counter() - started] * args.turn
    for pipe in pipes:
        pipe.send(None)
    for process in processes:
        process.join()

    a, b, at = np.asarray(seconds)[:, 0], np.asarray(seconds)[:, 1], np.asarray(at)
    print(f"{len(a)} request pairs in {at[-1]:.0f} s; A p50 {np.median(a) * 1e3:.1f} ms, B p50 {np.median(b) * 1e3:.1f} ms")
    print("| window | pairs | A p50 ms | B over A |\n|---|---|---|---|")
    windows = []
    for start in np.arange(0, at[-1], args.window):
        rows = (at >= start) & (at < start + args.window)
        if rows.sum() < 10:
            continue
        ratio, low, high = stats.median_paired_ratio(b[rows], a[rows], n_boot=1000)
        windows.append(ratio)
        print(f"| {start:.0f}-{start + args.window:.0f} s | {rows.sum()} | {np.median(a[rows]) * 1e3:.1f} | "
              f"{ratio - 1:+.1%} [{low - 1:+.1%}, {high - 1:+.1%}] |")  # fmt: skip
    ratio, low, high = stats.median_paired_ratio(b, a, n_boot=1000)
    print(f"whole run: B over A {ratio - 1:+.1%} [{low - 1:+.1%}, {high - 1:+.1%}]; windows from "
          f"{min(windows) - 1:+.1%} to {max(windows) - 1:+.1%} ({(max(windows) - min(windows)) * 100:.1f} points)")


if __name__ == "__main__":
    main()
