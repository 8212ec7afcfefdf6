"""A method's hyperparameters and the spaces the tuning stage searches them in: the config
models that training and tuning share, kept apart from config.py's sections."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

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


class LoraMethodConfig(MethodConfig):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(None, description="None = per-architecture default")
    modules_to_save: list[str] | None = Field(
        None, description="trained besides the adapter and classifier; None = per-architecture (BERT: pooler)"
    )


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
