"""The ways of serving a fine-tuned model (a classifier, or a causal LM when no number of labels
is given), one registered `Strategy` each: how it loads, how a request reaches its adapter(s),
and which checkpoints it reads. A new way of serving is a new
entry here (config.STRATEGIES names the ones a config may ask for)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from peft import PeftConfig, PeftModel

from lorascope import modeling
from lorascope.config import STRATEGIES as CONFIG_NAMES
from lorascope.errors import InputError
from lorascope.runtime import autocast
from lorascope.serving.inputs import Batch, Models

# PEFT routes each example of a `multi` batch to its adapter only through these wrappers
MIXABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_SET_ADAPTER_HAS_MODE = "inference_mode" in inspect.signature(PeftModel.set_adapter).parameters
Call = Callable[[Batch, int], torch.Tensor]
Route = Callable[[Batch, int], dict]  # request k's extra arguments of forward / generate


@dataclasses.dataclass(frozen=True)
class Strategy:
    """`load(models, num_labels, pad_token_id)` -> an fp32 model in eval mode on the CPU (a causal
    LM when num_labels is None); `route(model, tasks)` -> request k's extra arguments of the
    model's forward or generate call (switching the active adapter where the strategy does);
    `adapters`: which adapters it reads
    ("none", "first" or "all"; "all" needs two or more); `full`: whether it serves the fully
    fine-tuned checkpoint; `compiled_from`: a torch.compile variant of another strategy."""

    name: str
    load: Callable[[Models, int | None, int], torch.nn.Module] | None
    route: Callable[[torch.nn.Module, list[str]], Route]
    adapters: str = "none"
    full: bool = False
    compiled_from: str | None = None

    def call(self, model: torch.nn.Module, tasks: list[str]) -> Call:
        """The function one classification request runs: the routed forward pass, its logits."""
        route = self.route(model, tasks)
        return lambda batch, request: model(**batch.inputs, **route(batch, request)).logits

    def unavailable(self, models: Models) -> str | None:
        """Why this strategy cannot serve `models`, or None."""
        if self.full and models.full is None:
            return "no fully fine-tuned model given"
        if self.adapters == "all" and len(models.adapters) < 2:
            return f"needs 2 or more adapters, {len(models.adapters)} given"
        return None


def load_base(base: str, num_labels: int | None, pad_token_id: int) -> torch.nn.Module:
    """fp32 classifier on the base weights, or the causal LM with num_labels None. A classifier's
    head under the `base` strategy is random (seeded): it is a compute reference, not a
    predictor; adapters overwrite it with their own."""
    labels = None if num_labels is None else tuple(str(i) for i in range(num_labels))
    return modeling.load_model(base, labels, 0, pad_token_id)


def mixable_modules(model: torch.nn.Module, names: list[str] | None) -> list[str]:
    """PEFT can route each example of a batch to its own adapter only through Linear /
    Embedding / Conv wrappers; a trained block such as BERT's pooler (Linear + tanh) is
    targeted through its Linear children instead: the same weights and the same function."""
    out = []
    for name in names or []:
        hits = [m for key, m in model.named_modules() if key.endswith(name)]  # PEFT's matching rule
        if all(isinstance(m, MIXABLE) for m in hits):
            out.append(name)
            continue
        for module in hits:
            parts = {child: sub for child, sub in module.named_modules() if child and isinstance(sub, MIXABLE)}
            covered = sum(p.numel() for sub in parts.values() for p in sub.parameters())
            if covered != sum(p.numel() for p in module.parameters()):
                raise InputError(
                    f"modules_to_save '{name}' ({type(module).__name__}) has parameters PEFT cannot "
                    "route per example, so its adapters cannot share one batch (multi)"
                )
            out.extend(f"{name}.{child}" for child in parts)
    return list(dict.fromkeys(out))


def load_multi(models: Models, num_labels: int | None, pad_token_id: int) -> PeftModel:
    """All adapters on one base, each under its task's name (for `switch` and `multi`). Their
    trained head blocks are wrapped where PEFT can mix them (see `mixable_modules`)."""
    base_model = load_base(models.base, num_labels, pad_token_id)
    configs = {}
    for name, path in models.adapters.items():
        config = PeftConfig.from_pretrained(path)
        config.inference_mode = True
        config.modules_to_save = mixable_modules(base_model, config.modules_to_save)
        configs[name] = config
    names = list(models.adapters)
    first = names[0]
    model = modeling.load_adapter(base_model, models.adapters[first], adapter_name=first, config=configs[first])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
        loaded = model.load_adapter(models.adapters[name], adapter_name=name)
        if getattr(loaded, "unexpected_keys", None):
            raise InputError(f"{models.adapters[name]}: weights that fit no module: {loaded.unexpected_keys[:3]}")
    activate(model, first)
    return model.eval()


def activate(model: PeftModel, name: str) -> None:
    """Switch the active adapter as a server would: without touching requires_grad."""
    if _SET_ADAPTER_HAS_MODE:
        model.set_adapter(name, inference_mode=True)
    else:  # older PEFT
        model.set_adapter(name)


def _separate(models: Models, num_labels: int | None, pad_token_id: int) -> PeftModel:
    return modeling.load_adapter(load_base(models.base, num_labels, pad_token_id), models.adapters[models.first])


def _plain(model: torch.nn.Module, tasks: list[str]) -> Route:
    return lambda batch, request: {}


def _switch(model: PeftModel, tasks: list[str]) -> Route:
    """Request k is served by task k's adapter (tasks in turn), activated inside the request with
    set_adapter: one adapter per request, switching timed."""

    def route(batch: Batch, request: int) -> dict:
        activate(model, tasks[request % len(tasks)])
        return {}

    return route


def _multi(model: PeftModel, tasks: list[str]) -> Route:
    """One batch holding examples of several adapters: each example names its own (PEFT's
    adapter_names)."""
    return lambda batch, request: {"adapter_names": batch.tasks}


def compile_model(model: torch.nn.Module, probe: Batch, device: torch.device, bf16: bool):
    """torch.compile with dynamic shapes (natural lengths vary per batch), compiled on `probe`
    now so that a failure becomes a skip reason, not a crash in the middle of the grid."""
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode(), autocast(device, bf16):
        compiled(**probe.inputs)
    return compiled


REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("base", lambda models, n, pad: load_base(models.base, n, pad), _plain),
        Strategy(
            "full", lambda models, n, pad: modeling.load_full(models.full, pad, causal=n is None), _plain, full=True
        ),
        Strategy(
            "merged",
            lambda models, n, pad: _separate(models, n, pad).merge_and_unload().eval(),
            _plain,
            adapters="first",
        ),
        Strategy("separate", _separate, _plain, adapters="first"),
        Strategy("switch", load_multi, _switch, adapters="all"),
        Strategy("multi", load_multi, _multi, adapters="all"),
        Strategy("merged_compiled", None, _plain, adapters="first", compiled_from="merged"),
        Strategy("separate_compiled", None, _plain, adapters="first", compiled_from="separate"),
    )
}
assert set(CONFIG_NAMES) <= set(REGISTRY), "every strategy a config may name is registered"


def variants(names: list[str], compile: bool) -> list[str]:
    """The strategies to report, in order: the configured ones, then their compiled variants."""
    names = list(dict.fromkeys(names))
    if compile:
        names += [s.name for s in REGISTRY.values() if s.compiled_from in names]
    return names
