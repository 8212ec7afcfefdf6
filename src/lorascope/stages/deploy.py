"""Stage `deploy`: serving cost of the study's runs on every engine of deploy.engines
(lorascope.serving, docs/serving.md).

The first adapter method of `methods` is served, beside the first full fine-tuning method.
Classification: one seed's runs, full FT and the first task's adapter merged / separate, and
every task's adapter on one base (switch / multi), on each task's eval examples; every further
adapter method's run of the first task (deploy.methods) merged / separate in PEFT beside them; PEFT's tables
land before vLLM's servers start, whatever vLLM does. Generation (generative tasks): the first
generative task's full run and adapter of that seed merged / separate, and every run of the
adapter method on the generative tasks, every seed, on one base (multi), on their eval prompts
(serving.generation_benchmark)."""

from __future__ import annotations

from tqdm.auto import tqdm

from lorascope import dependencies, modeling, runs, runtime
from lorascope.config import StudyConfig
from lorascope.prepared import load_prepared
from lorascope.serving.benchmark import benchmark
from lorascope.serving.generation_benchmark import benchmark_generation
from lorascope.serving.generation_grid import DEPLOYMENT_GENERATION, generation_examples
from lorascope.serving.grid import DEPLOYMENT, DEPLOYMENT_ENGINES
from lorascope.serving.inputs import examples_from_dataset
from lorascope.study import Stage, Study, fresh, is_current


def run(study: Study, config: StudyConfig) -> None:
    if not config.deploy.enabled:
        return
    seed = config.deploy.seed if config.deploy.seed is not None else config.seeds[0]
    generative = config.generative_tasks()
    classify(study, config, seed, [t for t in config.tasks if t not in generative])
    if generative:
        generate(study, config, seed, generative)


def classify(study: Study, config: StudyConfig, seed: int, tasks: list[str]) -> None:
    adapter, full_method = config.served_methods()
    served = {(t, m): fp for t in tasks for m, s, fp in runs.finished_runs(study, config, t) if s == seed}
    adapters = {t: str(study.run_dir(t, adapter, seed)) for t in tasks if (t, adapter) in served}
    if not adapters:
        if tasks:
            tqdm.write(f"deploy: classification skipped, no finished adapter run with seed {seed}")
        return
    first = next(iter(adapters))
    full = str(study.run_dir(first, full_method, seed)) if (first, full_method) in served else None
    wanted = config.adapter_methods()[1:] if config.deploy.methods is None else config.deploy.methods
    further = {  # the other adapter methods, merged and separate on the first task
        m: str(study.run_dir(first, m, seed)) for m in wanted if (first, m) in served
    }
    device = runtime.pick_device(config.runtime)
    bf16 = runtime.uses_bf16(config.runtime, device)
    fp = dependencies.DEPLOYMENT.fingerprint(config, sorted(served.values()))
    # PEFT's one-client table carries the stamp; without PEFT (engines: [vllm]) the engines table
    target = (DEPLOYMENT if "peft" in config.deploy.engines else DEPLOYMENT_ENGINES).path(study.tables)
    if is_current(target, fp):
        return
    examples = {t: examples_from_dataset(load_prepared(study, t)[1]["eval"]) for t in adapters}
    base, tokenizer = modeling.resolve_model_path(config.model.name), modeling.load_tokenizer(config.model.name)
    with fresh(target, fp):
        benchmark(
            *(base, adapters, full, examples, tokenizer, config.deploy, study.tables),
            device=device,
            bf16=bf16,
            methods=further,
            names=(adapter, full_method or ""),
        )


def generate(study: Study, config: StudyConfig, seed: int, tasks: list[str]) -> None:
    adapter, full_method = config.served_methods()
    finished = {t: runs.finished_runs(study, config, t) for t in tasks}
    lora = {(t, s): fp for t in tasks for m, s, fp in finished[t] if m == adapter}
    first = (tasks[0], seed)
    if first not in lora:
        tqdm.write(f"deploy: generation skipped, no finished adapter run of {tasks[0]} with seed {seed}")
        return
    # the served adapter first, then every other run of its method (multi's adapters), named task-seedN
    order = [first, *sorted(k for k in lora if k != first)]
    adapters = {f"{t}-seed{s}": str(study.run_dir(t, adapter, s)) for t, s in order}
    full_fp = next((fp for m, s, fp in finished[tasks[0]] if m == full_method and s == seed), None)
    full = str(study.run_dir(tasks[0], full_method, seed)) if full_fp else None
    fp = dependencies.DEPLOYMENT_GENERATION.fingerprint(config, [lora[k] for k in order], full_fp)
    target = DEPLOYMENT_GENERATION.path(study.tables)
    if is_current(target, fp):
        return
    evaluation = {t: generation_examples(load_prepared(study, t)[1]["eval"]) for t in tasks}
    examples = {name: evaluation[t] for name, (t, _) in zip(adapters, order)}
    device = runtime.pick_device(config.runtime)
    base, tokenizer = modeling.resolve_model_path(config.model.name), modeling.load_tokenizer(config.model.name)
    with fresh(target, fp):
        benchmark_generation(
            base,
            adapters,
            full,
            examples,
            tokenizer,
            config.deploy,
            study.tables,
            config.model.max_length,
            device=device,
            bf16=runtime.uses_bf16(config.runtime, device),
        )


STAGE = Stage(
    "deploy",
    "serving latency / memory: full vs merged vs separate vs many adapters, per engine; tokens/s for generation",
    run=run,
    needs=("train",),
    outputs=(dependencies.DEPLOYMENT, dependencies.DEPLOYMENT_GENERATION),
)
