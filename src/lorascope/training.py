"""One training run (LoRA, full fine-tuning or head-only) with the Hugging Face Trainer:
length-grouped batches in an order fixed by the seed, dev-based early stopping and
best-checkpoint selection, divergence detection, and everything saved for later stages.

Generative tasks train through the same Trainer on prompt + completion sequences whose prompt
tokens are labelled -100 (generation.CompletionCollator), not through TRL's SFTTrainer: one
training path keeps the seed-fixed data order that pairs a LoRA run with its full fine-tuning
run, the in-memory dev selection, the head learning rate and the divergence stop identical for
both task kinds; SFTTrainer's completion-only loss is the same masking."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import pandas as pd
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from lorascope import artifacts, modeling, runtime
from lorascope.config import RuntimeConfig
from lorascope.errors import Diverged
from lorascope.evaluation import GENERATION_METRICS, evaluate_task, make_collator
from lorascope.footprint import PeakRss, rss, weights_bytes
from lorascope.generation import CompletionCollator
from lorascope.hparams import AdapterMethodConfig, MethodConfig
from lorascope.tasks import Task

# Method hyperparameter -> TrainingArguments field. Keys consumed by lorascope's own Trainer
# subclass and callbacks are in CALLBACK_KEYS; an adapter's keys reach PEFT (AdapterMethodConfig.peft_config).
TRAINER_KEYS = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "scheduler": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps",  # a float in [0, 1) is a ratio of the total steps
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "adam_beta2": "adam_beta2",
}
CALLBACK_KEYS = {"eval_every", "patience", "head_lr"}
PEFT_KEYS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "modules_to_save": "modules_to_save",
}


@dataclasses.dataclass
class RunSetup:
    """What one run needs besides its data: the model, the method and how to run it."""

    model_name: str
    task: Task
    method: str  # the method's name (methods.<name>), or head
    seed: int
    hp: MethodConfig
    runtime: RuntimeConfig
    eval_batch_size: int
    gradient_checkpointing: bool = False
    dropout: float | None = None
    max_steps: int = -1
    max_length: int | None = None  # where the prepared splits were truncated; the saved tokenizer truncates there
    save_weights: bool = True  # the overfit sanity check keeps only its metrics
    callbacks: list = dataclasses.field(default_factory=list)  # more TrainerCallbacks, after DevSelection
    hp_source: dict[str, str] | None = None  # key -> "tuned" | "config" when tune.enabled

    def is_adapter(self) -> bool:
        """A method that trains a PEFT adapter (saved as one), not the whole model or the head."""
        return isinstance(self.hp, AdapterMethodConfig)


def training_arguments(setup: RunSetup, device: torch.device, output_dir: str) -> TrainingArguments:
    hp = setup.hp
    cuda = device.type == "cuda"
    return TrainingArguments(  # bf16 on CPU: accelerate runs the forward under CPU autocast
        output_dir=output_dir,
        **{arg: getattr(hp, key) for key, arg in TRAINER_KEYS.items()},
        max_steps=setup.max_steps,
        seed=setup.seed,
        # fused AdamW on CPU too (torch >= 2.4): the default for-loop step over MiniLM's 22.7M
        # parameters took 5x the fused one's time, a large share of a full fine-tuning step
        optim="adamw_torch_fused",
        bf16=runtime.uses_bf16(setup.runtime, device),
        use_cpu=not cuda,
        activation_checkpointing=setup.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if setup.gradient_checkpointing else None,
        eval_strategy="no",  # dev evaluation goes through lorascope's single evaluation path
        save_strategy="no",  # the best state is kept in memory, see DevSelection
        logging_steps=10,
        logging_nan_inf_filter=False,  # a NaN must be seen, not filtered out
        report_to=setup.runtime.report_to,
        disable_tqdm=not setup.runtime.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


class LorascopeTrainer(Trainer):
    """Trainer whose data order depends on the seed alone (a LoRA run and a full run with the
    same seed see the same batches) and which stops at the first non-finite loss."""

    def __init__(self, *args, order_seed: int, head_lr: float | None = None, head_names=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.order_seed = order_seed
        self.head_lr, self.head_names = head_lr, tuple(head_names)
        self.order_digest = hashlib.sha256()
        self.tokens_seen = 0
        self.padded_tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            lengths=dataset["length"][:],  # a list: indexing a datasets Column per item took 0.1-0.4 s a run
            generator=torch.Generator().manual_seed(self.order_seed),
        )

    def create_optimizer(self, model=None):
        """The Trainer's AdamW groups, with the head's parameters moved to groups of their own
        at `head_lr`: a new head at a full-fine-tuning learning rate barely moves for hundreds
        of steps, and while it is small the backbone gets almost no gradient."""
        optimizer = super().create_optimizer(model)
        if self.head_lr is None or getattr(optimizer, "_lorascope_head_split", False):
            return optimizer
        model = self.model if model is None else model
        head = {id(p) for n, p in model.named_parameters() if set(n.split(".")) & set(self.head_names)}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in head]
            if len(moved) == len(group["params"]):
                group["lr"] = self.head_lr
            elif moved:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                settings = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group({**settings, "params": moved, "lr": self.head_lr})
        optimizer._lorascope_head_split = True
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.pop("example_id")
        self.order_digest.update(ids.cpu().numpy().tobytes())
        self.tokens_seen += int(inputs["attention_mask"].sum())
        self.padded_tokens_seen += inputs["attention_mask"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise Diverged(self.state.global_step + 1, float(loss))
        return loss


class RunProgress(ProgressCallback):
    """The Trainer's per-run progress bar (with ETA) without its log lines: losses go to
    history.csv, the terminal keeps to bars."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class DevSelection(TrainerCallback):
    """Evaluates on dev every `eval_every` steps (or each epoch), keeps the best trainable
    weights in memory, stops after `patience` evaluations without gain, and restores the best
    at the end. In memory because Trainer's own best-checkpoint logic writes full checkpoints
    with optimizer state to disk at every evaluation."""

    def __init__(self, score_dev, metric: str, eval_every: int, patience: int, lower_is_better: bool = False):
        self.score_dev, self.metric = score_dev, metric
        self.eval_every, self.patience = eval_every, patience
        self.sign = -1 if lower_is_better else 1
        self.best_value, self.best_step, self.best_state = self.sign * -math.inf, 0, None
        self.bad_evals, self.last_eval_step = 0, -1

    def on_step_end(self, args, state, control, model=None, **_):
        if self.eval_every and state.global_step % self.eval_every == 0:
            self._evaluate(state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **_):
        if not self.eval_every:
            self._evaluate(state, control, model)

    def on_train_end(self, args, state, control, model=None, **_):
        if self.last_eval_step != state.global_step:
            self._evaluate(state, control, model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if self.best_state and name in self.best_state:
                    param.copy_(self.best_state[name])

    def _evaluate(self, state, control, model):
        self.last_eval_step = state.global_step
        metrics = self.score_dev(model)
        state.log_history.append(
            {"step": state.global_step, "epoch": state.epoch, **{f"dev_{k}": v for k, v in metrics.items()}}
        )
        if self.sign * metrics[self.metric] > self.sign * self.best_value:
            self.best_value, self.best_step, self.bad_evals = metrics[self.metric], state.global_step, 0
            self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.bad_evals += 1
            if self.patience and self.bad_evals >= self.patience:
                control.should_training_stop = True


def train_run(setup: RunSetup, splits: dict[str, datasets.Dataset], tokenizer, out_dir: Path) -> dict:
    """Train on splits['train'], select on splits['dev'] when present, score splits['eval'],
    and write weights, metrics.json, history.csv, hparams.json and predictions.csv to out_dir.
    Returns the metrics dict (status ok or diverged)."""
    device = runtime.pick_device(setup.runtime)
    task, hp = setup.task, setup.hp
    model = modeling.load_model(setup.model_name, task.label_names, setup.seed, tokenizer.pad_token_id, setup.dropout)
    head_digest = modeling.tensor_digest(modeling.head_parameters(model))
    model = modeling.prepare_for_method(model, setup.method, hp, setup.seed).to(device)
    initial = modeling.save_initial_adapter(model, out_dir / "initial-adapter") if setup.save_weights else None
    trainable, total = modeling.count_parameters(model)

    def score(split, generate=True):
        return evaluate_task(
            model,
            split,
            task,
            tokenizer=tokenizer,
            batch_size=setup.eval_batch_size,
            device=device,
            bf16=runtime.uses_bf16(setup.runtime, device),
            generate=generate,
        )

    selection = None
    callbacks = []
    if splits.get("dev") is not None:
        dev_metric = "loss" if task.generative else task.metric  # generative dev: the completion loss
        selection = DevSelection(
            lambda m: score(splits["dev"], generate=False).metrics,
            dev_metric,
            hp.eval_every,
            hp.patience,
            lower_is_better=task.generative,
        )
        callbacks.append(selection)
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(setup, device, scratch)
        trainer = LorascopeTrainer(
            model=model,
            args=args,
            train_dataset=splits["train"],
            data_collator=CompletionCollator(tokenizer, device)
            if task.generative
            else make_collator(tokenizer, device),
            callbacks=callbacks + list(setup.callbacks),
            order_seed=setup.seed,
            head_lr=hp.head_lr,
            head_names=modeling.head_modules(model, getattr(hp, "modules_to_save", None)),
        )
        if setup.runtime.progress:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(RunProgress())
        else:  # no bars and no log lines either: losses are in history.csv
            trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        diverged = None
        with training_memory(device) as memory:
            try:
                with _older_objects_frozen():
                    trainer.train()
            except Diverged as err:
                diverged = err
        seconds = time.perf_counter() - started

    result = {
        "task": task.name,
        "method": setup.method,
        "seed": setup.seed,
        "status": "diverged" if diverged else "ok",
        "primary_metric": task.metric,
        "primary_value": None,
        "train_seconds": round(seconds, 3),
        "steps": trainer.state.global_step,
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(splits["train"]),
        "tokens_seen": trainer.tokens_seen,
        "padding_fraction": 1 - trainer.tokens_seen / max(trainer.padded_tokens_seen, 1),
        "head_init_digest": head_digest,
        "data_order_digest": trainer.order_digest.hexdigest()[:16],
        "device": device.type,
        "train_tokens_per_second": trainer.tokens_seen / seconds,
        **memory,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer) if trainer.optimizer is not None else None,
    }
    if selection is not None:
        result |= {"best_step": selection.best_step, f"dev_{selection.metric}": selection.best_value}
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(trainer.state.log_history).to_csv(out_dir / "history.csv", index=False)
    _write_json(out_dir / "hparams.json", _resolved_hparams(setup, trainer, model))
    if diverged:
        result |= {"diverged_step": diverged.step, "diverged_loss": str(diverged.loss)}
    elif "eval" in splits:  # tuning trials are given train and dev only
        evaluation = score(splits["eval"])
        result |= {f"eval_{k}": v for k, v in evaluation.metrics.items()}
        result |= {"accuracy": evaluation.metrics.get("accuracy"), "f1": evaluation.metrics["f1"]}
        if task.generative:  # SQuAD's exact match beside F1; accuracy stays empty
            result |= {k: evaluation.metrics[k] for k in GENERATION_METRICS.values()}
        result["primary_value"] = evaluation.metrics[task.metric]
        evaluation.predictions.to_csv(out_dir / "predictions.csv", index=False)
        if setup.save_weights:
            save_weights(model, setup, tokenizer, result, out_dir, initial)
            result["artifact_bytes"] = weights_bytes(str(out_dir))
    if initial is not None:
        shutil.rmtree(initial)
    _write_json(out_dir / "metrics.json", result)
    return result


