"""docs/configuration.md, generated from the config models: every key with its type, default
and description, so the reference cannot drift from the code. Regenerate with
`python -m lorascope.config_reference > docs/configuration.md` (`make docs`); a test compares."""

from __future__ import annotations

import inspect
import json
import types
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lorascope.config import StudyConfig
from lorascope.hparams import AdapterMethodConfig, TrainingConfig

HEADER = """# Configuration reference

Generated from the config models in `src/lorascope/config.py` and `src/lorascope/hparams.py` (`make docs`); do not edit by hand.

A study is one YAML file (or a profile, `--profile NAME`, from `src/lorascope/profiles/`) plus
`--set key=value` overrides in dotted form, typed by this schema:
`--set training.lora.lr=3e-4 --set seeds=[1,2,3] --set tasks.sst2.train_max=5000`.
Unknown keys are errors, and the whole config is validated before any stage runs: bad input
exits with code 2 and one line saying what and where.
"""


def _type(annotation) -> str:
    """A field's type as a reader writes it: `list[int]`, `"mean" | "head"`, `int | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(computed)"
    if field.is_required():
        return "(required)"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=lambda m: m.model_dump(mode='json', exclude_defaults=True))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _model_in(annotation) -> type[BaseModel] | None:
    return annotation if inspect.isclass(annotation) and issubclass(annotation, BaseModel) else None


def _doc(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    return "" if doc.startswith("!!!") or doc == BaseModel.__doc__ else " ".join(inspect.cleandoc(doc).split())


def _section(prefix: str, model: type[BaseModel], out: list[str]) -> None:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        child = _model_in(annotation)
        if typing.get_origin(annotation) is dict and _model_in(typing.get_args(annotation)[1]):
            nested.append((f"{key}.<name>", typing.get_args(annotation)[1]))
            rows.append((key, "mapping of sections", _default(field), field.description or ""))
        elif child is not None:
            nested.append((key, child))
        else:
            rows.append((key, _cell(_type(annotation)), _default(field), field.description or ""))
    if rows:
        out += [f"\n## `{prefix or 'top level'}`\n"]
        if _doc(model):
            out += [_doc(model) + "\n"]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{k}` | {t} | {d} | {_cell(desc)} |" for k, t, d, desc in rows]
    if model is TrainingConfig:  # its other keys are methods of your own (typed extras)
        nested.append((f"{prefix}.<name>", AdapterMethodConfig))
    for key, child in nested:
        _section(key, child, out)


def render() -> str:
    out = [HEADER]
    _section("", StudyConfig, out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
