"""Study configuration: the pydantic models of every section (unknown keys are errors, every
key described: docs/configuration.md is generated from them). config_io reads and writes them."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lorascope.hparams import MethodConfig, SearchSpace, Strict, TrainingConfig, TuneConfig, method_kind, search_space

# Serving strategies a config may ask for; lorascope.serving.strategies registers one object each.
STRATEGIES = ("base", "full", "merged", "separate", "switch", "multi")
ENGINES = ("peft", "vllm")  # lorascope.serving.benchmark measures both on one grid


class ModelConfig(Strict):
    name: str = Field("minilm-l6", description="bundled alias, Hub id or local folder")
    max_length: int = Field(128, gt=1, description="tokens per example; longer examples are truncated")
    dropout: float | None = Field(None, ge=0, lt=1, description="hidden and attention dropout; None = checkpoint's")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more time"
    )


class DataConfig(Strict):
    glue: str | None = Field(
        None,
        description="Hub id or local folder in the nyu-mll/glue layout; None = $LORASCOPE_GLUE, else the Hub's "
        "nyu-mll/glue, looked up where the study runs (config.yaml keeps what was given, not this machine's path)",
    )
    dev_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train held out as the dev split (selection and tuning), stratified"
    )
    dev_max: int = Field(1000, gt=0, description="cap on the dev split of every task")
    probe_size: int = Field(
        256, gt=0, description="eval examples the represent stage pools (fixed and ordered, shared by every model)"
    )
    squad_v2: str | None = Field(
        None,
        description="Hub id or local folder in the rajpurkar/squad_v2 layout; None = $LORASCOPE_SQUAD_V2, else the "
        "Hub's rajpurkar/squad_v2, looked up where the study runs",
    )
    split_seed: int = Field(0, description="seed of the train / dev split and of the stratified subsamples")

    def glue_source(self) -> str:
        """Where the GLUE tasks are read from on this machine."""
        return self.glue or os.environ.get("LORASCOPE_GLUE") or "nyu-mll/glue"

    def squad_v2_source(self) -> str:
        """Where the built-in squad_v2 task is read from on this machine."""
        return self.squad_v2 or os.environ.get("LORASCOPE_SQUAD_V2") or "rajpurkar/squad_v2"


class TaskConfig(Strict):
    """A built-in task (only the size keys, and for squad_v2 the generation keys, apply) or a
    custom one (`source` given): a classification task (`text`, `label`) or a generative one
    (`completion`, with `prompt` or `template`)."""

    train_max: int | None = Field(None, gt=0, description="stratified subsample of train")
    eval_max: int | None = Field(
        None,
        gt=0,
        description="classification: the first N eval examples (smoke tests only); generative: N eval examples "
        "drawn with data.split_seed (SQuAD's dev set is ordered by article)",
    )
    dev_max: int | None = Field(None, gt=0, description="cap on this task's dev split; None = data.dev_max")
    source: str | None = Field(None, description="Hub id, dataset folder, or CSV/TSV/JSON file")
    subset: str | None = Field(None, description="dataset configuration name of a Hub / folder source")
    eval_source: str | None = Field(None, description="file with the eval split (file sources)")
    train_split: str = Field("train", description="split of the source trained on")
    eval_split: str = Field("validation", description="split of the source reported (never used for selection)")
    text: str | None = Field(None, description="column of the text (custom tasks)")
    text_pair: str | None = Field(None, description="column of the second text of a pair task")
    label: str = Field("label", description="column of the label")
    label_names: list[str] | None = Field(None, description="label names in index order; None = from the dataset")
    metric: Literal["accuracy", "f1"] | None = Field(
        None, description="primary metric; None = accuracy (GLUE tasks: their own; generative tasks: SQuAD F1)"
    )
    prompt: str | None = Field(None, description="column of the prompt (generative custom tasks)")
    template: str | None = Field(
        None,
        description="prompt built from the example's columns, e.g. 'Question: {question}\\nAnswer:' "
        "(generative custom tasks, instead of `prompt`); an unknown {column} is an input error",
    )
    completion: str | None = Field(
        None, description="column of the completion a generative task learns (and is scored against)"
    )
    chat_template: bool = Field(
        False, description="wrap each prompt as a user turn in the tokenizer's chat template (generative tasks)"
    )
    unanswerable: str = Field(
        "unanswerable", min_length=1, description="squad_v2: the target of a question without answer (scored as '')"
    )
    unanswerable_share: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="squad_v2: share of unanswerable questions in the train subsample; None = as in the data",
    )
    max_new_tokens: int = Field(
        32,
        gt=0,
        description="generative tasks: the most tokens generated per answer; fewer when the longest training "
        "completion (with its eos) is shorter",
    )

    def is_generative(self, name: str) -> bool:
        """A prompt -> completion task: the built-in squad_v2, or a custom task with `completion`."""
        return self.completion is not None or (name == "squad_v2" and self.source is None)


class BaselinesConfig(Strict):
    head_only: bool = Field(
        True, description="train the classifier head on the frozen backbone (the probe every method must beat)"
    )
    overfit_examples: int = Field(
        16, gt=1, description="training examples each method must fit (sanity check of its learning rate)"
    )
    overfit_steps: int = Field(30, gt=0, description="steps of the overfit check")
    overfit_threshold: float = Field(0.9, gt=0, le=1, description="train accuracy the overfit check must reach")


class RepresentConfig(Strict):
    """Which hidden states the `represent` stage pools on each task's `probe` split."""

    layers: list[int] | None = Field(None, description="0 = embedding output, i = block i; None = all")
    poolings: list[Literal["mean", "head"]] = Field(
        ["mean", "head"], description="mean: masked mean over tokens; head: the token the classifier head reads"
    )
    skip_special_tokens: bool = Field(False, description="leave [CLS]/[SEP]/BOS/EOS out of mean pooling")
    skip_first_position: bool | None = Field(
        None,
        description="leave the first position (and BOS) out of mean pooling; None = decoders yes, encoders no "
        "(a decoder's first position is a massive activation that dominates the mean)",
    )
    batch_size: int = Field(64, gt=0, description="batch size of the feature pass")


