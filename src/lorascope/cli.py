"""Command line. Subcommands are built from the stage list (lorascope.stages.STAGES); `run`
chains every stage in its order.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 failure."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path

from lorascope import __version__, runtime
from lorascope.atomic import atomic_write
from lorascope.config import TaskConfig
from lorascope.config_io import apply_overrides, load_config, profiles, validate
from lorascope.drift import DRIFT_LAYERS, DRIFT_SUMMARY
from lorascope.errors import InputError
from lorascope.preflight import check_disk
from lorascope.stages import BY_NAME, STAGES, with_inputs
from lorascope.study import Study, run_stages, verify

SPECIAL = ("tune", "drift", "train")  # stage subcommands with options of their own, defined below


def _add_config_args(
    parser: argparse.ArgumentParser, config_positional: bool, out_help: str = "study directory (default studies/<name>)"
) -> None:
    if config_positional:
        parser.add_argument("config", nargs="?", help="study YAML (default: the profile alone)")
    else:
        parser.add_argument("--config", help="study YAML (default: the profile alone)")
    parser.add_argument(
        "--profile", metavar="NAME", help=f"{' | '.join(profiles())} (default quick when no config is given)"
    )
    parser.add_argument("--out", help=out_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.lora.lr=3e-4 (repeatable)",
    )


def _add_executor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="parallel workers (runtime.workers; 1 = in this process)")
    parser.add_argument(
        "--ray", metavar="ADDRESS", help="run units on Ray: local, auto or host:port (runtime.ray_address)"
    )


def _executor_overrides(args) -> list[str]:
    """--workers / --ray as the --set overrides they stand for, validated with the rest of the config."""
    workers, ray = getattr(args, "workers", None), getattr(args, "ray", None)
    return ([f"runtime.workers={workers}"] if workers is not None else []) + (
        [f"runtime.ray_address={ray}"] if ray else []
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorascope", description="What LoRA buys and costs vs full fine-tuning.")
    parser.add_argument("--version", action="version", version=f"lorascope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run every stage of a study", description="Run every stage of a study.")
    _add_config_args(run, config_positional=True)
    _add_executor_args(run)

    for stage in STAGES:
        if stage.name not in SPECIAL:
            sub = commands.add_parser(
                stage.name,
                help=stage.help,
                description=f"{stage.help} (on an existing study directory, after the stages it needs)",
            )
            sub.add_argument("study", help="study directory")
            _add_executor_args(sub)

    check = commands.add_parser(
        "verify",
        help="check every output of a study against the size and digest recorded when it was written",
        description="Check every output of STUDY against the size and content digest recorded when it was "
        "written; exit 1 listing what is missing or damaged, 0 when all holds. Changes nothing.",
    )
    check.add_argument("study", help="study directory")

    drift = commands.add_parser(
        "drift",
        help="layer-wise CKA / cosine of every run against the base, with references",
        description="Layer-wise CKA / cosine of every run of STUDY against the base, with references; or of "
        "one model trained anywhere (--model, or --adapter on --base) against --base on --task.",
    )
    drift.add_argument("study", nargs="?", help="study directory (or give --base and --model / --adapter)")
    drift.add_argument("--base", help="base model: bundled alias, Hub id or folder")
    drift.add_argument("--model", help="fully fine-tuned model folder or Hub id (not with --adapter)")
    drift.add_argument("--adapter", help="PEFT adapter folder, applied on --base (not with --model)")
    drift.add_argument("--task", help="task whose probe split is represented (default sst2)")
    _add_config_args(drift, config_positional=False, out_help="folder for the tables (default studies/drift-<task>)")

    tune = commands.add_parser(
        "tune",
        help="Optuna search per task x method on the dev split",
        description="Search hyperparameters per task x method on dev. Several workers: --workers N or "
        "--ray (one shared journal in the study unless --storage), or separate processes with one "
        "study directory each (--out) and one shared --storage.",
    )
    tune.add_argument("study", help="study directory or config YAML")
    tune.add_argument("--task", action="append", help="only this task (repeatable)")
    tune.add_argument("--method", action="append", help="only this method (repeatable)")
    tune.add_argument("--trials", type=int, help="finished trials per task x method (default tune.trials)")
    tune.add_argument("--storage", help="Optuna storage URL (postgresql://, mysql://, sqlite:///) or a journal file")
    tune.add_argument("--out", help="study directory when STUDY is a config file")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    _add_executor_args(tune)

    bench = commands.add_parser(
        "bench",
        help="serving benchmark of any base model with adapters (and a full model)",
        description="Correctness checks, the serving grid and memory of full / merged / separate / switch / multi "
        "on each engine (docs/serving.md).",
    )
    bench.add_argument("--base", required=True, help="base model: bundled alias, Hub id or folder")
    bench.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="PEFT adapter folder (repeatable; the first is merged / served separately)",
    )
    bench.add_argument("--full", help="fully fine-tuned model folder to compare with")
    bench.add_argument(
        "--task",
        default="sst2",
        help="task whose eval examples are served (default sst2); a generative task (e.g. squad_v2) times "
        "generation: its prompts, deploy.grid.output_tokens tokens each, causal-LM adapters",
    )
    bench.add_argument(
        "--engine",
        action="append",
        choices=("peft", "vllm"),
        help="serving engine (repeatable; default deploy.engines): peft = PEFT in-process; "
        "vllm = vLLM servers from their own virtualenv (`make vllm` first)",
    )
    _add_config_args(bench, config_positional=False)

    train = commands.add_parser(
        "train",
        help="train the study's grid, or one run with --task/--method/--seed",
        description="Train every run of STUDY, or a single run given --task, --method and --seed.",
    )
    train.add_argument("study", nargs="?", help="study directory (its config.yaml is used)")
    train.add_argument("--task")
    train.add_argument("--method", help="a method defined in training: lora, full, or your own")
    train.add_argument("--seed", type=int)
    _add_config_args(train, config_positional=False)
    _add_executor_args(train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runtime.quiet_libraries()
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; finished results are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        print(f"lorascope: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1


def _dispatch(args) -> int:
    if args.command == "run":
        config = load_config(args.config, args.profile, [*args.overrides, *_executor_overrides(args)])
        out = _out_dir(args, config)
        check_disk(config, out)
        with runtime.threads(config.runtime.threads):
            run_stages(config, out, list(STAGES))
        print(f"study written to {out}")
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "train" and (args.task or args.method or args.seed is not None):
        return _single_run(args)
    if args.command == "drift":
        _check_drift_args(args)
        if args.base:
            return _single_drift(args)
    if not args.study:
        raise InputError(f"{args.command} needs a study directory")
    study = Study(args.study)
    config = study.load_config()
    if _executor_overrides(args):
        config = validate(
            apply_overrides(config.model_dump(mode="json"), _executor_overrides(args)), source="--workers"
        )
    with runtime.threads(config.runtime.threads):
        run_stages(config, study.root, with_inputs(args.command), write_config=False)
    print(f"{args.command} done in {study.root}")
    return 0


def _verify(args) -> int:
    root = Path(args.study)
    if not (root / "config.yaml").is_file():
        raise InputError(f"{root} is not a study directory (no config.yaml)")
    problems, outputs, size = verify(root)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} of {outputs + len(problems)} outputs missing or damaged in {root}", file=sys.stderr)
        return 1
    print(f"{outputs} outputs ({size / 1e6:,.1f} MB) verified in {root}")
    return 0


def _single_run(args) -> int:
    """One task x method x seed through the same stages as a study. Into an existing study it
    uses that study's config (plus --set) and leaves its config.yaml alone."""
    missing = [f"--{k}" for k in ("task", "method", "seed") if getattr(args, k) is None]
    if missing:
        raise InputError(f"a single run needs {', '.join(missing)}")
    out = args.out or args.study
    existing = out is not None and (Path(out) / "config.yaml").is_file()
    if existing and not (args.config or args.profile):
        raw = Study(out).load_config().model_dump(mode="json")
        config = validate(apply_overrides(raw, [*args.overrides, *_executor_overrides(args)]), source="--set")
    else:
        config = load_config(args.config, args.profile, [*args.overrides, *_executor_overrides(args)])
    if not config.defines(args.method):
        raise InputError(f"--method {args.method}: no such method; define it as training.{args.method}")
    task_cfg = config.tasks.get(args.task, TaskConfig())
    config = config.model_copy(update={"tasks": {args.task: task_cfg}, "methods": [args.method], "seeds": [args.seed]})
    out = Path(out) if out else _out_dir(args, config)
    with runtime.threads(config.runtime.threads):
        run_stages(config, out, with_inputs("train"), write_config=not existing)
    print(f"run written to {Study(out).run_dir(args.task, args.method, args.seed)}")
    return 0


