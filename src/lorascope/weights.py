"""Weight-space change of a fine-tuned model against its base, one matrix at a time: relative
update norm, effective rank of the update, intruder dimensions. Math in float64.

The delta generators yield one ΔW at a time, so a 1B-parameter model never holds a second full
copy of its weights as deltas."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from lorascope.study import Table

WEIGHTS = Table("weights", ("task", "method", "seed", "module", "relative_update", "effective_rank", "intruders"))

# Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
# (arXiv:2410.21228): the authors' released script counts among the top k = 10 singular vectors
# of W_ft those whose best |cosine| with W_base's singular vectors is below 0.5 (its default).
INTRUDER_K = 10
INTRUDER_EPSILON = 0.5

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # .<adapter>

Delta = tuple[str, torch.Tensor, torch.Tensor]  # module name, base weight, W_ft - W_base


def relative_update(delta: torch.Tensor, base: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W‖_F."""
    base_norm = torch.linalg.vector_norm(base.double())
    if base_norm == 0:
        raise ValueError("relative update: the base weight is all zeros")
    return (torch.linalg.vector_norm(delta.double()) / base_norm).item()


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli 2007: exp of the entropy of the normalised singular values; 0 for a zero
    matrix. A rank-r LoRA update scores at most r; a spread-out full update scores far more."""
    singular = torch.linalg.svdvals(matrix.double())
    total = singular.sum()
    if total == 0:
        return 0.0
    p = singular[singular > 0] / total
    return torch.exp(-(p * p.log()).sum()).item()


def intruder_dimensions(
    w_ft: torch.Tensor, w_base: torch.Tensor, k: int = INTRUDER_K, epsilon: float = INTRUDER_EPSILON
) -> int:
    """How many of W_ft's top-k left singular vectors have |cosine| < epsilon with every left
    singular vector of W_base: new high-ranking directions, which the paper finds in LoRA
    models and not in fully fine-tuned ones."""
    if w_ft.shape != w_base.shape:
        raise ValueError(f"intruder dimensions: shapes differ, {tuple(w_ft.shape)} vs {tuple(w_base.shape)}")
    return _intruders(w_ft, left_singular_vectors(w_base), k, epsilon)


def left_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(matrix.double(), full_matrices=False).U


def _intruders(w_ft: torch.Tensor, base_vectors: torch.Tensor, k: int, epsilon: float) -> int:
    top = left_singular_vectors(w_ft)[:, :k]
    return int(((top.T @ base_vectors).abs().amax(dim=1) < epsilon).sum())


def layer_index(name: str) -> int | None:
    """`...layer.3...` (BERT), `...layers.3...` (Llama), `...h.3...` (GPT-2); None outside blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def in_block(name: str) -> bool:
    """The default selection: matrices inside the transformer blocks, not the embeddings nor
    the pooler / classifier / score head, which is new or trained by both methods."""
    return layer_index(name) is not None


def _base_key(key: str, base_state: Mapping[str, torch.Tensor]) -> str | None:
    """The base state-dict key for `key`, equal or differing by a leading prefix (`bert.`,
    `model.`): a backbone checkpoint lacks the prefix its classifier wrapper adds."""
    if key in base_state:
        return key
    matches = [b for b in base_state if b.endswith("." + key) or key.endswith("." + b)]
    if len(matches) > 1:
        raise ValueError(f"{key}: several base weights match ({', '.join(matches)})")
    return matches[0] if matches else None


