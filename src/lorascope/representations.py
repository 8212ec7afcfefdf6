"""Layer-wise pooled hidden states on a task's fixed `probe` examples.

Padding never enters a feature (pooling goes through the attention mask), token-level states
live for one batch only, and the features come back in the probe's own order whatever the
batching, so features of two models line up example by example."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save

from lorascope.config import RepresentConfig
from lorascope.errors import InputError
from lorascope.evaluation import length_batches
from lorascope.runtime import autocast

POOLINGS = ("mean", "head")


def head_reads_last_token(model: torch.nn.Module) -> bool:
    """Decoder classifiers (`score` head) read the last non-pad token, encoder classifiers
    (`classifier` head) the first: the `head` pooling takes the token the head reads."""
    if hasattr(model, "peft_config"):  # PeftModel -> LoraModel -> the transformers classifier
        model = model.base_model.model
    return hasattr(model, "score") and not hasattr(model, "classifier")


def resolve_layers(requested: list[int] | None, available: int) -> list[int]:
    """Indices into the model's hidden states: 0 = embedding output, i = output of block i."""
    if requested is None:
        return list(range(available))
    bad = [i for i in requested if not 0 <= i < available]
    if bad:
        raise InputError(f"represent.layers: {bad} out of range; this model has layers 0..{available - 1}")
    return sorted(set(requested))


@torch.no_grad()
def pooled_features(
    model: torch.nn.Module,
    split: datasets.Dataset,
    *,
    tokenizer,
    layers: list[int] | None,
    poolings: tuple[str, ...] = POOLINGS,
    skip_special_tokens: bool = False,
    batch_size: int = 64,
    device: torch.device = torch.device("cpu"),
    bf16: bool = False,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """{pooling: float32 [layers × examples × hidden]} in the split's order, and the layer
    indices. Batches are formed by length (less padding) and written back in order."""
    model.eval()
    last_token = head_reads_last_token(model)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    chosen: list[int] = []
    for rows, batch in length_batches(split, tokenizer, batch_size, device):
        rows = torch.from_numpy(rows)
        with autocast(device, bf16):
            hidden = model(**batch, output_hidden_states=True).hidden_states
        if not out:
            chosen = resolve_layers(layers, len(hidden))
            out = {p: torch.empty(len(chosen), len(split), hidden[0].shape[-1]) for p in poolings}
        mask = batch["attention_mask"].bool()
        if "mean" in out:
            keep = mask & ~torch.isin(batch["input_ids"], special.to(device)) if skip_special_tokens else mask
            if not keep.any(dim=1).all():
                raise InputError("represent.skip_special_tokens: a probe example has no other tokens")
            weights = (keep.float() / keep.sum(dim=1, keepdim=True)).unsqueeze(-1)
        position = mask.sum(dim=1) - 1 if last_token else torch.zeros(len(rows), dtype=torch.long, device=device)
        for slot, layer in enumerate(chosen):
            states = hidden[layer].float()
            if "mean" in out:
                out["mean"][slot, rows] = (states * weights).sum(dim=1).cpu()
            if "head" in out:
                out["head"][slot, rows] = states[torch.arange(len(rows), device=device), position].cpu()
        del hidden
    return out, chosen


def study_features(model: torch.nn.Module, probe: datasets.Dataset, settings: RepresentConfig, tokenizer,
                   batch_size: int, device: torch.device, bf16: bool):  # fmt: skip
    """`pooled_features` with a study's represent settings (the stage and the single comparison)."""
    return pooled_features(
        model.to(device), probe, tokenizer=tokenizer, layers=settings.layers, poolings=tuple(settings.poolings),
        skip_special_tokens=settings.skip_special_tokens, batch_size=batch_size, device=device, bf16=bf16,
    )  # fmt: skip


def features_bytes(features: dict[str, torch.Tensor], example_ids, layers: list[int]) -> bytes:
    """One safetensors file per model and task: a tensor per pooling plus the example ids."""
    tensors = {p: t.contiguous() for p, t in features.items()}
    tensors["example_ids"] = torch.as_tensor(list(example_ids), dtype=torch.int64)
    return save(tensors, metadata={"layers": json.dumps(layers)})


def load_features(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: v for k, v in tensors.items() if k != "example_ids"}, tensors["example_ids"], layers
