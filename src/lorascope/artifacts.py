"""What makes a run folder a standalone Hugging Face artifact besides its weights: the tokenizer
as the run used it, the base model named where it can be found, and a model card (README.md)
that says what was trained and how to load it.

Where the base model and the label names are recorded, and why. PEFT's
AutoPeftModelForSequenceClassification builds the base from adapter_config.json's
`base_model_name_or_path` with the caller's keyword arguments, so the classifier's config
(num_labels, id2label) comes from that base and those arguments; nothing else in the adapter
folder is read (peft/auto.py). A config.json beside the adapter does not help: transformers then
takes the folder for a complete model and looks for its full weights there. Hence:

- adapter_config.json names the base as AutoPeft can load it on this machine: an absolute folder
  (a bundled alias resolved, or a local folder) or a Hub id;
- the card's `base_model` names it as the study did when it is a bundled alias (`minilm-l6`),
  which `modeling.resolve_model_path` resolves on any machine with the package; lorascope's own
  loader (`modeling.load_run_model`) builds the base from that name and never reads the path;
- the card's loading lines pass the task's label names, the one way they reach AutoPeft.
A full fine-tuning run's config.json already carries its label names."""

from __future__ import annotations

import copy
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from lorascope import modeling
from lorascope.bundled import is_bundled
from lorascope.tasks import Task

CARD = "README.md"
METHOD_NAMES = {"lora": "LoRA", "full": "full fine-tuning"}


def base_model_location(name: str) -> str:
    """The base as transformers loads it here: a folder as an absolute path, a Hub id as it is."""
    path = Path(modeling.resolve_model_path(name))
    return str(path.resolve()) if path.is_dir() else name


def card_base_model(name: str) -> str:
    """The base as the card names it: a bundled alias (resolvable wherever the package is
    installed), else where it was loaded from."""
    return name if is_bundled(name) else base_model_location(name)


def save_tokenizer(tokenizer, max_length: int | None, out_dir: Path) -> None:
    """The run's tokenizer with its pad token and padding side (decoders: eos, right), truncating
    where the run truncated: pipelines truncate at `model_max_length`."""
    saved = copy.copy(tokenizer)  # the study's runs share one tokenizer; it stays as it is
    if max_length is not None:
        saved.model_max_length = max_length
    saved.save_pretrained(out_dir)


def loading_lines(method: str, task: Task, pad_token_id: int) -> str:
    """Python that loads the folder `run_dir` with the task's label names and the run's pad token
    (the base's config may have none, and a decoder's classifier finds its last token by it)."""
    if method == "full":
        return (
            "from transformers import pipeline\n"
            'classifier = pipeline("text-classification", model=run_dir)\n'
            'classifier(["an example text"], truncation=True)'
        )
    id2label = dict(enumerate(task.label_names))
    label2id = {name: i for i, name in id2label.items()}
    return (
        "from peft import AutoPeftModelForSequenceClassification\nfrom transformers import AutoTokenizer\n"
        f"model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir, id2label={id2label}, "
        f"label2id={label2id}, pad_token_id={pad_token_id})\n"
        "tokenizer = AutoTokenizer.from_pretrained(run_dir)"
    )


def write_card(
    out_dir: Path, model_name: str, task: Task, method: str, seed: int, metrics: dict, pad_token_id: int
) -> None:
    """README.md: task, method, seed, base model, eval metrics and the loading lines."""
    base = card_base_model(model_name)
    data = ModelCardData(
        base_model=base,
        library_name="peft" if method == "lora" else "transformers",
        pipeline_tag="text-classification",
        tags=["lorascope", method, task.name],
    )
    where = (
        f" (lorascope's bundled alias: `lorascope.modeling.resolve_model_path({base!r})` gives its folder "
        "wherever its package is installed)"
        if is_bundled(base)
        else ""
    )
    scores = "\n".join(
        f"| {key[5:]} | {value:.4f} |"
        for key, value in metrics.items()
        if key.startswith("eval_") and isinstance(value, float)
    )
    body = (
        f"# {task.name}: {METHOD_NAMES[method]} of {base}, seed {seed}\n\n"
        f"Trained by lorascope on task `{task.name}` (labels: {', '.join(task.label_names)}) with "
        f"{METHOD_NAMES[method]}, seed {seed}, from the base model `{base}`{where}.\n\n"
        f"Scores on the eval split (the task's `{task.eval_split}` split; never used for selection):\n\n"
        f"| metric | value |\n|---|---|\n{scores}\n\n"
        f"## Loading\n\nWith `run_dir` the path of this folder:\n\n```python\n{loading_lines(method, task, pad_token_id)}\n```\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(out_dir / CARD)
