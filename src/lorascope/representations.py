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
from lorascope.modeling import is_causal_lm
from lorascope.runtime import autocast
from lorascope.study import Table
from lorascope.tasks import prompts_only

CPU = torch.device("cpu")
POOLINGS = ("mean", "head")
# Beside the poolings in every features file when the mean leaves positions out: per layer and
# example, the share of the token-norm mass (sum of hidden-state norms over attended tokens)
# that the left-out positions carry, so a reader sees what the exclusion removed.
EXCLUDED_SHARE = "excluded_norm_share"
POOLED_POSITIONS = Table("pooled_positions", ("task", "layer", "positions", "excluded_norm_share"))


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers classifier inside a PeftModel (PeftModel -> LoraModel -> classifier)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def head_reads_last_token(model: torch.nn.Module) -> bool:
    """Decoder classifiers (`score` head) read the last non-pad token, encoder classifiers
    (`classifier` head) the first: the `head` pooling takes the token the head reads. A causal
    LM's `head` pooling is the prompt's last token, the state generation starts from."""
    model = _classifier(model)
    return (hasattr(model, "score") and not hasattr(model, "classifier")) or is_causal_lm(model)


def head_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None, last_token: bool
) -> torch.Tensor:
    """The position the classifier head reads in each row. Decoders: as transformers' sequence
    classifiers find it, the rightmost token that is not the pad token. That is not the last
    attended one when pad = eos and the tokenizer appends an eos (the head then reads the token
    before it). Encoders: the first token."""
    if not last_token:
        return torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        return attention_mask.sum(dim=1) - 1
    steps = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (steps * (input_ids != pad_token_id)).argmax(dim=-1)


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
    skip_first_position: bool | None = None,
    batch_size: int = 64,
    device: torch.device = CPU,
    bf16: bool = False,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """{pooling: float32 [layers × examples × hidden]} in the split's order, and the layer
    indices. Batches are formed by length (less padding) and written back in order.

    `skip_first_position` (None: decoders yes, encoders no) leaves the first position and any
    BOS out of mean pooling: in decoders the first position's hidden state is a "massive
    activation" (SmolLM2-135M: norm ~23,000 against ~180-500 for other tokens in layers 12-28)
    that dominates a mean and hid three quarters of a fine-tuned run's drift. With positions left
    out, the result also holds EXCLUDED_SHARE [layers × examples]."""
    model.eval()
    last_token = head_reads_last_token(model)
    skip_first = last_token if skip_first_position is None else skip_first_position
    excludes = "mean" in poolings and (skip_first or skip_special_tokens)
    pad_token_id = _classifier(model).config.pad_token_id
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
            if excludes:
                out[EXCLUDED_SHARE] = torch.empty(len(chosen), len(split))
        mask = batch["attention_mask"].bool()
        if "mean" in out:
            keep = mask & ~torch.isin(batch["input_ids"], special.to(device)) if skip_special_tokens else mask
            if skip_first:
                keep = keep.clone()
                keep[:, 0] = False
                if tokenizer.bos_token_id is not None:
                    keep &= batch["input_ids"] != tokenizer.bos_token_id
            if not keep.any(dim=1).all():
                raise InputError(
                    "represent: a probe example has no token left to pool (skip_special_tokens / skip_first_position)"
                )
            weights = (keep.float() / keep.sum(dim=1, keepdim=True)).unsqueeze(-1)
        position = head_positions(batch["input_ids"], batch["attention_mask"], pad_token_id, last_token)
        for slot, layer in enumerate(chosen):
            states = hidden[layer].float()
            if "mean" in out:
                out["mean"][slot, rows] = (states * weights).sum(dim=1).cpu()
            if excludes:
                norms = states.norm(dim=-1) * mask
                out[EXCLUDED_SHARE][slot, rows] = ((norms * (mask & ~keep)).sum(dim=1) / norms.sum(dim=1)).cpu()
            if "head" in out:
                out["head"][slot, rows] = states[torch.arange(len(rows), device=device), position].cpu()
        del hidden
    return out, chosen


def pooled_positions(settings: RepresentConfig, model: torch.nn.Module) -> str:
    """In words, which positions the mean pools under `settings` for this model."""
    skip_first = head_reads_last_token(model) if settings.skip_first_position is None else settings.skip_first_position
    left_out = ["the first position and BOS"] * skip_first + ["special tokens"] * settings.skip_special_tokens
    return "all attended tokens" + (f" but {' and '.join(left_out)}" if left_out else "")


def position_rows(task: str, path: Path) -> list[dict]:
    """pooled_positions.csv rows of one task from a features file: the mean over examples of
    EXCLUDED_SHARE per layer (NaN when nothing was left out)."""
    with safe_open(str(path), "pt") as f:  # the metadata and one tensor, not every pooling's features
        metadata = f.metadata()
        share = f.get_tensor(EXCLUDED_SHARE) if EXCLUDED_SHARE in f.keys() else None  # noqa: SIM118 - safe_open has no __contains__
    layers, positions = json.loads(metadata["layers"]), metadata.get("positions", "")
    return [
        {
            "task": task,
            "layer": layer,
            "positions": positions,
            "excluded_norm_share": float("nan") if share is None else share[i].mean().item(),
        }
        for i, layer in enumerate(layers)
    ]


def study_features(
    model: torch.nn.Module,
    probe: datasets.Dataset,
    settings: RepresentConfig,
    tokenizer,
    batch_size: int,
    device: torch.device,
    bf16: bool,
):
    """`pooled_features` with a study's represent settings (the stage and the single comparison);
    a generative task's examples are pooled over their prompts."""
    return pooled_features(
        model.to(device),
        prompts_only(probe),
        tokenizer=tokenizer,
        layers=settings.layers,
        poolings=tuple(settings.poolings),
        skip_special_tokens=settings.skip_special_tokens,
        skip_first_position=settings.skip_first_position,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
    )


def features_bytes(features: dict[str, torch.Tensor], example_ids, layers: list[int], positions: str = "") -> bytes:
    """One safetensors file per model and task: a tensor per pooling plus the example ids, and
    which positions the mean pooled (`pooled_positions`) in its metadata."""
    tensors = {p: t.contiguous() for p, t in features.items()}
    tensors["example_ids"] = torch.as_tensor(list(example_ids), dtype=torch.int64)
    return save(tensors, metadata={"layers": json.dumps(layers), "positions": positions})


def load_features(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    return {k: v for k, v in tensors.items() if k != "example_ids"}, tensors["example_ids"], layers
