"""What a method trains, its hyperparameters, and the spaces the tuning stage searches them in:
the config sections `training` (every method's definition) and `tune`, and the models they are
built from, kept apart from config.py's other sections."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from lorascope.errors import did_you_mean


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(Strict):
    """Hyperparameters of one training method; every key reaches the Trainer or lorascope's
    own callbacks (tests/test_config_reaches_trainer.py proves it)."""

    lr: float = Field(gt=0, description="learning rate of the trained backbone weights (LoRA: the adapter)")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the classifier head; None = lr")
    epochs: float = Field(1.0, gt=0, description="passes over the training split")
    batch_size: int = Field(16, gt=0, description="examples per step (per device)")
    grad_accum: int = Field(1, gt=0, description="steps whose gradients are summed before an update")
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="learning-rate schedule"
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2")
    eval_every: int = Field(0, ge=0, description="dev evaluation every N steps; 0 = each epoch")
    patience: int = Field(0, ge=0, description="early stop after N evals without gain; 0 = off")


class FullMethodConfig(MethodConfig):
    """Full fine-tuning: every weight of the model trains."""

    type: Literal["full"] = Field("full", description="`full`, or a PEFT type for an adapter method")


class AdapterMethodConfig(MethodConfig):
    """A method of your own: `type: full` (full fine-tuning with its own optimiser settings) or
    any PEFT type (lora, ia3, loha, lokr, vera, ...). Every key of a PEFT method that is not an
    optimiser hyperparameter below is a field of that type's PEFT config, given flat
    (`{type: lora, r: 64, lora_alpha: 128, use_dora: true, lr: 5e-4}`); the method is validated
    by building that PEFT config, so PEFT's own rules decide and a new PEFT type needs no code
    here. A `type: lora` method has `training.lora`'s keys, at their defaults (r 8, alpha 16,
    dropout 0.05) unless given."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    type: str = Field(description="a PEFT type: lora, ia3, loha, lokr, vera, ...")
    target_modules: list[str] | None = Field(
        None, description="None = per-architecture default (LoRA: the attention projections; other types: PEFT's)"
    )
    modules_to_save: list[str] | None = Field(
        None, description="trained besides the adapter and classifier; None = per-architecture (BERT: pooler)"
    )

    def peft_fields(self) -> dict[str, Any]:
        """The fields of the PEFT config this method sets (every key but the optimiser's)."""
        return dict(self.model_extra or {})

    def peft_config(self, targets: list[str] | None, modules_to_save: list[str] | None, causal: bool = False):
        """The PEFT config this method trains with (every adapter hyperparameter goes through
        here: tests/test_config_reaches_trainer.py)."""
        from peft import TaskType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        return PEFT_TYPE_TO_CONFIG_MAPPING[self.type.upper()](
            task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
            target_modules=targets,
            modules_to_save=modules_to_save or None,
            **self.peft_fields(),
        )

    @model_validator(mode="after")
    def _peft_builds_it(self) -> AdapterMethodConfig:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        types = {name.lower() for name in PEFT_TYPE_TO_CONFIG_MAPPING}
        if self.type not in types:
            raise ValueError(f"type '{self.type}' is neither full nor a PEFT type{did_you_mean(self.type, types)}")
        if PEFT_TYPE_TO_CONFIG_MAPPING[self.type.upper()]().is_prompt_learning:
            # drift, weights, forgetting and serving all read the adapter merged into the base
            raise ValueError(f"type '{self.type}' learns prompts, which PEFT cannot merge into the base's weights")
        try:
            self.peft_config(self.target_modules, self.modules_to_save)
        except TypeError as err:  # an unknown keyword: name it and the closest field
            config_class = PEFT_TYPE_TO_CONFIG_MAPPING[self.type.upper()]
            unknown = next((k for k in self.peft_fields() if f"'{k}'" in str(err)), None)
            if unknown is None:
                raise ValueError(f"PEFT's {config_class.__name__} refuses it: {err}") from None
            # the type's own fields first; an optimiser name only when very close ('r' is not a typo of 'lr')
            fields = [f.name for f in dataclasses.fields(config_class)]
            close = difflib.get_close_matches(unknown, fields, n=1) or difflib.get_close_matches(
                unknown, list(type(self).model_fields), n=1, cutoff=0.8
            )
            raise ValueError(
                f"'{unknown}' is neither an optimiser hyperparameter nor a field of PEFT's {config_class.__name__}"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            ) from None
        except ValueError as err:
            raise ValueError(f"PEFT refuses it: {str(err).splitlines()[0]}") from None
        return self


class LoraMethodConfig(AdapterMethodConfig):
    """LoRA and its variants (DoRA: `use_dora`, rsLoRA: `use_rslora`, PiSSA:
    `init_lora_weights: pissa`, ...): lorascope's names for rank, scaling and dropout (PEFT's
    `lora_alpha` and `lora_dropout` are accepted too), and every other LoraConfig field flat."""

    type: Literal["lora"] = Field("lora", description="`lora`")
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(
        16,
        gt=0,
        validation_alias=AliasChoices("alpha", "lora_alpha"),
        description="LoRA scaling numerator (the update is scaled by alpha / r); also `lora_alpha`",
    )
    dropout: float = Field(
        0.05,
        ge=0,
        lt=1,
        validation_alias=AliasChoices("dropout", "lora_dropout"),
        description="dropout on the LoRA input; also `lora_dropout`",
    )

    def peft_fields(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "bias": "none",
        } | super().peft_fields()