class DriftConfig(Strict):
    measures: list[Literal["linear_cka", "debiased_cka", "rbf_cka", "cosine", "legacy_index"]] = Field(
        ["linear_cka", "debiased_cka", "cosine"],
        description="legacy_index (opt-in): the reference study's mis-normalised CKA, not a similarity index",
    )
    bootstrap: int = Field(1000, ge=0, description="resamples over probe examples; 0 = no intervals")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap intervals")
    seed: int = Field(0, description="seed of the bootstrap and the shuffled-row reference")
    standardize: bool = Field(
        False,
        description="z-score every feature over the probe examples (per model and layer) before the measures, so "
        "that a few dimensions holding most of the variance (drift_layers.csv: top1_share_x, top1_share_y) do not "
        "decide CKA and cosine alone",
    )


class WeightsConfig(Strict):
    intruder_k: int = Field(10, gt=0, description="top singular vectors of W_ft checked (Shuttleworth et al. 2024)")
    intruder_epsilon: float = Field(0.5, gt=0, lt=1, description="max |cosine| with every base singular vector")


class ForgetConfig(Strict):
    """Stage `forget`: linear probes of every model on every task (transfer retention) and the
    change of language-modelling loss. Feature time grows with (runs + 1) x tasks x
    (probe_train + probe_eval) examples."""

    tasks: list[str] | None = Field(None, description="tasks the probes measure; None = every task of the study")
    probe_train: int = Field(1000, gt=1, description="probe training examples per task, from dev (no run trains on it)")
    probe_eval: int | None = Field(None, gt=1, description="eval examples the probes are scored on; None = all")
    pooling: Literal["mean", "head"] = Field("mean", description="features the probes read (as represent.poolings)")
    layer_every: int | None = Field(None, gt=0, description="also probe every k-th layer; None = last layer only")
    folds: int = Field(5, gt=1, description="cross-validation folds choosing the probe's regularisation")
    bootstrap: int = Field(1000, ge=0, description="resamples over eval examples / documents; 0 = no intervals")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the intervals")
    lm: bool = Field(True, description="LM-loss change (decoders: causal; encoders with an MLM head: masked)")
    lm_text: str | None = Field(
        None, description="text file, one document per line; None = eval sentences of the tasks a run did not train on"
    )
    lm_documents: int = Field(200, gt=0, description="documents per task (or from lm_text)")
    seed: int = Field(0, description="seed of the probes' samples, folds and bootstrap")


