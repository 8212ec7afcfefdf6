"""What makes a run folder a standalone Hugging Face artifact besides its weights: the tokenizer
as the run used it, the base model named so that it loads on another machine, and a model card
(README.md) that says what was trained, on which base, and how to load it.

Where the base model and the label names are recorded, and why. PEFT's
AutoPeftModelForSequenceClassification builds the base from adapter_config.json's
`base_model_name_or_path` at its `revision`, with the caller's keyword arguments, so the
classifier's config (num_labels, id2label) comes from that base and those arguments; nothing else
in the adapter folder is read (peft/auto.py). A config.json beside the adapter does not help:
transformers then takes the folder for a complete model and looks for its full weights there.

adapter_config.json names the base so that the adapter loads onto exactly the weights it was
trained on, without this machine's virtualenv or caches, and never silently onto others:

- a bundled alias whose folder is a bit-identical copy of a Hub revision (minilm-l6), or that
  Hub id: the Hub id and revision (bundled.HubCopy). lorascope resolves the id to its bundled
  copy; everything else to the Hub or a Hub cache, which hold the same bytes;
- a Hub id: itself, at the revision of the Hub cache's snapshot it was loaded from;
- a bundled alias with no Hub equivalent (smollm2-135m, dequantized from a GGUF file, is not the
  Hub's checkpoint): the study's own copy of it, written once beside the runs
  (`base/<alias>-<digest>/`) and named relative to the study folder; PEFT looks such a path up
  from the current directory, so the card's lines load the base from the run folder's path;
- a local folder the study named: its absolute path (the user's folder; the card gives the
  digest of its files, as the study's fingerprints identify it).

The card names the same base and says which it is and why. lorascope's own loader
(`modeling.load_run_model`) builds the base from the study's model.name and never reads the name
recorded here. The card's loading lines pass the task's label names, the one way they reach
AutoPeft. A full fine-tuning run's config.json already carries its label names."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from lorascope import modeling
from lorascope.bundled import MANIFEST, hub_copy, is_alias
from lorascope.study import current_dir, is_current
from lorascope.tasks import Task

CARD = "README.md"
BASES = "base"  # the study's copies of bases that no Hub id names, beside runs/
METHOD_NAMES = {"lora": "LoRA", "full": "full fine-tuning"}


@dataclasses.dataclass(frozen=True)
class Base:
    """The base as a run folder names it: `name` and `revision` as adapter_config.json records
    them, the card's sentence on which base it is, and for the study's own copy its path from
    the run folder (the card's loading lines start there)."""

    name: str
    revision: str | None
    about: str
    from_run: str | None = None


def run_base(model_name: str, run_dir: Path, adapter: bool) -> Base:
    """How the run in `run_dir` names its base (see the module docstring); an adapter run of an
    alias with no Hub equivalent writes the study's copy of the base first, if no run did before."""
    hub = hub_copy(model_name)
    if hub is not None:
        copy_of = f" (lorascope's bundled `{model_name}` is a bit-identical copy of it)" if is_alias(model_name) else ""
        return Base(
            hub.repo_id,
            hub.revision,
            f"`{hub.repo_id}` at revision `{hub.revision}`{copy_of}: lorascope resolves this Hub id to its "
            "bundled copy without the network, anything else to the Hub or a Hub cache. The SHA-256 of its "
            "weights and tokenizer files equal the Hub's at that revision.",
        )
    folder = Path(modeling.resolve_model_path(model_name))
    if is_alias(model_name) and adapter:
        return study_base(model_name, folder, run_dir)
    if is_alias(model_name):
        return Base(
            model_name,
            None,
            f"lorascope's bundled alias `{model_name}`, {provenance(folder)}; "
            f"`lorascope.modeling.resolve_model_path({model_name!r})` gives its folder wherever its package is installed.",
        )
    if folder.is_dir():
        path = str(folder.resolve())
        return Base(path, None, f"the local folder `{path}` (its files' digest: `{modeling.folder_digest(path)}`).")
    revision = hub_revision(model_name)
    at = f" at revision `{revision}`" if revision else ""
    return Base(model_name, revision, f"`{model_name}`{at}, from the Hub.")


def hub_revision(repo_id: str) -> str | None:
    """The commit of the Hub cache's snapshot a Hub id was loaded from (its refs/main, which
    a download updates), or None when the cache has none."""
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def provenance(folder: Path) -> str:
    """Where a bundled folder's weights come from: the GGUF file it was converted from (its
    manifest, bundled.MANIFEST), or the package folder it is."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except OSError:
        return "its package's model folder, which is no verified copy of a Hub revision"
    return (
        f"dequantized to fp32 from `{manifest['gguf']}` of {manifest['source']} "
        f"(the GGUF file's SHA-256: `{manifest['gguf_sha256']}`)"
    )


def study_folder(run_dir: Path) -> Path:
    """The study a run folder belongs to: the folder holding its runs/ (Study.run_dir's layout;
    the scratch folder a run is written in sits at the same place), else, for a run trained
    outside a study, the run folder's parent."""
    return next((p.parent for p in run_dir.parents if p.name == "runs"), run_dir.parent)


def study_base(alias: str, source: Path, run_dir: Path) -> Base:
    """The study's copy of a bundled base that no Hub id names, written once (atomically and
    stamped, so reuse and `lorascope verify` check it like every output) by the first LoRA run
    that needs it; named by the digest of its files, so runs trained on other bytes (another
    package version) keep pointing at their own. Concurrent runs take turns through a lock."""
    digest = modeling.folder_digest(str(source))
    name = f"{BASES}/{alias}-{digest.removeprefix('sha256:')[:12]}"
    target = study_folder(run_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(f".{target.name}.lock")):
        if not is_current(target, digest):
            with current_dir(target, digest) as scratch:
                shutil.copytree(source, scratch, dirs_exist_ok=True)
    return Base(
        name,
        None,
        f"`{name}` in the study folder, the study's copy of lorascope's bundled alias `{alias}`: "
        f"{provenance(source)}. It is no Hub checkpoint: quantization changed the original's weights, so the "
        "original would be another base for this adapter. The first run that needed it wrote it once beside "
        "`runs/` as a standard model folder. adapter_config.json names it relative to the study folder, and "
        "PEFT looks it up from the current directory: from the study folder, "
        "`AutoPeftModelForSequenceClassification.from_pretrained('runs/<task>/lora/seed<k>', ...)` loads it "
        "as is; from anywhere, the lines below load it from the run folder's path.",
        os.path.relpath(target, run_dir),
    )


def save_tokenizer(tokenizer, max_length: int | None, out_dir: Path) -> None:
    """The run's tokenizer with its pad token and padding side (decoders: eos, right), truncating
    where the run truncated: pipelines truncate at `model_max_length`."""
    saved = copy.copy(tokenizer)  # the study's runs share one tokenizer; it stays as it is
    if max_length is not None:
        saved.model_max_length = max_length
    saved.save_pretrained(out_dir)


def loading_lines(adapter: bool, task: Task, pad_token_id: int, base: Base, bf16: bool = False) -> str:
    """Python that loads the folder `run_dir` with the task's label names and the run's pad token
    (the base's config may have none, and a decoder's classifier finds its last token by it);
    an adapter on the study's copy of its base loads that copy from the run folder's path."""
    if task.generative:
        return generation_lines(adapter, task, base, bf16)
    if not adapter:
        return (
            "from transformers import pipeline\n"
            'classifier = pipeline("text-classification", model=run_dir)\n'
            'classifier(["an example text"], truncation=True)'
        )
    id2label = dict(enumerate(task.label_names))
    label2id = {name: i for i, name in id2label.items()}
    labels = f"id2label={id2label}, label2id={label2id}, pad_token_id={pad_token_id}"
    tokenizer = "tokenizer = AutoTokenizer.from_pretrained(run_dir)"
    if base.from_run is not None:
        return (
            "from pathlib import Path\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            f"base = AutoModelForSequenceClassification.from_pretrained(Path(run_dir, {base.from_run!r}), {labels})\n"
            f"model = PeftModel.from_pretrained(base, run_dir)\n{tokenizer}"
        )
    return (
        "from peft import AutoPeftModelForSequenceClassification\nfrom transformers import AutoTokenizer\n"
        f"model = AutoPeftModelForSequenceClassification.from_pretrained(run_dir, {labels})\n{tokenizer}"
    )


def generation_lines(adapter: bool, task: Task, base: Base, bf16: bool) -> str:
    """Python that loads a generative run's folder and answers one prompt as lorascope evaluated
    it: greedy, at most the task's max_new_tokens, the first line of what is generated, under
    bf16 autocast when the run was evaluated so (batched generation pads prompts, so a near-tie
    between two tokens can still fall the other way in bf16; in fp32 the answers are the same)."""
    prompt = (
        "prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': text}], tokenize=False, "
        "add_generation_prompt=True)"
        if task.chat_template
        else "prompt = text"
    )
    answer = (
        "inputs = tokenizer(prompt, return_tensors='pt', add_special_tokens="
        f"{not task.chat_template})\n"
        + (
            "with torch.autocast(model.device.type, dtype=torch.bfloat16):  # as the run was evaluated\n    "
            if bf16
            else ""
        )
        + f"out = model.generate(**inputs, max_new_tokens={task.max_new_tokens}, do_sample=False)\n"
        "answer = tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)"
        ".split('\\n')[0].strip()"
    )
    if not adapter:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(run_dir)\n"
        )
    elif base.from_run is not None:
        load = (
            "from pathlib import Path\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(Path(run_dir, {base.from_run!r})), run_dir)\n"
        )
    else:
        load = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(run_dir)\n"
        )
    text = "text = '...'  # the prompt, built as the card says\n"
    imports = "import torch\n" if bf16 else ""
    return f"{imports}{load}tokenizer = AutoTokenizer.from_pretrained(run_dir)\n{text}{prompt}\n{answer}"


