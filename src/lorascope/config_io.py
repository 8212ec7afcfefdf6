"""Reading and writing a study config: profiles, YAML files, `--set` overrides, validation of
the whole config with one-line errors, and the YAML and fingerprint a study records."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorascope.config import StudyConfig
from lorascope.errors import InputError, did_you_mean
from lorascope.hparams import TrainingConfig
from lorascope.preflight import config_size_problems

DEFAULT_PROFILE = "quick"


def profiles() -> list[str]:
    """The bundled profiles: the names of src/lorascope/profiles/*.yaml, the one list of them."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("lorascope.profiles").iterdir()
        if p.name.endswith(".yaml")
    )


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
    """The config, or an InputError naming every problem: the models' rules, then the sizes a
    measure needs that the config alone rules out (preflight), so such a study stops here."""
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise InputError(f"{source}: {_explain(err)}") from None
    problems = config_size_problems(config)
    if problems:
        raise InputError(f"{source}: {'; '.join(problems)}")
    return config


def _read_profile(name: str) -> dict[str, Any]:
    if name not in profiles():
        raise InputError(f"unknown profile '{name}'; choose one of {', '.join(profiles())}")
    text = resources.files("lorascope.profiles").joinpath(f"{name}.yaml").read_text()
    raw = yaml.safe_load(text) or {}
    parent = raw.pop("extends", None)  # a profile may be another profile plus a few keys
    return _deep_merge(_read_profile(parent), raw) if parent else raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (a method or task defined twice),
    where PyYAML would keep the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
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
    """`--set` may only name keys that exist; dict-valued keys (tasks) and `training` (methods
    of your own) accept new entries, and below a method of your own (whose keys depend on its
    PEFT type) validation decides."""
    model: type[BaseModel] | None = StudyConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        if model is None:
            raise InputError(f"--set {key}: '{parts[i - 1]}' has no sub-keys")
        fields = model.model_fields
        if parts[i] not in fields and model is TrainingConfig:
            return
        if parts[i] not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise InputError(f"--set {key}: no key '{parts[i]}' in {where}{did_you_mean(parts[i], fields)}")
        annotation = fields[parts[i]].annotation
        i += 1
        while getattr(annotation, "__origin__", None) is dict:  # a name (task, method, searched key) follows
            annotation, i = annotation.__args__[1], i + 1
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {key}: '{part}' is not a mapping")
    node[leaf] = value


def _explain(err: ValidationError) -> str:
    """One line per problem: where it is, what is wrong, and the closest valid key."""
    lines = []
    for problem in err.errors():
        where = _without_union_tags(problem["loc"])
        loc = ".".join(str(p) for p in where)
        if problem["type"] == "extra_forbidden":
            parent = _model_at(where[:-1])
            hint = did_you_mean(str(where[-1]), parent.model_fields) if parent else ""
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


def _without_union_tags(loc: tuple) -> tuple:
    """`training.<name>.<tag>.key` -> `training.<name>.key`: pydantic puts the tag of the method
    union (full, lora, peft) of a method of your own into the location, where no user wrote it."""
    return loc[:2] + loc[3:] if len(loc) > 2 and loc[0] == "training" and loc[2] in ("full", "lora", "peft") else loc


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