class DeployGridConfig(Strict):
    """The cells every engine is measured on and how a cell is timed (docs/serving.md)."""

    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(
        [1, 2, 4, 8, 16], min_length=1, description="examples per request in the one-client cells"
    )
    seq_lens: list[Literal["natural"] | Annotated[int, Field(gt=0)]] = Field(
        ["natural", 32, 128],
        min_length=1,
        description="request lengths of the one-client cells: natural = padded to the request's longest "
        "example, N = every example truncated or padded to N tokens (PEFT only)",
    )
    concurrency: list[Annotated[int, Field(gt=0)]] = Field(
        [1, 2, 4, 8, 16],
        min_length=1,
        description="closed-loop clients of the load cells (one example per request, natural length)",
    )
    warmup: int = Field(
        3,
        ge=0,
        description="untimed requests per strategy and client before a cell's first timed one (at least "
        "one per client where a queue must fill or a server went quiet)",
    )
    repeats: int = Field(30, gt=1, description="timed requests per strategy in a one-client cell")
    requests: int = Field(
        200,
        gt=1,
        description="timed requests per strategy in a cell of two or more clients (200: p99 is "
        "interpolated below the two slowest, not the maximum)",
    )
    rounds: int | None = Field(
        None,
        gt=0,
        description="rounds a cell's timed requests go in, every strategy of the engine taking one turn "
        "a round; None = turns as short as the engine allows (serving.load.TURNS)",
    )
    threads: int | None = Field(None, gt=0, description="torch threads while PEFT is timed; None = all cores")
    output_tokens: int = Field(
        32,
        gt=0,
        description="tokens every timed generation request generates per prompt (end-of-sequence ignored, "
        "so every strategy does the same work); generative tasks only",
    )

    @model_validator(mode="after")
    def _unique(self) -> DeployGridConfig:
        for key in ("concurrency", "batch_sizes", "seq_lens"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"`{key}` has duplicates: {values}")
        fewest = min(self.repeats, self.requests) if max(self.concurrency) > 1 else self.repeats
        if self.rounds is not None and self.rounds > fewest:
            raise ValueError(f"`rounds` ({self.rounds}) is more than a cell's timed requests ({fewest})")
        return self


class DeployChecksConfig(Strict):
    """Correctness checks run before anything is timed."""

    examples: int | None = Field(
        None, gt=0, description="labelled eval examples per task the serving paths are checked on; None = all"
    )


class DeployVllmConfig(Strict):
    """The vLLM engine: its own virtualenv and server processes."""

    python: str | None = Field(
        None,
        description="vLLM virtualenv (folder or its python); None = $LORASCOPE_VLLM_PYTHON, else .venv-vllm "
        "(`make vllm`)",
    )
    startup_timeout: float = Field(600.0, gt=0, description="seconds a vLLM server may take to become ready")
    args: list[str] = Field(
        [],
        description="extra arguments of every vLLM server, e.g. [--enforce-eager] (skips torch.compile at "
        "start-up: faster to start, slower to serve)",
    )

    def refuse_fewer_loras(self, adapters: int) -> None:
        """vLLM's --max-loras defaults to the number of adapters served; a smaller one given in
        `args` would make multi swap adapters in and out, a different measurement."""
        args = [a for arg in self.args for a in arg.split("=", 1)]
        if "--max-loras" in args and args.index("--max-loras") + 1 < len(args):
            given = args[args.index("--max-loras") + 1]
            if not given.isdigit() or int(given) < adapters:
                raise ValueError(f"deploy.vllm.args: --max-loras {given} is fewer than the {adapters} adapters served")


class DeployConfig(Strict):
    """Serving measurement of the study's runs (stage `deploy`, `lorascope bench`): strategies,
    engines, the grid of cells, checks and the vLLM environment (docs/serving.md)."""

    enabled: bool = Field(True, description="run the deploy stage")
    seed: int | None = Field(None, description="which run seed to serve; None = the study's first seed")
    strategies: list[Literal[STRATEGIES]] = Field(
        list(STRATEGIES),
        min_length=1,
        description="ways of serving: base, full, merged, separate, switch (PEFT only), multi",
    )
    engines: list[Literal[ENGINES]] = Field(
        ["peft"],
        min_length=1,
        description="serving engines: peft = PEFT in-process, vllm = vLLM servers from their own virtualenv",
    )
    methods: list[str] | None = Field(
        None,
        description="further adapter methods served merged and separate in PEFT beside the first adapter method "
        "(each loads two more models at once); None = every adapter method of `methods`, [] = none",
    )
    compile: bool = Field(False, description="also time torch.compile variants of merged and separate (PEFT)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of each overhead's interval (0 = none)")
    grid: DeployGridConfig = Field(default_factory=DeployGridConfig, description="cells and timing")
    checks: DeployChecksConfig = Field(
        default_factory=DeployChecksConfig, description="correctness checks before timing"
    )
    vllm: DeployVllmConfig = Field(default_factory=DeployVllmConfig, description="the vLLM engine")

    @model_validator(mode="after")
    def _unique(self) -> DeployConfig:
        for key in ("engines", "strategies", "methods"):
            values = getattr(self, key) or []
            if len(set(values)) != len(values):
                raise ValueError(f"`{key}` has duplicates: {values}")
        return self

    def check_environment(self) -> None:
        """The checks that need the file system, run before any stage: the vLLM env, when asked for."""
        if self.enabled and "vllm" in self.engines:
            from lorascope.serving.vllm_server import find_vllm_python  # standard library + psutil only

            find_vllm_python(self.vllm.python)