def lora_deltas(
    adapter_state: Mapping[str, torch.Tensor],
    base_state: Mapping[str, torch.Tensor],
    alpha: float,
    r: int,
    use_rslora: bool = False,
) -> Iterator[Delta]:
    """ΔW = scale · B A per adapted module, scale = alpha / r (alpha / √r with rsLoRA), from a
    PEFT state dict: as saved (`base_model.model.<module>.lora_A.weight`) or in memory
    (`...lora_A.default.weight`). Yields names of the base state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            if "lora_" in key:
                raise ValueError(
                    f"{key}: not a plain LoRA weight (DoRA, LoRA on embeddings and LoRA biases are not supported)"
                )
            continue  # modules_to_save (classifier, pooler) are not low-rank deltas
        module, matrix = match.groups()
        if matrix in modules.setdefault(module, {}):
            raise ValueError(f"{module}: the state dict holds several adapters; pass one")
        modules[module][matrix] = tensor
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{module}: lora_A or lora_B is missing from the adapter")
        if pair["A"].shape[0] != r:
            raise ValueError(
                f"{module}: lora_A has rank {pair['A'].shape[0]}, expected r={r} "
                "(per-module rank_pattern is not supported)"
            )
        key = _base_key(module + ".weight", base_state)
        if key is None:
            raise ValueError(f"{module}: no matching weight in the base model")
        base = base_state[key].double()
        delta = scale * (pair["B"].double() @ pair["A"].double())
        if delta.shape != base.shape:
            raise ValueError(f"{module}: B @ A has shape {tuple(delta.shape)}, base weight {tuple(base.shape)}")
        yield key.removesuffix(".weight"), base, delta


def full_deltas(
    ft_state: Mapping[str, torch.Tensor],
    base_state: Mapping[str, torch.Tensor],
    include: Callable[[str], bool] = in_block,
) -> Iterator[Delta]:
    """W_ft - W_base for every 2-D `.weight` present in both and selected by `include` (given
    the module name); names follow the base state dict."""
    found = False
    for name, tensor in ft_state.items():
        key = _base_key(name, base_state) if name.endswith(".weight") and tensor.dim() == 2 else None
        if key is None or not include(key.removesuffix(".weight")):
            continue
        base = base_state[key].double()
        if base.shape != tensor.shape:
            raise ValueError(f"{name}: fine-tuned shape {tuple(tensor.shape)}, base {tuple(base.shape)}")
        found = True
        yield key.removesuffix(".weight"), base, tensor.double() - base
    if not found:
        raise ValueError("no weight matrices in common between the fine-tuned and the base state dicts")


def merged_deltas(
    merged_state: Mapping[str, torch.Tensor],
    base_state: Mapping[str, torch.Tensor],
    include: Callable[[str], bool] = in_block,
) -> Iterator[Delta]:
    """W_merged - W_base for every selected matrix an adapter changed: any method PEFT can merge
    into the base (DoRA, IA3, LoHa, LoKr, VeRA, ...), with no algebra of its own. A matrix left
    exactly as it was is not one of the adapter's updates, as lora_deltas yields none for it."""
    for module, base, delta in full_deltas(merged_state, base_state, include):
        if torch.count_nonzero(delta):
            yield module, base, delta


def is_plain_lora(adapter_config: Mapping) -> bool:
    """A LoRA adapter whose update is exactly scale · B A on every module (lora_deltas): no
    DoRA magnitude, no per-module ranks or scales."""
    return (
        adapter_config.get("peft_type") == "LORA"
        and not adapter_config.get("use_dora")
        and not adapter_config.get("rank_pattern")
        and not adapter_config.get("alpha_pattern")
    )


def weight_change_rows(
    deltas: Iterable[Delta],
    k: int = INTRUDER_K,
    epsilon: float = INTRUDER_EPSILON,
    base_vectors: dict[str, torch.Tensor] | None = None,
) -> list[dict]:
    """One row per matrix: module, layer, kind (last name component), shape, relative update,
    effective rank of ΔW and intruder dimensions of W_base + ΔW. `base_vectors` caches each base
    matrix's singular vectors by module name; pass one dict for all runs of one base (a third
    of the SVDs otherwise)."""
    rows = []
    base_vectors = {} if base_vectors is None else base_vectors
    for module, base, delta in deltas:
        if module not in base_vectors:
            base_vectors[module] = left_singular_vectors(base)
        rows.append(
            {
                "module": module,
                "layer": layer_index(module),
                "kind": module.rsplit(".", 1)[-1],
                "rows": delta.shape[0],
                "cols": delta.shape[1],
                "relative_update": relative_update(delta, base),
                "effective_rank": effective_rank(delta),
                "intruder_dimensions": _intruders(base + delta, base_vectors[module], k, epsilon),
            }
        )
    return rows