def method_kind(value: Any) -> str:
    """full, lora or peft (any other PEFT type) of a method or its raw config: what decides
    its model class and its default search space."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("full", "lora") else "peft"


def fingerprint_values(name: str, hp: MethodConfig, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """A method's hyperparameters as fingerprints hold them. A method named after its type
    leaves the type out, so the built-in lora and full keep the fingerprints (and the trained
    runs) they had before a method had a type."""
    values = hp.model_dump(mode="json", exclude=set(exclude))
    if values.get("type") == name:
        del values["type"]
    return values


# One method of the study: full fine-tuning, LoRA (and its variants), or any other PEFT type.
MethodSpec = Annotated[
    Annotated[FullMethodConfig, Tag("full")]
    | Annotated[LoraMethodConfig, Tag("lora")]
    | Annotated[AdapterMethodConfig, Tag("peft")],
    Discriminator(method_kind),
]


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
    "target_modules": "a list-valued setting; set it in training.<method>",
    "modules_to_save": "a list-valued setting; set it in training.<method>",
    "type": "a method's type is what it trains; define another method instead",
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
            raise ValueError(f"{where}: unknown parameter{did_you_mean(key, cls.model_fields)}")
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


_SHARED_DEFAULTS = {
    "warmup_ratio": SearchParam(low=0.0, high=0.2),
    "weight_decay": SearchParam(low=0.0, high=0.1),
    "epochs": SearchParam(choices=[1, 2, 3]),
}
# What a method's search varies unless tune.spaces.<method> says otherwise, by its kind; an
# adapter method of another PEFT type searches the optimiser's hyperparameters.
_SPACE_DEFAULTS = {
    "lora": {
        "lr": SearchParam(low=1e-5, high=5e-3, log=True),  # contains the quick profile's 2e-3
        "alpha": SearchParam(choices=[8, 16, 32]),
        "dropout": SearchParam(low=0.0, high=0.2),
        **_SHARED_DEFAULTS,
    },
    "full": {"lr": SearchParam(low=1e-6, high=3e-4, log=True), **_SHARED_DEFAULTS},  # contains quick's 1e-4
    "peft": {"lr": SearchParam(low=1e-5, high=5e-3, log=True), **_SHARED_DEFAULTS},
}


@functools.cache
def search_space(method: str, kind: str) -> type[SearchSpace]:
    """The search-space model of `method` (named in its errors), by the method's kind."""
    hparams = LoraMethodConfig if kind == "lora" else MethodConfig
    defaults = _SPACE_DEFAULTS[kind]
    fields = {key: (SearchParam | None, defaults.get(key)) for key in hparams.model_fields if key not in UNSEARCHABLE}
    space = create_model(f"SearchSpace_{method}", __base__=SearchSpace, **fields)
    space.method, space.hparams = method, hparams
    space.__doc__ = f"Search space of method {method}: any of {', '.join(fields)}; null = not searched."
    return space


class TrainingConfig(Strict):
    """Every method's definition, by name: `lora` and `full` are built in; any other name is a
    method of your own, `{type: full}` or a PEFT type with its fields and the optimiser's
    hyperparameters (`dora: {type: lora, use_dora: true, lr: 1e-3}`). `methods` picks which run."""

    # no validate_assignment: with typed extras, pydantic 2 then stores `__pydantic_extra__` as a method
    model_config = ConfigDict(extra="allow", validate_assignment=False)
    __pydantic_extra__: dict[str, MethodSpec] = Field(init=False)

    lora: LoraMethodConfig = Field(LoraMethodConfig(lr=5e-4), description="LoRA (type lora)")
    full: FullMethodConfig = Field(FullMethodConfig(lr=5e-5), description="full fine-tuning (type full)")
    head: MethodConfig = Field(MethodConfig(lr=1e-3), description="the head-only baseline's hyperparameters")
    eval_batch_size: int = Field(64, gt=0, description="batch size of every evaluation (dev, eval, baselines)")

    @model_validator(mode="before")
    @classmethod
    def _a_new_method_has_a_type(cls, data: Any) -> Any:
        """`training.lroa.r=4` is a typo more often than a method: say so, not "type: Field required"."""
        for name, spec in data.items() if isinstance(data, dict) else ():
            if name not in cls.model_fields and isinstance(spec, dict) and "type" not in spec:
                known = [
                    n for n in dict.fromkeys((*cls.model_fields, *data)) if n not in (name, "head", "eval_batch_size")
                ]
                raise ValueError(
                    f"{name} is not a method; a method of your own needs a type{did_you_mean(name, known)}"
                )
        return data


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
    spaces: dict[str, dict[str, SearchParam | None]] = Field(
        {},
        description="per method, the searched hyperparameters: `{lr: {low, high, log}, alpha: {choices: [...]}}`; "
        "null = not searched; a method not named searches its kind's default space (lr, warmup, decay, epochs; "
        "LoRA also alpha and dropout)",
    )

    @model_validator(mode="after")
    def _fewer_startup_trials(self) -> TuneConfig:
        if self.startup_trials >= self.trials:
            raise ValueError(
                f"tune.startup_trials ({self.startup_trials}) must be below tune.trials ({self.trials}), "
                "or TPE never leaves its random start-up phase"
            )
        return self
