"""Generation throughput of lorascope's evaluation path vs Hugging Face `model.generate` called
directly, on the qa profile's SQuAD v2 eval prompts, and the padding of the generation batches.

    python benchmarks/generation_speed.py [--examples 96] [--rounds 3] [--run DIR] [--threads N]

lorascope: generation.generate_answers (prompts sorted by length, left-padded, greedy with the KV
cache, stopped at eos or any token holding a newline) at the profile's training.eval_batch_size,
as the evaluation of every generative run calls it; its time is the whole call (batching,
decoding). Direct: what a user writes: the tokenizer loaded with padding_side="left", the prompts
in the split's own order cut into batches of the same size, `model.generate(**inputs,
max_new_tokens=..., do_sample=False, eos_token_id=<the same stop ids>)` under the same bf16
autocast (lorascope.runtime.autocast), then batch_decode; its time is tokenizing, generating and
decoding. Both sides count new tokens alike: each row's up to and including its first stop token.

The model is the base (zero-shot: it rarely stops early, so answers run long) and, with `--run`, a
finished LoRA (merged) or full run of a qa study. The first --examples rows of the eval split of a
scratch qa study's prepare stage are used. Before timing, the direct side's prompt ids are checked
against the prepared ones; after, both sides' answers (first line, stripped) are compared: greedy
decoding should agree, and where it does not, each differing row is generated alone in bf16 and in
fp32, with the smallest top-1 / top-2 logit gap along its path (a near-tie that bf16 rounding of
a different batch shape flips). One untimed warm-up batch per side, then rounds that alternate
which side goes first; the ratio is taken within each round and the median reported. Target:
lorascope >= 0.9x direct generate.

The padding table gives, for both batch orders, the share of prompt tokens that are padding
(prefill) and the share of decode slots spent on rows that had already stopped (a batch decodes
until its longest answer ends; per-row answer lengths from the direct side)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer

from lorascope import modeling, runtime
from lorascope.config_io import load_config
from lorascope.generation import generate_answers, stop_token_ids
from lorascope.prepared import load_prepared
from lorascope.stages import BY_NAME
from lorascope.study import run_stages
from lorascope.tasks import prompt_text

warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()  # weight-loading bars

TASK = "squad_v2"
TARGET = 0.9


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def kept_length(tokens: torch.Tensor, stops: torch.Tensor) -> int:
    """New tokens of one row up to and including its first stop token (all of them if none)."""
    ended = torch.isin(tokens, stops).nonzero()
    return int(ended[0]) + 1 if len(ended) else len(tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lorascope_side(model, split, tokenizer, bench) -> tuple[list[str], int, float]:
    started = time.perf_counter()
    texts, new_tokens = generate_answers(
        model,
        split,
        tokenizer=tokenizer,
        max_new_tokens=bench["max_new_tokens"],
        batch_size=bench["batch_size"],
        device=bench["device"],
        bf16=bench["bf16"],
    )
    sync(bench["device"])
    return texts, new_tokens, time.perf_counter() - started


@torch.no_grad()
def direct_side(model, prompts, user_tokenizer, bench) -> tuple[list[str], list[int], float]:
    """Plain batched `model.generate` over the prompts in their own order; (answers, each row's
    new tokens, seconds)."""
    device, size = bench["device"], bench["batch_size"]
    texts, rows = [], []
    started = time.perf_counter()
    for start in range(0, len(prompts), size):
        inputs = user_tokenizer(
            prompts[start : start + size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=bench["add_special_tokens"],
        ).to(device)
        with runtime.autocast(device, bench["bf16"]):
            out = model.generate(
                **inputs,
                max_new_tokens=bench["max_new_tokens"],
                do_sample=False,
                eos_token_id=bench["stops"],
                pad_token_id=user_tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :].cpu()
        texts += [first_line(t) for t in user_tokenizer.batch_decode(new, skip_special_tokens=True)]
        rows += list(new)
    sync(device)
    seconds = time.perf_counter() - started
    stops = torch.tensor(bench["stops"])
    return texts, [kept_length(r, stops) for r in rows], seconds


@torch.no_grad()
def alone(model, ids: list[int], bench, bf16: bool) -> tuple[str, float, list[int]]:
    """One prompt generated without padding: its answer, the smallest top-1 / top-2 logit gap
    over the steps it kept, and its kept tokens."""
    device = bench["device"]
    with runtime.autocast(device, bf16):
        out = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=bench["max_new_tokens"],
            do_sample=False,
            eos_token_id=bench["stops"],
            pad_token_id=bench["tokenizer"].pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(ids) :].cpu()
    kept = kept_length(new, torch.tensor(bench["stops"]))
    gaps = [float(top[0] - top[1]) for top in (s[0].float().topk(2).values for s in out.scores[:kept])]
    text = first_line(bench["tokenizer"].decode(new[:kept], skip_special_tokens=True))
    return text, min(gaps), new[:kept].tolist()


def padding_shares(prompt_lengths: np.ndarray, answer_lengths: np.ndarray, order, batch_size: int):
    """(share of prompt tokens that are padding, share of decode slots of rows already stopped)."""
    real = padded = used = slots = 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        real, padded = real + prompt_lengths[rows].sum(), padded + prompt_lengths[rows].max() * len(rows)
        used, slots = used + answer_lengths[rows].sum(), slots + answer_lengths[rows].max() * len(rows)
    return 1 - real / padded, 1 - used / slots


def compare(name, model, split, prompts, tokenizer, user_tokenizer, bench, rounds: int) -> dict:
    """Warm-up, interleaved timed rounds and the answer check for one model; its table row."""
    warm = min(bench["batch_size"], len(split))
    lorascope_side(model, split.select(range(warm)), tokenizer, bench)
    direct_side(model, prompts[:warm], user_tokenizer, bench)
    ours, direct, ratios = [], [], []
    for round_ in range(rounds):
        if round_ % 2 == 0:
            mine = lorascope_side(model, split, tokenizer, bench)
            plain = direct_side(model, prompts, user_tokenizer, bench)
        else:
            plain = direct_side(model, prompts, user_tokenizer, bench)
            mine = lorascope_side(model, split, tokenizer, bench)
        ours.append(mine[1] / mine[2])
        direct.append(sum(plain[1]) / plain[2])
        ratios.append(ours[-1] / direct[-1])
    texts, new_tokens, _ = mine
    direct_texts, answer_lengths, _ = plain
    differ = [i for i, (a, b) in enumerate(zip(texts, direct_texts)) if a != b]
    return {
        "name": name,
        "ours": statistics.median(ours),
        "direct": statistics.median(direct),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "tokens": (new_tokens, sum(answer_lengths)),
        "texts": (texts, direct_texts),
        "differ": differ,
        "answer_lengths": np.asarray(answer_lengths),
        "model": model,
    }


def explain(result: dict, split, bench) -> None:
    """Each differing row generated alone (no padding) in bf16 and fp32, with its smallest gap."""
    texts, direct_texts = result["texts"]
    print(f"\n### {result['name']}: rows whose answers differ ({len(result['differ'])})\n")
    print("| row | id | lorascope | direct | alone bf16 (min gap) | alone fp32 (min gap) |")
    print("|---|---|---|---|---|---|")
    for i in result["differ"][:10]:
        row = split[i]
        ids = row["input_ids"][: row["prompt_length"]]
        half, half_gap, _ = alone(result["model"], ids, bench, bench["bf16"])
        full, full_gap, _ = alone(result["model"], ids, bench, False)
        print(
            f"| {i} | {row['id']} | {texts[i]!r} | {direct_texts[i]!r} | {half!r} ({half_gap:.3f}) "
            f"| {full!r} ({full_gap:.3f}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96, help="the first N rows of the prepared eval split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run", help="a finished lora or full run folder of a qa study, timed after the base")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own count)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(None, "qa", ["runtime.progress=false"])
    work = Path(tempfile.mkdtemp(prefix="lorascope-bench-"))
    study = run_stages(config, work, [BY_NAME["prepare"]])
    task, splits = load_prepared(study, TASK)
    split = splits["eval"].select(range(min(args.examples, len(splits["eval"]))))
    tokenizer = modeling.load_tokenizer(config.model.name)
    device = runtime.pick_device(config.runtime)
    bench = {
        "device": device,
        "bf16": runtime.uses_bf16(config.runtime, device),
        "batch_size": config.training.eval_batch_size,
        "max_new_tokens": task.max_new_tokens,
        "stops": list(stop_token_ids(tokenizer)),
        "add_special_tokens": not task.chat_template,
        "tokenizer": tokenizer,
    }

    # what a user writes: the model's tokenizer, padded on the left for generation
    user_tokenizer = AutoTokenizer.from_pretrained(modeling.resolve_model_path(config.model.name), padding_side="left")
    if user_tokenizer.pad_token is None:
        user_tokenizer.pad_token = user_tokenizer.eos_token
    prompts = [prompt_text(task, p, user_tokenizer) for p in split["prompt"]]
    encoded = user_tokenizer(prompts, add_special_tokens=bench["add_special_tokens"])["input_ids"]
    prepared = [ids[:n] for ids, n in zip(split["input_ids"], split["prompt_length"])]
    mismatched = sum(a != b for a, b in zip(encoded, prepared))
    if mismatched or user_tokenizer.pad_token_id != tokenizer.pad_token_id:
        raise SystemExit(
            f"the direct side's inputs differ: {mismatched} prompts tokenize differently, pad ids "
            f"{user_tokenizer.pad_token_id} / {tokenizer.pad_token_id}"
        )

    models = [("base (zero-shot)", lambda: modeling.load_model(config.model.name, None, 0, tokenizer.pad_token_id))]
    if args.run:
        method = json.loads((Path(args.run) / "metrics.json").read_text())["method"]
        models.append(
            (
                f"{method} run",
                lambda: modeling.load_run_model(Path(args.run), config.model.name, None, tokenizer.pad_token_id),
            )
        )

    print(
        f"## Generation throughput: lorascope (generate_answers) vs direct model.generate, {len(split)} "
        f"SQuAD v2 eval prompts, batch {bench['batch_size']}, max {bench['max_new_tokens']} new tokens, "
        f"{'bf16 autocast' if bench['bf16'] else 'fp32'} on {device.type}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds ({config.model.name})\n"
    )
    print(
        "| model | lorascope new tokens/s | direct new tokens/s | ratio | per-round ratios | new tokens | same answers |"
    )
    print("|---|---|---|---|---|---|---|")
    results = []
    for name, load in models:
        model = load().to(device)
        result = compare(name, model, split, prompts, tokenizer, user_tokenizer, bench, args.rounds)
        results.append(result)
        ours_tokens, direct_tokens = result["tokens"]
        tokens = f"{ours_tokens:,}" if ours_tokens == direct_tokens else f"{ours_tokens:,} / {direct_tokens:,}"
        print(
            f"| {name} | {result['ours']:,.1f} | {result['direct']:,.1f} | {result['ratio']:.3f} "
            f"| {', '.join(f'{r:.3f}' for r in result['ratios'])} | {tokens} "
            f"| {len(split) - len(result['differ'])} / {len(split)} |",
            flush=True,
        )

    for result in results:
        if result["differ"]:
            explain(result, split, bench)

    prompt_lengths = np.asarray(split["prompt_length"])
    sorted_order = np.argsort(prompt_lengths, kind="stable")
    own_order = np.arange(len(split))
    print(
        f"\n## Padding of the generation batches (batch {bench['batch_size']}): prompt tokens that are "
        "padding, decode slots of rows already stopped\n"
    )
    print("| model | order | prompt padding | stopped-row decode slots |")
    print("|---|---|---|---|")
    for result in results:
        for label, order in (("lorascope (by prompt length)", sorted_order), ("split order (direct)", own_order)):
            prompt_pad, idle = padding_shares(prompt_lengths, result["answer_lengths"], order, bench["batch_size"])
            print(f"| {result['name']} | {label} | {prompt_pad:.1%} | {idle:.1%} |")
    print(f"\n(scratch study: {work}; target: lorascope >= {TARGET}x direct)")


if __name__ == "__main__":
    main()
