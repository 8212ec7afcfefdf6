"""Training throughput of a lorascope run vs a bare PyTorch loop, padding with length-grouped
vs random batches, and the per-stage wall time of a finished study.

    python benchmarks/train_throughput.py [--profile quick] [--tasks sst2,rte] [--steps 40]
                                          [--rounds 3] [--study studies/quick]

The profile's tasks are trained with its settings (`--profile qa`: SQuAD v2 on SmolLM2-135M under
bf16 autocast); `--tasks` times a subset (quick's default: sst2 and rte, as before, MRPC being
RTE's size class). Both loops train the same model from the same start on the same batches in the
same order (the Trainer's seeded length-grouped sampler), with fused AdamW (the Trainer's
`adamw_torch_fused`), a linear schedule and gradient clipping. A generative task's batches are
prompt + completion sequences padded by lorascope's CompletionCollator (input_ids,
attention_mask, labels -100 on prompt and padding), so both loops compute the completion-only
loss. Throughput is real (attention-mask) tokens per second; lorascope's time is the whole
Trainer.train() call, start-up included. Rounds interleave the two so machine drift hits both;
the ratio of each round is taken within the round, and the median ratio is reported. Target:
lorascope >= 0.9x the bare loop.

The padding table gives the share of processed tokens that are padding in the profile's train
sets at its training batch size (a generative task's sequences: prompt + completion + eos)."""

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
from lorascope.generation import TRAIN_COLUMNS, CompletionCollator
from lorascope.prepared import load_prepared
from lorascope.stages import BY_NAME
from lorascope.study import run_stages
from lorascope.training import train_run

warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()  # weight-loading bars


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
    optimizer = torch.optim.AdamW(params, lr=setup.hp.lr, weight_decay=setup.hp.weight_decay, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, int(setup.hp.warmup_ratio * steps), steps)
    sampler = LengthGroupedSampler(
        setup.hp.batch_size, lengths=train["length"][:], generator=torch.Generator().manual_seed(setup.seed)
    )
    if setup.task.generative:  # prompt + completion, labels -100 on the prompt: the completion-only loss
        collate, columns = CompletionCollator(tokenizer, device), list(TRAIN_COLUMNS)
    else:
        collate = make_collator(tokenizer, device)
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "label") if c in train.column_names]
    bf16 = runtime.uses_bf16(setup.runtime, device)
    rows: list[list[int]] = []
    while len(rows) < steps:  # epoch after epoch (each a new draw of the sampler, its last batch short), as the Trainer
        order = list(sampler)
        rows += [order[i : i + setup.hp.batch_size] for i in range(0, len(order), setup.hp.batch_size)]
    tokens = 0
    started = time.perf_counter()
    for batch_rows in rows[:steps]:  # reading and padding a batch is part of a training step, as in a DataLoader
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
    """Tokens per second of train_run over Trainer.train() (no dev and no eval split: nothing but
    training runs, and nothing is saved)."""
    with tempfile.TemporaryDirectory() as out:
        metrics = train_run(setup, {"train": train}, tokenizer, Path(out))
    return metrics["tokens_seen"] / metrics["train_seconds"]


def padding_fraction(lengths: np.ndarray, order, batch_size: int) -> float:
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        real, padded = real + batch.sum(), padded + batch.max() * len(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", help="a built-in profile (quick; qa: the generative path)")
    parser.add_argument("--tasks", help="comma-separated tasks to time (default: the profile's; quick: sst2,rte)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--study", help="a finished study whose per-stage wall time to print")
    args = parser.parse_args()

    config = load_config(None, args.profile, ["runtime.progress=false"])
    if args.tasks:
        timed = args.tasks.split(",")
    else:
        timed = [t for t in config.tasks if args.profile != "quick" or t != "mrpc"]
    batch_size = config.training.lora.batch_size
    work = Path(tempfile.mkdtemp(prefix="lorascope-bench-"))
    study = run_stages(config, work, [BY_NAME["prepare"]])
    tokenizer = modeling.load_tokenizer(config.model.name)

    print(
        f"## Training throughput: lorascope (Trainer) vs bare PyTorch loop, {args.steps} steps, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
        + ("" if args.profile == "quick" else f", {args.profile} profile ({config.model.name})")
        + "\n"
    )
    print("| task | method | lorascope tokens/s | bare loop tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for name in timed:
        task, splits = load_prepared(study, name)
        for method in config.methods:
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

    print(
        f"\n## Padding: share of processed tokens that are padding (batch {batch_size}, "
        f"{args.profile}-profile train sets)\n"
    )
    print("| task | length-grouped | random |")
    print("|---|---|---|")
    for name in config.tasks:
        _, splits = load_prepared(study, name)
        lengths = np.asarray(splits["train"]["length"])
        grouped = list(
            LengthGroupedSampler(batch_size, lengths=lengths.tolist(), generator=torch.Generator().manual_seed(42))
        )
        shuffled = np.random.default_rng(42).permutation(len(lengths))
        print(
            f"| {name} | {padding_fraction(lengths, grouped, batch_size):.1%} "
            f"| {padding_fraction(lengths, shuffled, batch_size):.1%} |"
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