def _check_drift_args(args) -> None:
    if (args.study is None) == (args.base is None):
        raise InputError("drift needs exactly one of STUDY or --base (with --model or --adapter, and --task)")
    single = {
        "--model": args.model,
        "--adapter": args.adapter,
        "--task": args.task,
        "--config": args.config,
        "--profile": args.profile,
        "--out": args.out,
        "--set": args.overrides,
    }
    if args.study is not None:
        given = [flag for flag, value in single.items() if value]
        if given:
            raise InputError(f"drift STUDY uses the study's config; {', '.join(given)} only go with --base")
    elif (args.model is None) == (args.adapter is None):
        raise InputError("drift --base needs exactly one of --model (fully fine-tuned) or --adapter (PEFT adapter)")


def _single_drift(args) -> int:
    """`drift` for one model outside a study: the run against its base, with base vs base and
    shuffled-base references, tables as the stage writes them."""
    import json

    from lorascope.stages.drift import single_drift

    _check_model_arg("--base", args.base)
    if args.model is not None:
        _check_model_arg("--model", args.model)
    elif not (Path(args.adapter) / "adapter_config.json").is_file():
        raise InputError(f"--adapter: no adapter found at {args.adapter} (expected a folder with adapter_config.json)")
    task = args.task or "sst2"
    config = load_config(args.config, args.profile, args.overrides)
    out = Path(args.out) if args.out else Path("studies") / f"drift-{task}"
    with runtime.threads(config.runtime.threads):
        layers, summary = single_drift(config, args.base, task, model=args.model, adapter=args.adapter)
    DRIFT_LAYERS.write(out, layers)
    DRIFT_SUMMARY.write(out, summary)
    inputs = {
        "base": args.base,
        "model": args.model,
        "adapter": args.adapter,
        "task": task,
        "config": config.model_dump(mode="json", include={"data", "model", "represent", "drift"}),
    }
    atomic_write(out / "drift_inputs.json", json.dumps(inputs, indent=2) + "\n")
    table = summary.pivot_table(index=["pooling", "measure"], columns="comparison", values="mean_over_layers")
    order = [c for c in ("run_vs_base", "base_vs_base", "shuffled_base") if c in table.columns]
    print(f"mean over layers, {task} probe ({len(layers['layer'].unique())} layers):")
    print(table[order].to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"drift tables written to {out}")
    return 0


