"""The one model loader (bundled aliases, Hub ids, folders; base, fully fine-tuned, adapters;
a sequence classifier for a classification task, the causal LM itself for a generative one:
`label_names` None), the tokenizer policy, LoRA / head-only wrapping, and the models' identity
for fingerprints.

Weights always load in fp32 (runtime.py holds the autocast policy)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lorascope.bundled import file_sha256, is_bundled, resolve_bundled
from lorascope.errors import InputError
from lorascope.hparams import AdapterMethodConfig

DEFAULT_LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
}
# Pretrained modules between the backbone and the new classifier that belong to the head: BERT
# reads its CLS token through the (NSP-trained) pooler, which RoBERTa-style models keep inside
# `classifier`. Trained with the head by LoRA and by the head-only probe, like RoBERTa's.
EXTRA_HEAD_MODULES = {"bert": ["pooler"]}
DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "attention_probs_dropout",
    "classifier_dropout",
)


def resolve_model_path(name: str) -> str:
    """A bundled alias resolves to its package folder, and so does the Hub id that folder is a
    bit-identical copy of (bundled.HubCopy: a run folder names its base so, and loading it here
    needs no network); a local path must exist; anything else is taken as a Hub id."""
    if (folder := resolve_bundled(name)) is not None:
        return folder
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model.name: no model found at {name} (expected a folder with config.json)")
        return str(path)
    return name


def load_tokenizer(name: str):
    """Decoders without a pad token pad with eos on the right, so the head reads the last real
    token (sequence classifiers locate it through pad_token_id)."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"model.name: cannot load tokenizer of '{name}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"model.name: tokenizer of '{name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_identity(name: str) -> str:
    """What fingerprints hold for a model: a bundled alias or a Hub id as named; a local folder
    by the content of its files, so moving or copying it invalidates nothing."""
    path = Path(resolve_model_path(name))
    if is_bundled(name) or not path.is_dir():
        return name
    return folder_digest(str(path.resolve()))


def folder_digest(folder: str) -> str:
    """The content of a model folder's files (not its subfolders), named by none of its paths."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    return "sha256:" + hashlib.sha256("".join(f"{p.name}:{file_sha256(p)};" for p in files).encode()).hexdigest()[:16]


def check_context(name: str, max_length: int) -> None:
    """A generative task's sequences must fit the model's positions (a prompt past them is an input error)."""
    context = getattr(AutoConfig.from_pretrained(resolve_model_path(name)), "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise InputError(f"model.max_length {max_length} is longer than the context of '{name}' ({context} tokens)")


def load_model(
    name: str, label_names: Sequence[str] | None, seed: int, pad_token_id: int, dropout: float | None = None
) -> torch.nn.Module:
    """fp32 classifier whose head is initialised from `seed` alone, so a LoRA run and a full
    fine-tuning run with the same seed start from the identical head; with `label_names` None,
    the causal LM with its own (pretrained, possibly tied) LM head. `dropout` replaces every
    hidden / attention dropout rate the architecture's config has."""
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        overrides = {k: dropout for k in DROPOUT_KEYS if dropout is not None and getattr(config, k, None) is not None}
        if label_names is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides)
            model.config.pad_token_id = pad_token_id
            model.generation_config.pad_token_id = pad_token_id
            return model.eval()
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            dtype=torch.float32,
            **overrides,
        )
    except (OSError, ValueError) as err:
        raise InputError(f"model.name: cannot load '{name}': {str(err).splitlines()[0]}") from None
    model.config.pad_token_id = pad_token_id
    _init_head(model, seed)
    return model.eval()


