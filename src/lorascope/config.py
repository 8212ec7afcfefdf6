"""Study configuration: pydantic models (unknown keys are errors), profiles, `--set` overrides,
and the fingerprints that decide which stage outputs are still valid."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from lorascope.errors import InputError

PROFILES = ("smoke", "quick", "quick-tuned", "decoder", "paper")
# Serving strategies a config may ask for; lorascope.serving.strategies registers one object each.
STRATEGIES = ("base", "full", "merged", "separate", "switch", "mixed")
ENGINES = ("peft", "vllm")  # lorascope.serving.engines measures both with one load generator
DEFAULT_PROFILE = "quick"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field("minilm-l6", description="bundled alias, Hub id or local folder")
    max_length: int = Field(128, gt=1)
    dropout: float | None = Field(None, ge=0, lt=1, description="hidden and attention dropout; None = checkpoint's")
    gradient_checkpointing: bool = False


class DataConfig(Strict):
    glue: str = Field(
        default_factory=lambda: os.environ.get("LORASCOPE_GLUE", "nyu-mll/glue"),
        description="Hub id or local folder in the nyu-mll/glue layout (env LORASCOPE_GLUE)",
    )
    dev_fraction: float = Field(0.1, gt=0, lt=1)
    dev_max: int = Field(1000, gt=0)
    probe_size: int = Field(256, gt=0)
    split_seed: int = 0


class TaskConfig(Strict):
    """A built-in task (only the size keys apply) or a custom one (`source` given)."""

    train_max: int | None = Field(None, gt=0, description="stratified subsample of train")
    eval_max: int | None = Field(None, gt=0, description="first N eval examples (smoke tests only)")
    dev_max: int | None = Field(None, gt=0, description="cap on this task's dev split; None = data.dev_max")
    source: str | None = Field(None, description="Hub id, dataset folder, or CSV/TSV/JSON file")
    subset: str | None = None
    eval_source: str | None = Field(None, description="file with the eval split (file sources)")
    train_split: str = "train"
    eval_split: str = "validation"
    text: str | None = None
    text_pair: str | None = None
    label: str = "label"
    label_names: list[str] | None = None
    metric: Literal["accuracy", "f1"] | None = None


class MethodConfig(Strict):
    """Hyperparameters of one training method; every key reaches the Trainer or lorascope's
    own callbacks (tests/test_config_reaches_trainer.py proves it)."""

    lr: float = Field(gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate of the classifier head; None = lr")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    eval_every: int = Field(0, ge=0, description="dev evaluation every N steps; 0 = each epoch")
    patience: int = Field(0, ge=0, description="early stop after N evals without gain; 0 = off")


class LoraMethodConfig(MethodConfig):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None = per-architecture default")
    modules_to_save: list[str] | None = Field(
        None, description="trained besides the adapter and classifier; None = per-architecture (BERT: pooler)"
    )


class TrainingConfig(Strict):
    lora: LoraMethodConfig = LoraMethodConfig(lr=5e-4)
    full: MethodConfig = MethodConfig(lr=5e-5)
    head: MethodConfig = MethodConfig(lr=1e-3)
    eval_batch_size: int = Field(64, gt=0)


class BaselinesConfig(Strict):
    head_only: bool = True
    overfit_examples: int = Field(16, gt=1)
    overfit_steps: int = Field(30, gt=0)
    overfit_threshold: float = Field(0.9, gt=0, le=1)


class RepresentConfig(Strict):
    """Which hidden states the `represent` stage pools on each task's `probe` split."""

    layers: list[int] | None = Field(None, description="0 = embedding output, i = block i; None = all")
    poolings: list[Literal["mean", "head"]] = ["mean", "head"]
    skip_special_tokens: bool = Field(False, description="leave [CLS]/[SEP]/BOS/EOS out of mean pooling")
    skip_first_position: bool | None = Field(
        None,
        description="leave the first position (and BOS) out of mean pooling; None = decoders yes, encoders no "
        "(a decoder's first position is a massive activation that dominates the mean)",
    )
    batch_size: int = Field(64, gt=0)