class AnalysisConfig(Strict):
    """Success criteria of the reference study and how failed runs are flagged."""

    quality_max_gap_pp: float = Field(3.0, ge=0, description="LoRA within this many points of full FT")
    quality_metric: Literal["accuracy", "primary"] = Field(
        "accuracy",
        description="the quality criterion's metric: accuracy, as the proposal states it, or each "
        "task's primary metric (MRPC: F1); the report shows both",
    )
    drift_min_reduction: float = Field(0.20, description="LoRA drift at least this fraction lower")
    deploy_max_overhead: float = Field(0.30, description="separate-adapter overhead at batch 1")
    majority_margin: float = Field(0.01, ge=0, description="a run must beat the majority baseline by this")
    forgetting_max_gap_pp: float = Field(1.0, description="LoRA forgets at most this many points more than full FT")
    forgetting_in_verdict: bool = Field(False, description="the forgetting row joins 'recommended'; else it informs")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of every interval in the statistics")
    bootstrap: int = Field(10000, ge=0, description="bootstrap resamples of the drift-reduction and effect intervals")
    seed: int = Field(0, description="seed of the resampling and permutation tests")
    reference: str = Field(
        "full",
        description="the method every other one is judged against, paired by seed (verdict.csv, methods.csv); "
        "statistics.csv also compares the others with each other",
    )


