"""Training throughput of a lorascope run vs a bare PyTorch loop, padding with length-grouped
vs random batches, and the per-stage wall time of a finished study.

    python benchmarks/train_throughput.py [--steps 40] [--rounds 3] [--study studies/quick]

Both loops train the same model from the same start on the same batches in the same order
(the Trainer's seeded length-grouped sampler), with AdamW, a linear schedule and gradient
clipping. Rounds interleave the two so machine drift hits both; the ratio of each round is
taken within the round, and the median ratio is reported."""

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
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from lorascope import modeling, runs, runtime
from lorascope.config_io import load_config
from lorascope.evaluation import make_collator
from lorascope.prepared import load_prepared
from lorascope.stages import BY_NAME
from lorascope.study import run_stages
from lorascope.training import train_run

warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()


def bare_loop(setup, train, tokenizer, steps: int) -> float:
    """Tokens per second of a plain PyTorch loop over the batches lorascope would use, on the
    setup's device and precision (bf16 autocast, gradient checkpointing) as the Trainer runs."""
    device = runtime.pick_device(setup.runtime)
    model = modeling.load_model(
        setup.model_name, setup.task.label_names, setup.seed, tokenizer.pad_token_id, setup.dropout
    )
    model = modeling.prepare_for_method(model, setup.method, setup.hp, setup.seed).to(device)
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setup.hp.lr, weight_decay=setup.hp.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(setup.hp.warmup_ratio * steps), steps)
    sampler = LengthGroupedSampler(
        setup.hp.batch_size, lengths=train["length"][:], generator=torch.Generator().manual_seed(setup.seed)
    )
    order = list(sampler)
    collate = make_collator(tokenizer, device)
    bf16 = runtime.uses_bf16(setup.runtime, device)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "label") if c in train.column_names]
    rows = [order[i : i + setup.hp.batch_size] for i in range(0, steps * setup.hp.batch_size, setup.hp.batch_size)]
    tokens = 0
    started = time.perf_counter()
    for batch_rows in rows:  # reading and padding a batch is part of a training step, as in a DataLoader
        batch = {
            k: v.to(device) for k, v in collate(train.select(batch_rows).select_columns(columns).to_list()).items()
        }
        with runtime.autocast(device, bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, setup.hp.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens / (time.perf_counter() - started)


def lorascope_run(setup, train, tokenizer, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        metrics = train_run(setup, {"train": train, "eval": train.select(range(8))}, tokenizer, Path(out))
    return metrics["tokens_seen"] / metrics["train_seconds"]


def padding_fraction(lengths: np.ndarray, order, batch_size: int) -> float:
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        real, padded = real + batch.sum(), padded + batch.max() * len(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--study", help="a finished study whose per-stage wall time to print")
    args = parser.parse_args()

    config = load_config(None, "quick", ["runtime.progress=false"])
    work = Path(tempfile.mkdtemp(prefix="lorascope-bench-"))
    study = run_stages(config, work, [BY_NAME["prepare"]])
    tokenizer = modeling.load_tokenizer(config.model.name)

    print(
        f"## Training throughput: lorascope (Trainer) vs bare PyTorch loop, {args.steps} steps, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n"
    )
    print("| task | method | lorascope tokens/s | bare loop tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for name in ("sst2", "rte"):
        task, splits = load_prepared(study, name)
        for method in ("lora", "full"):
            setup = runs.run_setup(config, task, method, 42, max_steps=args.steps, save_weights=False)
            ours, bare, ratios = [], [], []
            for round_ in range(args.rounds):
                first, second = (lorascope_run, bare_loop) if round_ % 2 == 0 else (bare_loop, lorascope_run)
                a = first(setup, splits["train"], tokenizer, args.steps)
                b = second(setup, splits["train"], tokenizer, args.steps)
                mine, plain = (a, b) if first is lorascope_run else (b, a)
                ours.append(mine), bare.append(plain), ratios.append(mine / plain)
            print(
                f"| {name} | {method} | {statistics.median(ours):,.0f} | {statistics.median(bare):,.0f} "
                f"| {statistics.median(ratios):.3f} |",
                flush=True,
            )

    print("\n## Padding: share of processed tokens that are padding (batch 16, quick-profile train sets)\n")
    print("| task | length-grouped | random |")
    print("|---|---|---|")
    for name in ("sst2", "mrpc", "rte"):
        _, splits = load_prepared(study, name)
        lengths = np.asarray(splits["train"]["length"])
        grouped = list(LengthGroupedSampler(16, lengths=lengths.tolist(), generator=torch.Generator().manual_seed(42)))
        shuffled = np.random.default_rng(42).permutation(len(lengths))
        print(
            f"| {name} | {padding_fraction(lengths, grouped, 16):.1%} | {padding_fraction(lengths, shuffled, 16):.1%} |"
        )

    if args.study:
        manifest = json.loads((Path(args.study) / "manifest.json").read_text())
        print(f"\n## Wall time per stage of {args.study}\n")
        print("| stage | seconds |")
        print("|---|---|")
        for stage, info in manifest["stages"].items():
            print(f"| {stage} | {info.get('seconds', 'n/a')} |")
        print(f"| total | {sum(i.get('seconds', 0) for i in manifest['stages'].values()):.1f} |")
    print(f"\n(scratch study: {work})")


if __name__ == "__main__":
    main()