def generation_notes(task: Task, adapter: bool, tied: bool) -> str:
    """The card's paragraph on the prompt a generative run expects and what it learned."""
    template = task.template.replace("{unanswerable}", task.unanswerable or "{unanswerable}") if task.template else None
    built = f"`{template!r}` (an example's columns in braces)" if template else f"the `{task.prompt}` column"
    notes = (
        f"Prompt: {built}"
        + (", as a user turn of the tokenizer's chat template" if task.chat_template else "")
        + ". The run learned the completion after it (the loss on completion tokens only) and ends it with eos."
    )
    if task.unanswerable:
        notes += f" A question without answer has the completion `{task.unanswerable}`, scored as the empty answer."
    if not adapter and tied:
        notes += " The input embeddings and the LM head are one tied matrix, so full fine-tuning moved both."
    if adapter:
        notes += " The LM head is the base's: the method trained the adapter only."
    return notes


def write_card(
    out_dir: Path,
    model_name: str,
    base: Base,
    task: Task,
    method: str,
    seed: int,
    metrics: dict,
    pad_token_id: int,
    tied: bool = False,
    bf16: bool = False,
) -> None:
    """README.md: task, method, seed, which base and why, eval metrics and the loading lines.
    Its `base_model` is the name adapter_config.json records, but for the study's own copy,
    which no Hub id names. An adapter run's folder already holds its adapter_config.json."""
    adapter = modeling.is_adapter(out_dir)
    type_name = f"a PEFT {modeling.adapter_type(out_dir)} adapter" if adapter else "full fine-tuning"
    data = ModelCardData(
        base_model=base.name if base.from_run is None else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation" if task.generative else "text-classification",
        tags=["lorascope", method, task.name],
    )
    scores = "\n".join(
        f"| {key[5:]} | {value:.4f} |"
        for key, value in metrics.items()
        if key.startswith("eval_") and isinstance(value, float)
    )
    lines = loading_lines(adapter, task, pad_token_id, base, bf16)
    about_task = "generative" if task.generative else f"labels: {', '.join(task.label_names)}"
    notes = f"{generation_notes(task, adapter, tied and task.generative)}\n\n" if task.generative else ""
    name = METHOD_NAMES.get(method, f"method `{method}` ({type_name})")
    body = (
        f"# {task.name}: {name} of {model_name}, seed {seed}\n\n"
        f"Trained by lorascope on task `{task.name}` ({about_task}) with "
        f"{name}, seed {seed}, from the model the study named `{model_name}`.\n\n"
        f"Base model: {base.about}\n\n{notes}"
        f"Scores on the eval split (the task's `{task.eval_split}` split; never used for selection):\n\n"
        f"| metric | value |\n|---|---|\n{scores}\n\n"
        f"## Loading\n\nWith `run_dir` the path of this folder:\n\n```python\n{lines}\n```\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(out_dir / CARD)