def _check_model_arg(flag: str, value: str) -> None:
    """A path (or anything that exists) must be a model folder; other names are Hub ids."""
    path = Path(value).expanduser()
    if (value.startswith((".", "/", "~")) or path.exists()) and not (path / "config.json").is_file():
        raise InputError(f"{flag}: no model found at {value} (expected a folder with config.json)")


def _tune(args) -> int:
    """The search alone, on a study directory or a config file; each worker of a shared search
    uses its own study directory (the study lock) and the same --storage."""
    from lorascope.tuning import tune_study

    path = Path(args.study)
    if path.is_dir():
        raw = Study(path).load_config().model_dump(mode="json")
        overrides = [*args.overrides, *_executor_overrides(args)]
        config, out, write = validate(apply_overrides(raw, overrides), source="--set"), path, False
    else:
        config = load_config(path, None, [*args.overrides, *_executor_overrides(args)])
        out, write = _out_dir(args, config), True

    def search(study, cfg):
        tune_study(study, cfg, tasks=args.task, methods=args.method, trials=args.trials, storage=args.storage)

    tune = dataclasses.replace(BY_NAME["tune"], run=search)
    with runtime.threads(config.runtime.threads):
        run_stages(config, out, [*with_inputs("tune")[:-1], tune], write_config=write)
    print(f"tuned hyperparameters in {out / 'tuned'}")
    return 0