def load_full(path: str, pad_token_id: int, causal: bool = False) -> torch.nn.Module:
    """A fully fine-tuned classifier (or causal LM) (folder or Hub id) in eval mode, fp32."""
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(str(path), dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model.eval()


def load_adapter(base: torch.nn.Module, path: str, **kwargs) -> PeftModel:
    """A PEFT adapter (with its trained head) on `base`, unmerged, in eval mode."""
    return PeftModel.from_pretrained(base, str(path), **kwargs).eval()


def load_run_model(run_dir: Path, name: str, label_names: Sequence[str] | None, pad_token_id: int) -> torch.nn.Module:
    """A trained run in eval mode: the saved full model, or the base with the run's adapter
    merged into its weights (`merge_and_unload` returns the model to use); an adapter PEFT
    cannot merge (prompt learning) stays unmerged."""
    if not is_adapter(run_dir):
        return load_full(str(run_dir), pad_token_id, causal=label_names is None)
    base = load_model(name, label_names, seed=0, pad_token_id=pad_token_id)  # head comes from the adapter
    adapter = load_adapter(base, run_dir)
    return adapter.merge_and_unload().eval() if hasattr(adapter, "merge_and_unload") else adapter


def adapter_type(path: str) -> str:
    """The PEFT type of an adapter (folder or Hub id), lower case: lora, ia3, ..."""
    return str(PeftConfig.from_pretrained(str(path)).peft_type.value).lower()


def is_adapter(run_dir: Path) -> bool:
    """A run folder that holds a PEFT adapter (any method but full fine-tuning)."""
    return (Path(run_dir) / "adapter_config.json").is_file()


def _init_head(model: torch.nn.Module, seed: int) -> None:
    # from_pretrained draws the missing head from the global RNG, whose state depends on
    # everything that ran before; a private generator makes the head a function of the seed.
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, param in sorted(head_parameters(model).items()):
            if name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The new classifier layer (PEFT's names for sequence-classification heads)."""
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] in SEQ_CLS_HEAD_NAMES}


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A model for a generative task (no classification head)."""
    return type(model).__name__.endswith("ForCausalLM")


def head_modules(model: torch.nn.Module, configured: list[str] | None = None) -> list[str]:
    """Modules trained besides the adapter: the classifier plus the architecture's pooler; none
    for a causal LM (its LM head is pretrained; LoRA leaves it, full fine-tuning trains it)."""
    if is_causal_lm(model):
        return list(configured or [])
    extra = configured if configured is not None else EXTRA_HEAD_MODULES.get(model.config.model_type, [])
    return list(SEQ_CLS_HEAD_NAMES) + list(extra)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_targets(model: torch.nn.Module, method: str, hp: AdapterMethodConfig) -> list[str] | None:
    """The modules an adapter wraps: the configured ones; for LoRA and its variants the
    attention projections (the reference study's choice); for another PEFT type, None: PEFT's
    own per-architecture default."""
    if hp.target_modules:
        return hp.target_modules
    if hp.type != "lora":
        return None
    model_type = model.config.model_type
    if model_type not in DEFAULT_LORA_TARGETS:
        raise InputError(
            f"training.{method}.target_modules: no default for model type '{model_type}'; "
            "name the attention projections to adapt"
        )
    return DEFAULT_LORA_TARGETS[model_type]


def prepare_for_method(model: torch.nn.Module, method: str, hp, seed: int = 0) -> torch.nn.Module:
    """An adapter method: its PEFT adapter, head trained and saved with it; `head`: backbone
    frozen (the linear-probe baseline); full fine-tuning: everything trains."""
    if isinstance(hp, AdapterMethodConfig):
        config = hp.peft_config(
            adapter_targets(model, method, hp), head_modules(model, hp.modules_to_save), is_causal_lm(model)
        )
        try:
            # PEFT draws its initial weights (LoRA's A) from the global RNG: seed it here, in a
            # forked RNG, so the adapter's start is a function of the seed alone, not of what the
            # process ran before (`lorascope run` and `lorascope train` gave the same seed different adapters).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return get_peft_model(model, config)
        except ValueError as err:  # PEFT names the target modules it could not find
            raise InputError(f"training.{method}: {str(err).splitlines()[0]}") from None
    if method == "head":
        head = tuple(head_modules(model))
        for name, param in model.named_parameters():
            param.requires_grad_(any(part in head for part in name.split(".")))
    return model


# LoRA initialisations that rewrite the base's weights (the model keeps W - the initial update):
# the trained adapter applies to the original base only once PEFT subtracts the initial adapter
# from it at save time, which makes it a plain LoRA adapter of twice the rank (PEFT's docs).
INITS_REWRITING_THE_BASE = ("pissa", "olora", "corda")


def save_initial_adapter(model: torch.nn.Module, folder: Path) -> Path | None:
    """The adapter as initialised, saved to `folder`, when its initialisation rewrote the base's
    weights (see INITS_REWRITING_THE_BASE); else None and nothing is written."""
    init = getattr(getattr(model, "peft_config", {}).get("default"), "init_lora_weights", True)
    if not (isinstance(init, str) and init.lower().startswith(INITS_REWRITING_THE_BASE)):
        return None
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    return folder


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