class DriftConfig(Strict):
    measures: list[Literal["linear_cka", "debiased_cka", "rbf_cka", "cosine", "legacy_index"]] = Field(
        ["linear_cka", "debiased_cka", "cosine"],
        description="legacy_index (opt-in): the reference study's mis-normalised CKA, not a similarity index",
    )
    bootstrap: int = Field(1000, ge=0, description="resamples over probe examples; 0 = no intervals")
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


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
    pooling: Literal["mean", "head"] = "mean"
    layer_every: int | None = Field(None, gt=0, description="also probe every k-th layer; None = last layer only")
    folds: int = Field(5, gt=1, description="cross-validation folds choosing the probe's regularisation")
    bootstrap: int = Field(1000, ge=0, description="resamples over eval examples / documents; 0 = no intervals")
    confidence: float = Field(0.95, gt=0, lt=1)
    lm: bool = Field(True, description="LM-loss change (decoders: causal; encoders with an MLM head: masked)")
    lm_text: str | None = Field(
        None, description="text file, one document per line; None = eval sentences of the tasks a run did not train on"
    )
    lm_documents: int = Field(200, gt=0, description="documents per task (or from lm_text)")
    seed: int = 0


class DeployConfig(Strict):
    """Serving benchmark of the study's runs: strategies, grid and timing budget."""

    enabled: bool = True
    strategies: list[Literal[STRATEGIES]] = Field(list(STRATEGIES), min_length=1)
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field([1, 2, 4, 8, 16], min_length=1)
    seq_lens: list[Literal["natural"] | Annotated[int, Field(gt=0)]] = Field(["natural", 32, 128], min_length=1)
    warmup: int = Field(3, ge=0, description="untimed calls per cell before timing")
    repeats: int = Field(30, gt=1, description="timed calls per strategy and cell")
    threads: int | None = Field(None, gt=0, description="torch threads while timing; None = all cores")
    seed: int | None = Field(None, description="which run seed to serve; None = the first seed")
    bootstrap: int = Field(1000, ge=0)
    check_examples: int | None = Field(
        None, gt=0, description="eval examples per task for the correctness checks; None = all"
    )
    compile: bool = Field(False, description="also time torch.compile variants of merged and separate")
    engines: list[Literal[ENGINES]] = Field(
        ["peft"],
        min_length=1,
        description="serving engines; vllm adds the "
        "load grid (concurrency, batched requests) on a vLLM server, beside PEFT",
    )
    concurrency: list[Annotated[int, Field(gt=0)]] = Field(
        [1, 2, 4, 8, 16], min_length=1, description="closed-loop clients of the engine load grid"
    )
    engine_requests: int = Field(
        200,
        gt=1,
        description="timed requests per engine load-grid cell (200: p99 is "
        "interpolated below the two slowest, not the maximum)",
    )
    engine_rounds: int | None = Field(
        None,
        gt=0,
        description="rounds each engine cell's requests go in, every "
        "strategy of the engine in turn, so a slow spell hits all strategies alike; "
        "None = turns as short as the engine allows (serving.engines.TURNS)",
    )
    vllm_python: str | None = Field(
        None,
        description="vLLM virtualenv (folder or its python); None = "
        "$LORASCOPE_VLLM_PYTHON, else .venv-vllm (`make vllm`)",
    )
    vllm_startup_timeout: float = Field(600.0, gt=0, description="seconds a vLLM server may take to become ready")
    vllm_args: list[str] = Field(
        [],
        description="extra arguments of every vLLM server, e.g. [--enforce-eager] "
        "(skips torch.compile at start-up: faster to start, slower to serve)",
    )

    @model_validator(mode="after")
    def _unique(self) -> DeployConfig:
        for key in ("engines", "concurrency", "batch_sizes"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"`{key}` has duplicates: {values}")
        if self.engine_rounds is not None and self.engine_rounds > self.engine_requests:
            raise ValueError(
                f"`engine_rounds` ({self.engine_rounds}) is more than `engine_requests` "
                f"({self.engine_requests}): every round needs a request"
            )
        return self

    def check_environment(self) -> None:
        """The checks that need the file system, run before any stage: the vLLM env, when asked for."""
        if self.enabled and "vllm" in self.engines:
            from lorascope.serving.vllm_server import find_vllm_python  # standard library + psutil only

            find_vllm_python(self.vllm_python)


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
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap: int = Field(10000, ge=0)
    seed: int = 0