@contextlib.contextmanager
def _older_objects_frozen():
    """Trainer.train() starts with accelerate's free_memory(), a full gc.collect() over every
    object the process holds (datasets, other runs): 0.28 s a run here, 7 % of a 40-step SST-2
    LoRA run. Objects that existed before training are left out of collections while it runs."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def save_weights(
    model: torch.nn.Module, setup: RunSetup, tokenizer, metrics: dict, out_dir: Path, initial: Path | None = None
) -> None:
    """Head-only: the head. An adapter method: the PEFT adapter (with the head), converted
    against its `initial` adapter when its initialisation rewrote the base; full: the whole
    model; both with what makes the folder a standalone artifact (lorascope.artifacts): the
    tokenizer, the base model named so that AutoPeft loads it on any machine, and a model card."""
    if setup.method == "head":
        head = {n: p.detach().cpu().contiguous() for n, p in modeling.head_parameters(model).items()}
        save_file(head, str(out_dir / "head.safetensors"))
        return
    adapter = setup.is_adapter()
    base = artifacts.run_base(setup.model_name, out_dir, adapter)
    saving = {}
    if adapter:
        peft = model.peft_config["default"]
        peft.base_model_name_or_path, peft.revision = base.name, base.revision
        # lorascope never resizes the vocabulary, so the base's embeddings stay out; PEFT's "auto"
        # would look the base up by that name (on the Hub, for a Hub id) to find that out
        saving["save_embedding_layers"] = False
        if initial is not None:
            saving["path_initial_model_for_weight_conversion"] = str(initial)
    model.save_pretrained(out_dir, safe_serialization=True, **saving)
    if initial is not None:
        _restore_modules_to_save(model, out_dir / "adapter_model.safetensors")
    artifacts.save_tokenizer(tokenizer, setup.max_length, out_dir)
    artifacts.write_card(
        out_dir,
        setup.model_name,
        base,
        setup.task,
        setup.method,
        setup.seed,
        metrics,
        tokenizer.pad_token_id,
        tied=bool(getattr(model.config, "tie_word_embeddings", False)),
        bf16=runtime.uses_bf16(setup.runtime, runtime.pick_device(setup.runtime)),
    )


def _restore_modules_to_save(model: torch.nn.Module, path: Path) -> None:
    """PEFT (0.22) leaves the modules_to_save (the head, BERT's pooler) out of an adapter it
    converts against its initial adapter; they are written back, as PEFT saves them otherwise."""
    saved = load_file(str(path))
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    missing = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in saved and "lora_" not in k}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})


@contextlib.contextmanager
def training_memory(device: torch.device):
    """Peak memory of the block, filled into the yielded dict on exit: the process's resident set
    at its peak and what training added to the set it started with; on CUDA, the allocator's
    peaks (allocated by tensors, reserved from the driver). None where there is no CUDA."""
    memory: dict = {}
    start = rss()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() as peak:
        yield memory
    memory |= {
        "peak_rss_bytes": peak.peak,
        "peak_rss_added_bytes": peak.peak - start,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (AdamW: two moments per trained
    weight and a step counter per tensor)."""
    return sum(
        v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def _resolved_hparams(setup: RunSetup, trainer: LorascopeTrainer, model) -> dict:
    """What actually ran: the configured values and the values the Trainer, its optimizer and
    PEFT hold."""
    args = trainer.args
    resolved = {
        "model": setup.model_name,
        "method": setup.method,
        "seed": setup.seed,
        "configured": setup.hp.model_dump(mode="json"),
        "trainer": {arg: getattr(args, arg) for arg in TRAINER_KEYS.values()}
        | {"max_steps": args.max_steps, "optim": getattr(args.optim, "value", args.optim), "bf16": args.bf16},
    }
    if trainer.optimizer is not None:
        groups = trainer.optimizer.param_groups
        resolved["optimizer_groups"] = [
            {
                "lr": g.get("initial_lr", g["lr"]),
                "weight_decay": g["weight_decay"],
                "params": sum(p.numel() for p in g["params"]),
            }
            for g in groups
        ]
    if setup.is_adapter():
        peft = model.peft_config["default"]
        fields = dict.fromkeys([*PEFT_KEYS.values(), *(setup.hp.model_extra or {})])
        resolved["peft"] = {arg: _plain(getattr(peft, arg)) for arg in fields if hasattr(peft, arg)}
    if setup.hp_source is not None:
        resolved["source"] = setup.hp_source
    return resolved


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