class RuntimeConfig(Strict):
    """How to run; only `device` and `bf16` can change results, so only they are fingerprinted."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where models run; auto = CUDA when available")
    bf16: bool | None = Field(None, description="bf16 autocast over fp32 weights; unset: on CUDA only")
    threads: int | None = Field(
        None, gt=0, description="torch threads per worker; None: the cores split between workers"
    )
    workers: int | None = Field(
        None,
        gt=0,
        description="parallel worker processes for independent units (runs, "
        "baselines, features); 1 = in this process; None: one per GPU, else per core (at most 4)",
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="run units as Ray tasks: local (a Ray instance "
        "for this study), auto (this machine's cluster) or host:port / ray://host:port",
    )
    report_to: list[Literal["none", "wandb", "mlflow", "tensorboard"]] = Field(
        ["none"], description="Trainer loggers (e.g. [tensorboard]); none by default"
    )
    progress: bool = Field(True, description="progress bars on stderr")


class StudyConfig(Strict):
    name: str = Field("study", description="the study's name (report title, tuning search names)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tasks: dict[str, TaskConfig] = Field(
        {"sst2": TaskConfig(), "mrpc": TaskConfig(), "rte": TaskConfig()},
        description="the tasks, by name: a built-in GLUE task (sst2, mrpc, rte) or a custom one (`source` given)",
    )
    methods: list[str] = Field(
        ["lora", "full"],
        description="what is compared: names of methods defined in `training` (lora, full, or your own); "
        "a mapping `{name: {type: ..., ...}}` defines and picks them at once",
    )
    seeds: list[int] = Field(
        [42, 1337, 2024],
        description="one run per task x method x seed; a seed fixes head initialisation and data order for both methods, so same-seed runs are a pair",
    )
    training: TrainingConfig = TrainingConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    tune: TuneConfig = TuneConfig()
    represent: RepresentConfig = RepresentConfig()
    drift: DriftConfig = DriftConfig()
    weights: WeightsConfig = WeightsConfig()
    forget: ForgetConfig = ForgetConfig()
    deploy: DeployConfig = DeployConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="before")
    @classmethod
    def _methods_defined_in_place(cls, data: Any) -> Any:
        """`methods: {name: definition}` is `training.<name>: definition` and `methods: [names]`."""
        if isinstance(data, dict) and isinstance(data.get("methods"), dict):
            training = dict(data.get("training") or {})
            for name, spec in data["methods"].items():
                given = training.get(name)
                training[name] = {**given, **spec} if isinstance(given, dict) and isinstance(spec, dict) else spec
            data = {**data, "training": training, "methods": list(data["methods"])}
        return data

    @field_validator("methods")
    @classmethod
    def _method_names(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a method is named twice: {value}")
        return value

    def defines(self, name: str) -> bool:
        """`name` is a method: built in, or defined as training.<name>."""
        return name in ("lora", "full") or name in (self.training.model_extra or {})

    def method(self, name: str) -> MethodConfig:
        """training.<name>: what method `name` trains and its hyperparameters."""
        return getattr(self.training, name)

    def method_kind(self, method: str) -> str:
        """full, lora or peft: how `method` trains (lorascope.hparams.method_kind)."""
        return method_kind(self.method(method))

    def adapter_methods(self) -> list[str]:
        """The methods that train a PEFT adapter, in config order."""
        return [name for name in self.methods if self.method_kind(name) != "full"]

    def served_methods(self) -> tuple[str | None, str | None]:
        """The adapter method deploy serves with every strategy (the first of `methods`; further
        ones only merged and separate) and the full fine-tuning method it serves as `full` (the
        first of that kind); None where the study has none."""
        adapters = self.adapter_methods()
        full = [m for m in self.methods if m not in adapters]
        return (adapters[0] if adapters else None), (full[0] if full else None)

    def search_space(self, method: str) -> SearchSpace:
        """tune.spaces.<method> over its kind's default space."""
        return search_space(method, self.method_kind(method)).model_validate(self.tune.spaces.get(method, {}))

    @model_validator(mode="after")
    def _grid_not_empty(self) -> StudyConfig:
        for key in ("tasks", "methods", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"`{key}` must not be empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` has duplicates: {self.seeds}")
        if undefined := [name for name in self.methods if not self.defines(name)]:
            raise ValueError(
                f"methods: {undefined[0]} is not defined; define it as training.{undefined[0]}: "
                "{type: ..., lr: ...} (type full, or a PEFT type such as lora, ia3, loha)"
            )
        if self.analysis.reference != "full" and self.analysis.reference not in self.methods:  # full: none to compare
            raise ValueError(f"analysis.reference: {self.analysis.reference} is not one of methods {self.methods}")
        if wrong := [m for m in self.deploy.methods or [] if m not in self.adapter_methods()[1:]]:
            raise ValueError(
                f"deploy.methods: {wrong[0]} is not a further adapter method of `methods` "
                f"(those: {self.adapter_methods()[1:]}; the first adapter method is always served)"
            )
        for method in self.tune.spaces:
            if not self.defines(method):
                raise ValueError(f"tune.spaces.{method}: no method of that name is defined in `training`")
            self.search_space(method)
        missing = [
            f"{key} lacks {value!r}"
            for key, value, have in (
                ("grid.batch_sizes", 1, self.deploy.grid.batch_sizes),
                ("grid.seq_lens", "natural", self.deploy.grid.seq_lens),
                ("strategies", "separate", self.deploy.strategies),
                ("strategies", "full", self.deploy.strategies),
            )
            if value not in have
        ]
        if self.deploy.enabled and missing:
            raise ValueError(
                "the deployment criterion reads batch size 1, natural length, strategies separate and "
                f"full; deploy.{', deploy.'.join(missing)} (add it, or set deploy.enabled=false)"
            )
        return self

    @model_validator(mode="after")
    def _forget_tasks_known(self) -> StudyConfig:
        unknown = sorted(set(self.forget.tasks or ()) - set(self.tasks))
        if unknown:
            raise ValueError(f"forget.tasks: {unknown} are not tasks of the study ({', '.join(self.tasks)})")
        generative = self.generative_tasks()
        if named := sorted(set(self.forget.tasks or ()) & set(generative)):
            raise ValueError(f"forget.tasks: {named} are generative; linear probes need a classification task's labels")
        if generative and self.tune.enabled:
            raise ValueError(f"tune.enabled: tuning searches classification tasks only; {generative} are generative")
        if self.deploy.enabled and self.adapter_methods():
            # classification serves one adapter a task; generation every LoRA run of its tasks
            served = max(len(self.tasks) - len(generative), len(generative) * len(self.seeds))
            self.deploy.vllm.refuse_fewer_loras(served)
        return self

    def generative_tasks(self) -> list[str]:
        return [name for name, task in self.tasks.items() if task.is_generative(name)]