class SearchParam(Strict):
    """One searched hyperparameter: a range `{low, high, log, step}` (whole numbers for integer
    hyperparameters such as `r`) or a set `{choices: [...]}`."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = Field(False, description="sample uniformly in log space (needs low > 0)")
    step: int | float | None = Field(None, gt=0, description="grid step of a range; None = continuous")
    choices: list[bool | int | float | str] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either {low, high, log, step} or {choices}, not both")
            if not self.choices:
                raise ValueError("`choices` must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both `low` and `high` (or give `choices`)")
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("a range is either `log` or has a `step`, not both")
        return self


# Method hyperparameters a search may not vary: trials train at the production effective batch
# size, on the production targets, and evaluate on dev as often as the runs they stand for.
UNSEARCHABLE = {
    "batch_size": "trials use the production batch size (training.<method>.batch_size)",
    "grad_accum": "trials use the production effective batch size (training.<method>.grad_accum)",
    "eval_every": "trials evaluate on dev as often as the runs they stand for",
    "target_modules": "a list-valued setting; set it in training.lora",
    "modules_to_save": "a list-valued setting; set it in training.lora",
}


class SearchSpace(Strict):
    """Base of the per-method spaces: one optional field per searchable hyperparameter of the
    method's config (None = not searched, the training.<method> value is used)."""

    method: ClassVar[str]
    hparams: ClassVar[type[MethodConfig]]

    @model_validator(mode="before")
    @classmethod
    def _known_parameters(cls, data: Any) -> Any:
        """Unknown names, and names that are not hyperparameters of this method (so would never
        reach its trainer), are errors that name the dotted key."""
        for key in data if isinstance(data, dict) else ():
            if key in cls.model_fields:
                continue
            where = f"tune.spaces.{cls.method}.{key}"
            if key in UNSEARCHABLE:
                raise ValueError(f"{where} cannot be searched: {UNSEARCHABLE[key]}")
            if key in LoraMethodConfig.model_fields:
                raise ValueError(
                    f"{where}: '{key}' is not a hyperparameter of method {cls.method}, so it would "
                    f"never reach the trainer (searchable: {', '.join(cls.model_fields)})"
                )
            raise ValueError(f"{where}: unknown parameter{_suggest(key, cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _values_are_valid_hparams(self) -> SearchSpace:
        """Both ends of every range and every choice must be a valid value of the hyperparameter
        (e.g. dropout < 1, an integer for `r`); they are stored as the hyperparameter's type."""
        for name, param in self.params().items():
            where = f"tune.spaces.{self.method}.{name}"
            if param.choices is not None:
                update = {"choices": [_check_hparam(self.hparams, name, v, f"{where}.choices") for v in param.choices]}
            else:
                update = {
                    end: _check_hparam(self.hparams, name, getattr(param, end), f"{where}.{end}")
                    for end in ("low", "high")
                }
            object.__setattr__(self, name, param.model_copy(update=update))  # no re-validation loop
        return self

    def params(self) -> dict[str, SearchParam]:
        """The searched hyperparameters, in a fixed order."""
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


def _check_hparam(model: type[MethodConfig], name: str, value: Any, where: str) -> Any:
    try:
        return getattr(model.model_validate({"lr": 1.0, name: value}), name)
    except ValidationError as err:
        raise ValueError(f"{where}: {value!r} is not a valid {name} ({err.errors()[0]['msg']})") from None


def _search_space(name: str, method: str, hparams: type[MethodConfig], defaults: dict[str, SearchParam]):
    fields = {key: (SearchParam | None, defaults.get(key)) for key in hparams.model_fields if key not in UNSEARCHABLE}
    space = create_model(name, __base__=SearchSpace, **fields)
    space.method, space.hparams = method, hparams
    space.__doc__ = f"Search space of method {method}: any of {', '.join(fields)}; null = not searched."
    return space


_SHARED_DEFAULTS = {
    "warmup_ratio": SearchParam(low=0.0, high=0.2),
    "weight_decay": SearchParam(low=0.0, high=0.1),
    "epochs": SearchParam(choices=[1, 2, 3]),
}
LoraSearchSpace = _search_space(
    "LoraSearchSpace",
    "lora",
    LoraMethodConfig,
    {
        "lr": SearchParam(low=1e-5, high=5e-3, log=True),  # contains the quick profile's 2e-3
        "alpha": SearchParam(choices=[8, 16, 32]),
        "dropout": SearchParam(low=0.0, high=0.2),
        **_SHARED_DEFAULTS,
    },
)
FullSearchSpace = _search_space(
    "FullSearchSpace",
    "full",
    MethodConfig,
    {
        "lr": SearchParam(low=1e-6, high=3e-4, log=True),  # contains the quick profile's 1e-4
        **_SHARED_DEFAULTS,
    },
)


class TuneSpaces(Strict):
    lora: LoraSearchSpace = LoraSearchSpace()  # type: ignore[valid-type]
    full: FullSearchSpace = FullSearchSpace()  # type: ignore[valid-type]


class TuneConfig(Strict):
    """Optuna search per task x method on the `dev` split (stage `tune`, `lorascope tune`)."""

    enabled: bool = Field(False, description="`run` tunes, then trains the grid with the tuned hyperparameters")
    trials: int = Field(20, gt=1, description="finished (complete or pruned) trials per task x method")
    startup_trials: int = Field(8, gt=0, description="random trials before TPE takes over; < trials")
    seed: int = Field(0, description="TPE sampler seed")
    storage: str | None = Field(
        None,
        description="Optuna storage URL (sqlite:///, postgresql://, mysql://) or a journal file path; "
        "None = sqlite file tune/optuna.db in the study directory (one process)",
    )
    prune: bool = Field(True, description="median pruner on the dev metric of each evaluation")
    prune_startup_trials: int = Field(4, ge=0, description="trials that finish before any trial is pruned")
    prune_warmup_steps: int = Field(0, ge=0, description="optimizer steps before a trial can be pruned")
    heartbeat_s: int = Field(30, gt=0, description="shared storages: a trial silent for 4 heartbeats is failed")
    max_retries: int = Field(2, ge=0, description="times a trial of a killed worker is rerun with its parameters")
    spaces: TuneSpaces = TuneSpaces()

    @model_validator(mode="after")
    def _fewer_startup_trials(self) -> TuneConfig:
        if self.startup_trials >= self.trials:
            raise ValueError(
                f"tune.startup_trials ({self.startup_trials}) must be below tune.trials ({self.trials}), "
                "or TPE never leaves its random start-up phase"
            )
        return self


class RuntimeConfig(Strict):
    """How to run; only `device` and `bf16` can change results, so only they are fingerprinted."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
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
    report_to: list[Literal["none", "wandb", "mlflow", "tensorboard"]] = ["none"]
    progress: bool = True


class StudyConfig(Strict):
    name: str = "study"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tasks: dict[str, TaskConfig] = {"sst2": TaskConfig(), "mrpc": TaskConfig(), "rte": TaskConfig()}
    methods: list[Literal["lora", "full"]] = ["lora", "full"]
    seeds: list[int] = [42, 1337, 2024]
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

    @model_validator(mode="after")
    def _grid_not_empty(self) -> StudyConfig:
        for key in ("tasks", "methods", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"`{key}` must not be empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` has duplicates: {self.seeds}")
        missing = [
            f"{key} lacks {value!r}"
            for key, value, have in (
                ("batch_sizes", 1, self.deploy.batch_sizes),
                ("seq_lens", "natural", self.deploy.seq_lens),
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
        return self


# ---------------------------------------------------------------- loading and overrides


def load_config(
    path: str | os.PathLike | None = None,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> StudyConfig:
    """Profile (default `quick` when no file is given) < config file < `--set` overrides."""
    raw: dict[str, Any] = {}
    if profile is not None or path is None:
        raw = _read_profile(profile or DEFAULT_PROFILE)
    if path is not None:
        _deep_merge(raw, _read_yaml(Path(path)))
    config = validate(
        apply_overrides(raw, overrides), source=str(path) if path else f"profile {profile or DEFAULT_PROFILE}"
    )
    config.deploy.check_environment()
    return config


def apply_overrides(raw: dict[str, Any], overrides) -> dict[str, Any]:
    """`--set a.b.c=value` on a plain config dict; the value is parsed as YAML."""
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return raw


def validate(raw: dict[str, Any], source: str = "config") -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise InputError(f"{source}: {_explain(err)}") from None


def _read_profile(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise InputError(f"unknown profile '{name}'; choose one of {', '.join(PROFILES)}")
    text = resources.files("lorascope.profiles").joinpath(f"{name}.yaml").read_text()
    raw = yaml.safe_load(text) or {}
    parent = raw.pop("extends", None)  # a profile may be another profile plus a few keys
    return _deep_merge(_read_profile(parent), raw) if parent else raw


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _deep_merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise InputError(f"--set expects key=value, got '{item}'")
    _check_dotted_key(key)
    return key, yaml.safe_load(text) if text else None


def _check_dotted_key(key: str) -> None:
    """`--set` may only name keys that exist; dict-valued keys (tasks) accept new entries."""
    model: type[BaseModel] | None = StudyConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        if model is None:
            raise InputError(f"--set {key}: '{parts[i - 1]}' has no sub-keys")
        fields = model.model_fields
        if parts[i] not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise InputError(f"--set {key}: no key '{parts[i]}' in {where}{_suggest(parts[i], fields)}")
        annotation = fields[parts[i]].annotation
        if getattr(annotation, "__origin__", None) is dict:
            model, i = annotation.__args__[1], i + 2
        else:
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            i += 1


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {key}: '{part}' is not a mapping")
    node[leaf] = value


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def _explain(err: ValidationError) -> str:
    """One line per problem: where it is, what is wrong, and the closest valid key."""
    lines = []
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            parent = _model_at(problem["loc"][:-1])
            hint = _suggest(str(problem["loc"][-1]), parent.model_fields) if parent else ""
            lines.append(f"unknown key '{loc}'{hint}")
        else:
            message = problem["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's error
            lines.append(message if loc and message.startswith(f"{loc}.") else f"{loc or 'config'}: {message}")
    return "; ".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = StudyConfig
    skip_next = False
    for part in loc:
        if skip_next:
            skip_next = False
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if getattr(annotation, "__origin__", None) is dict:
            model, skip_next = annotation.__args__[1], True
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


# ---------------------------------------------------------------- fingerprints and saving


def fingerprint(*parts: Any) -> str:
    """Stable short hash of plain data (pydantic models are dumped first)."""
    plain = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    text = json.dumps(plain, sort_keys=True, default=lambda m: m.model_dump(mode="json"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def results_fingerprint(config: StudyConfig) -> str:
    """Everything that can change a number in the study (progress bars and loggers cannot)."""
    return fingerprint(config.model_dump(mode="json", exclude={"runtime": {"threads", "report_to", "progress"}}))


def to_yaml(config: StudyConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