def _bench(args) -> int:
    """`deploy` for models outside a study: every adapter serves the task's eval examples, on
    every engine given (default deploy.engines)."""
    import datasets

    from lorascope import modeling
    from lorascope.report.figures import engines_figure, latency_figure, memory_figure, png_bytes
    from lorascope.serving.benchmark import benchmark
    from lorascope.serving.inputs import examples_from_dataset
    from lorascope.tasks import load_raw, resolve_task, tokenize

    engines = [f"deploy.engines=[{','.join(dict.fromkeys(args.engine))}]"] if args.engine else []
    config = load_config(args.config, args.profile, [*args.overrides, *engines])
    adapters = {}
    for i, item in enumerate(args.adapter):
        name, sep, path = item.rpartition("=")
        if not Path(path).is_dir():
            raise InputError(f"--adapter: no adapter folder at {path}")
        adapters[name if sep else f"adapter{i}"] = path
    if args.full and not (Path(args.full) / "config.json").is_file():
        raise InputError(f"--full: no model found at {args.full} (expected a folder with config.json)")
    try:
        config.deploy.vllm.refuse_fewer_loras(len(adapters))
    except ValueError as err:
        raise InputError(str(err)) from None
    task, train, evaluation = load_raw(resolve_task(args.task, config.tasks.get(args.task, TaskConfig()), config.data))
    tokenizer = modeling.load_tokenizer(args.base)
    out = Path(args.out or "bench")
    device = runtime.pick_device(config.runtime)
    if task.generative:
        return _bench_generation(args, config, adapters, task, train, evaluation, tokenizer, out, device)
    split = tokenize(datasets.DatasetDict(train=evaluation), tokenizer, config.model.max_length)["train"]
    examples = examples_from_dataset(split)
    base, served = modeling.resolve_model_path(args.base), {n: examples for n in adapters}
    with runtime.threads(config.runtime.threads):
        result = benchmark(
            base,
            adapters,
            args.full,
            served,
            tokenizer,
            config.deploy,
            out,
            device=device,
            bf16=runtime.uses_bf16(config.runtime, device),
        )
    ok = result.timings[result.timings["status"] == "ok"]
    if not ok.empty:
        atomic_write(out / "deployment_latency.png", png_bytes(latency_figure(ok)))
    if not result.memory.empty:
        atomic_write(out / "deployment_memory.png", png_bytes(memory_figure(result.memory)))
    grid = result.engines
    if ((grid["status"] == "ok") & (grid["batch_size"] == 1)).any():
        atomic_write(out / "deployment_engines.png", png_bytes(engines_figure(grid)))
    print(f"deployment tables and figures written to {out}")
    return 0


def _bench_generation(args, config, adapters, task, train, evaluation, tokenizer, out: Path, device) -> int:
    """`bench` on a generative task: every adapter serves the task's eval prompts (as the prepare
    stage draws and tokenizes them), generation timed per engine."""
    from lorascope import modeling
    from lorascope.prepared import split_and_tokenize
    from lorascope.report.figures import generation_latency_figure, generation_throughput_figure, png_bytes
    from lorascope.serving.generation_benchmark import benchmark_generation
    from lorascope.serving.generation_grid import generation_examples

    config = config.model_copy(update={"model": config.model.model_copy(update={"name": args.base})})
    _task, splits, _ = split_and_tokenize(task, train, evaluation, tokenizer, config)
    examples = generation_examples(splits["eval"])
    with runtime.threads(config.runtime.threads):
        result = benchmark_generation(
            modeling.resolve_model_path(args.base),
            adapters,
            args.full,
            {name: examples for name in adapters},
            tokenizer,
            config.deploy,
            out,
            config.model.max_length,
            device=device,
            bf16=runtime.uses_bf16(config.runtime, device),
        )
    if (result.table["status"] == "ok").any():
        atomic_write(out / "deployment_generation.png", png_bytes(generation_throughput_figure(result.table)))
        atomic_write(out / "deployment_generation_latency.png", png_bytes(generation_latency_figure(result.table)))
    print(f"generation serving tables and figures written to {out}")
    return 0


def _out_dir(args, config) -> Path:
    return Path(args.out) if args.out else Path("studies") / config.name


if __name__ == "__main__":
    raise SystemExit(main())
