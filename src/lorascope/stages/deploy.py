"""Stage `deploy`: serving cost of one seed's runs: full FT and the first task's adapter
merged / separate, and every task's adapter on one base (switch / multi), on each task's eval
examples, on every engine of deploy.engines (lorascope.serving, docs/serving.md). PEFT's tables
land before vLLM's servers start, whatever vLLM does."""

from __future__ import annotations

from tqdm.auto import tqdm

from lorascope import dependencies, modeling, runs, runtime
from lorascope.config import StudyConfig
from lorascope.prepared import load_prepared
from lorascope.serving.benchmark import benchmark
from lorascope.serving.grid import DEPLOYMENT, DEPLOYMENT_ENGINES
from lorascope.serving.inputs import examples_from_dataset
from lorascope.study import Stage, Study, fresh, is_current


def run(study: Study, config: StudyConfig) -> None:
    if not config.deploy.enabled:
        return
    seed = config.deploy.seed if config.deploy.seed is not None else config.seeds[0]
    tasks = [t for t in config.tasks if t not in config.generative_tasks()]
    if len(tasks) < len(config.tasks):
        tqdm.write(f"deploy: measures classification serving; generative task(s) {config.generative_tasks()} left out")
    served = {(t, m): fp for t in tasks for m, s, fp in runs.finished_runs(study, config, t) if s == seed}
    adapters = {t: str(study.run_dir(t, "lora", seed)) for t in tasks if (t, "lora") in served}
    if not adapters:
        tqdm.write(f"deploy: skipped, no finished LoRA run with seed {seed}")
        return
    first = next(iter(adapters))
    full = str(study.run_dir(first, "full", seed)) if (first, "full") in served else None
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
        benchmark(base, adapters, full, examples, tokenizer, config.deploy, study.tables, device=device, bf16=bf16)


STAGE = Stage(
    "deploy",
    "serving latency / memory: full vs merged vs separate vs many adapters, per engine",
    run=run,
    needs=("train",),
    outputs=(dependencies.DEPLOYMENT,),
)
