"""What vLLM needs from a PEFT adapter folder: the --max-lora-rank that admits it, the modules it
trains (--lora-target-modules), and a config vLLM accepts.

PEFT's sequence-classification models list every task-head name PEFT knows in the saved
`modules_to_save` (PEFT 0.22: classifier, score and DistilBERT's pre_classifier), whether or not the
model has such a module; vLLM 0.32 refuses any name but classifier and score ("vLLM only supports
modules_to_save being either None or ["classifier", "score"]"), so an adapter saved by PEFT 0.22 does
not load. `servable_adapter` serves such a folder through a copy of its config that keeps the names
the adapter holds weights for, the weights themselves linked, not copied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _config(adapter: str | os.PathLike) -> dict:
    return json.loads((Path(adapter) / CONFIG).read_text())


def _rank(config: dict) -> int:
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def lora_rank(adapter: str | os.PathLike) -> int:
    """The smallest --max-lora-rank that admits this adapter (vLLM's default, 16, refuses larger ranks)."""
    try:
        rank = _rank(_config(adapter))
    except (OSError, ValueError):
        return 16
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def lora_targets(adapters) -> list[str] | None:
    """The modules the adapters train (adapter_config.json's target_modules, all adapters'), for
    --lora-target-modules; None when any adapter names them by a pattern ("all-linear", a regex) or
    not at all. Without the flag vLLM wraps every module it supports (here o, gate/up and down as
    well as the packed q/k/v), and on CPU each wrapped module gathers a LoRA matrix per token:
    with q/v adapters on SmolLM2-135M, LoRA requests took 230 ms instead of 346 ms at one client
    (docs/benchmarks.md)."""
    targets = set()
    for adapter in adapters:
        try:
            named = _config(adapter).get("target_modules")
        except (OSError, ValueError):
            return None
        if not isinstance(named, list) or not named:
            return None
        targets.update(named)
    return sorted(targets)


def saved_modules(adapter: str | os.PathLike) -> list[str] | None:
    """The `modules_to_save` names the adapter holds weights for, in the config's order; None when
    the config lists none or the folder has no safetensors weights to check against."""
    try:
        listed = _config(adapter).get("modules_to_save")
        with safe_open(Path(adapter) / WEIGHTS, framework="numpy") as weights:
            parts = {part for key in weights.keys() for part in key.split(".")}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError):
        return None
    return [name for name in listed if name in parts] if listed else None


def servable_adapter(adapter: str | os.PathLike, scratch: str | os.PathLike) -> str:
    """`adapter` itself when vLLM loads it as it is; else a folder in `scratch` whose config lists only
    the modules_to_save the adapter holds weights for, every other file a link to the original."""
    adapter = Path(adapter)
    kept = saved_modules(adapter)
    config = _config(adapter) if kept is not None else {}
    if kept is None or kept == config["modules_to_save"]:
        return str(adapter)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for item in adapter.iterdir():
        if item.name != CONFIG and not (scratch / item.name).exists():
            (scratch / item.name).symlink_to(item.resolve())
    (scratch / CONFIG).write_text(json.dumps(config | {"modules_to_save": kept or None}, indent=2))
    return str(scratch)


def vllm_refusal(adapter: str | os.PathLike) -> str:
    """Why a further adapter method has no vLLM rows: vLLM 0.32 serves plain LoRA (no DoRA) up to
    rank 512; a plain LoRA it could serve is left out by lorascope, which starts vLLM servers for
    the study's first adapter method only."""
    config = _config(adapter)
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        return f"vLLM serves LoRA adapters only; this one is {kind}"
    if config.get("use_dora"):
        return "vLLM does not serve DoRA adapters (use_dora)"
    if _rank(config) > LORA_RANKS[-1]:
        return f"rank above vLLM's largest --max-lora-rank, {LORA_RANKS[-1]}"
    return "not served: lorascope starts vLLM servers for the study's first adapter method only"
