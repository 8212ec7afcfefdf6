"""Generative tasks: the completion-only loss, batched generation, the SQuAD v2 study through
every stage on a tiny causal LM, its run folders as standard artifacts, resume after a kill,
and the bad inputs refused before anything runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import datasets
import pandas as pd
import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, pipeline

from conftest import killed_after, needs_decoder
from lorascope import modeling
from lorascope.cli import main
from lorascope.config_io import load_config, to_yaml, validate
from lorascope.errors import InputError
from lorascope.evaluation import score_answers
from lorascope.generation import CompletionCollator, generate_answers
from lorascope.stages import BY_NAME, STAGES
from lorascope.study import Study, run_stages
from lorascope.tasks import Task, load_raw, make_splits, prompts_only, resolve_task, tokenize_completions

pytestmark = needs_decoder
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_causal_dir(smollm2_dir, tmp_path_factory):
    """A two-block Llama causal LM with tied embeddings and SmolLM2's tokenizer (chat template,
    eos = pad = <|im_end|>): random weights, milliseconds a step."""
    folder = tmp_path_factory.mktemp("tiny-causal")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _task(**changes) -> Task:
    fields = dict(name="qa", source="x", subset=None, kind="generate", metric="f1", prompt="prompt")
    fields["completion"] = "completion"
    fields["max_new_tokens"] = 8
    return Task(**(fields | changes))


def _splits(prompts, completions) -> datasets.DatasetDict:
    rows = {
        "prompt": prompts,
        "completion": completions,
        "answers": [{"text": [c]} for c in completions],
        "id": [str(i) for i in range(len(prompts))],
        "example_id": list(range(len(prompts))),
    }
    return datasets.DatasetDict(train=datasets.Dataset.from_dict(rows))


PROMPTS = ["Question: where is Paris?\nAnswer:", "Q: 2+2?\nA:", "Name the capital of Italy, please.\nAnswer:"]
ANSWERS = ["France", "4", "Rome, the eternal city"]


def test_prompt_tokens_carry_no_loss(tiny_causal_dir):
    tokenizer = modeling.load_tokenizer(str(tiny_causal_dir))
    task, splits, left_out = tokenize_completions(_task(), _splits(PROMPTS, ANSWERS), tokenizer, 64)
    train = splits["train"]
    assert left_out == {"train": 0}
    for example, prompt, answer in zip(train, PROMPTS, ANSWERS):
        n = example["prompt_length"]
        assert example["input_ids"][:n] == tokenizer(prompt)["input_ids"]
        assert example["labels"][:n] == [-100] * n
        completion = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["labels"][n:] == example["input_ids"][n:] == completion
    assert task.max_new_tokens == max(len(e["input_ids"]) - e["prompt_length"] for e in train)

    batch = CompletionCollator(tokenizer, CPU)(train.to_list())
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding carries no loss either
    model = modeling.load_model(str(tiny_causal_dir), None, 0, tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss = model(**inputs).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][scored], targets[scored])
    assert scored.sum() == sum(len(e["input_ids"]) - e["prompt_length"] for e in train)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_chat_template_wraps_the_prompt_and_the_completion_ends_the_turn(tiny_causal_dir):
    tokenizer = modeling.load_tokenizer(str(tiny_causal_dir))
    _, splits, _ = tokenize_completions(_task(chat_template=True), _splits(PROMPTS, ANSWERS), tokenizer, 128)
    example = splits["train"][0]
    prompt = tokenizer.decode(example["input_ids"][: example["prompt_length"]])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert PROMPTS[0] in prompt
    assert tokenizer.decode(example["input_ids"][example["prompt_length"] :]) == "France<|im_end|>"


def test_left_padded_batches_generate_what_one_at_a_time_generates(tiny_causal_dir):
    tokenizer = modeling.load_tokenizer(str(tiny_causal_dir))
    prompts = [p * k for k in (1, 3, 2) for p in PROMPTS]  # lengths differ: batches need padding
    _, splits, _ = tokenize_completions(_task(), _splits(prompts, ANSWERS * 3), tokenizer, 256)
    model = modeling.load_model(str(tiny_causal_dir), None, 0, tokenizer.pad_token_id)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=12, device=CPU, bf16=False)
    batched, batched_tokens = generate_answers(model, splits["train"], batch_size=len(prompts), **kwargs)
    single, single_tokens = generate_answers(model, splits["train"], batch_size=1, **kwargs)
    assert batched == single and batched_tokens == single_tokens
    assert any(batched)  # the random model says something


def test_the_unanswerable_string_scores_as_the_empty_answer():
    split = datasets.Dataset.from_dict(
        {"id": ["a", "b", "c"], "example_id": [0, 1, 2], "answers": [{"text": []}, {"text": ["Rome"]}, {"text": []}]}
    )
    task = _task(unanswerable="unanswerable")
    evaluation = score_answers(task, split, ["Unanswerable.", "rome", "Paris"])
    assert evaluation.predictions["prediction"].tolist() == ["", "rome", "Paris"]
    assert evaluation.predictions["exact"].tolist() == [1, 1, 0]
    metrics = evaluation.metrics
    assert (metrics["exact"], metrics["has_ans_exact"], metrics["no_ans_exact"]) == pytest.approx((2 / 3, 1, 0.5))


@pytest.fixture(scope="module")
def qa_config(tiny_causal_dir, squad_sample):
    return load_config(
        None,
        "smoke",
        [
            f"model.name={tiny_causal_dir}",
            f"data.squad_v2={squad_sample}",
            "model.max_length=320",
            "tasks={squad_v2: {train_max: 16, eval_max: 12, dev_max: 8}, sst2: {train_max: 16, eval_max: 12}}",
            "data.probe_size=12",
            "baselines.overfit_steps=2",
            "baselines.overfit_examples=4",
            "training.lora.lr=1e-2",
            "training.lora.target_modules=[q_proj, v_proj]",
            "training.full.lr=1e-3",
            "training.eval_batch_size=4",
            "forget.lm_documents=6",
            "deploy.strategies=[full, merged, separate, multi]",
            "deploy.grid={batch_sizes: [1, 2], seq_lens: [natural], concurrency: [1, 2], warmup: 1, repeats: 4, "
            "requests: 4, output_tokens: 4}",
            "deploy.checks.examples=6",
            "deploy.bootstrap=50",
            "runtime.progress=false",
            "runtime.workers=1",
            "runtime.bf16=false",
        ],
    )


@pytest.fixture(scope="module")
def qa_study(qa_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("qa-study")
    run_stages(qa_config, root, list(STAGES))
    return Study(root)


def test_a_study_mixing_squad_and_sst2_goes_through_every_stage(qa_study):
    tables = qa_study.tables
    performance = pd.read_csv(tables / "performance.csv")
    assert (performance["status"] == "ok").all() and len(performance) == 4
    squad = performance[performance["task"] == "squad_v2"].set_index("method")
    assert (squad["primary_metric"] == "f1").all() and squad["accuracy"].isna().all()
    for method in ("lora", "full"):
        predictions = pd.read_csv(qa_study.run_dir("squad_v2", method, 42) / "predictions.csv", keep_default_na=False)
        assert len(predictions) == 12
        assert squad.loc[method, "f1"] == pytest.approx(predictions["f1"].mean())
        assert squad.loc[method, "exact"] == pytest.approx(predictions["exact"].mean())
    baselines = pd.read_csv(tables / "baselines.csv")
    assert baselines.loc[baselines["task"] == "squad_v2", "baseline"].tolist() == [
        "always_unanswerable",
        "zero_shot",
        "overfit_lora",
        "overfit_full",
    ]
    assert baselines.loc[baselines["task"] == "sst2", "baseline"].tolist()[:2] == ["majority", "head_only"]
    squad_baselines = baselines[baselines["task"] == "squad_v2"].set_index("baseline")
    eval_split = qa_study.root / "prepared" / "squad_v2" / "splits" / "eval"
    no_answer = [not a["text"] for a in datasets.load_from_disk(str(eval_split))["answers"]]
    assert squad_baselines.loc["always_unanswerable", "exact"] == pytest.approx(sum(no_answer) / len(no_answer))
    drift = pd.read_csv(tables / "drift_layers.csv")
    assert {"mean", "head"} <= set(drift["pooling"]) and set(drift["task"]) == {"squad_v2", "sst2"}
    # deploy: sst2's classifier in deployment.csv, squad_v2's generation in deployment_generation.csv
    assert set(pd.read_csv(tables / "deployment.csv")["strategy"]) == {"full", "merged", "separate", "multi"}
    serving = pd.read_csv(tables / "deployment_generation.csv").fillna({"note": ""})
    timed = serving[serving["status"] == "ok"]
    assert set(timed["strategy"]) == {"full", "merged", "separate"} and (timed["output_tokens"] == 4).all()
    assert set(zip(timed["concurrency"], timed["prompts"])) == {(1, 1), (1, 2), (2, 1)}
    assert set(serving.loc[serving["strategy"] == "multi", "note"]) == {"needs 2 or more adapters, 1 given"}
    assert pd.read_csv(tables / "deployment_generation_checks.csv")["passed"].all()
    assert "Generation serving" in (qa_study.root / "report.md").read_text()
    probes = pd.read_csv(tables / "forgetting.csv")
    assert set(probes["probe_task"]) == {"sst2"}  # only a classification task can be probed
    assert set(probes["task"].dropna()) == {"squad_v2", "sst2"}
    lm = pd.read_csv(tables / "lm_forgetting.csv")
    heads = lm.groupby("task")["objective"].agg(set)
    assert heads["squad_v2"] == {"causal", "causal, the run's own LM head"} and heads["sst2"] == {"causal"}
    lora = lm[(lm["task"] == "squad_v2") & (lm["method"] == "lora")]
    assert lora["run_loss"].nunique() == 1  # LoRA leaves the LM head alone: both heads score the same
    assert set(pd.read_csv(tables / "weights.csv")["task"]) == {"squad_v2", "sst2"}
    report = (qa_study.root / "report.md").read_text()
    assert "## Question answering" in report and "zero-shot base" in report


def test_run_folders_reproduce_their_predictions_with_transformers_and_peft_alone(qa_study):
    split = prompts_only(datasets.load_from_disk(str(qa_study.root / "prepared" / "squad_v2" / "splits" / "eval")))
    meta = json.loads((qa_study.root / "prepared" / "squad_v2" / "meta.json").read_text())
    max_new = meta["task"]["max_new_tokens"]
    for method in ("full", "lora"):
        folder = qa_study.run_dir("squad_v2", method, 42)
        expected = pd.read_csv(folder / "predictions.csv", keep_default_na=False)["generated"].tolist()
        card = (folder / "README.md").read_text()
        assert "Context: {context}" in card and "max_new_tokens" in card
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if method == "full":
            generator = pipeline("text-generation", model=str(folder), tokenizer=tokenizer)
            outputs = [
                generator(p, max_new_tokens=max_new, do_sample=False, return_full_text=False)[0]["generated_text"]
                for p in split["prompt"]
            ]
        else:
            model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
            outputs = []
            for prompt in split["prompt"]:
                inputs = tokenizer(prompt, return_tensors="pt")
                out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
                outputs.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        assert [o.split("\n")[0].strip() for o in outputs] == expected, method


def test_a_generative_study_killed_mid_run_resumes_without_losing_finished_runs(qa_config, tmp_path):
    out = tmp_path / "study"
    squad_only = {"squad_v2": qa_config.tasks["squad_v2"]}
    run_stages(qa_config.model_copy(update={"seeds": [1, 2], "tasks": squad_only}), out, [BY_NAME["prepare"]])
    command = [sys.executable, "-m", "lorascope", "train", str(out)]
    first = Study(out).run_dir("squad_v2", "lora", 1) / "metrics.json"
    killed_after(command, first)
    kept = first.stat().st_mtime_ns
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert first.stat().st_mtime_ns == kept
    done = [json.loads(p.read_text())["status"] for p in (out / "runs").rglob("metrics.json")]
    assert done == ["ok"] * 4


def test_unanswerable_share_fixes_the_train_mix_and_eval_is_a_seeded_sample(squad_sample):
    config = load_config(None, "smoke", [f"data.squad_v2={squad_sample}"])
    cfg = config.tasks["sst2"].model_copy(update={"train_max": 40, "eval_max": 30, "unanswerable_share": 0.25})
    task, train, evaluation = load_raw(resolve_task("squad_v2", cfg, config.data))
    assert evaluation["answers"][0]["text"] and task.squad
    splits = make_splits(task, train, evaluation, config.data)
    unanswerable = [not a["text"] for a in splits["train"]["answers"]]
    assert len(unanswerable) == 40 and sum(unanswerable) == 10
    assert sorted(splits["eval"]["example_id"]) == splits["eval"]["example_id"] != list(range(30))  # a sample
    again = make_splits(task, train, evaluation, config.data)
    assert again["eval"]["id"] == splits["eval"]["id"] and again["train"]["id"] == splits["train"]["id"]
    too_many = dataclasses.replace(task, unanswerable_share=0.9)
    with pytest.raises(InputError, match=r"unanswerable_share 0\.9 of 40 training questions needs 36"):
        make_splits(too_many, train, evaluation, config.data)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("{source: DATA, eval_source: DATA, template: 'Q: {question} {nope}', completion: answer}", "missing column"),
        ("{source: DATA, eval_source: DATA, prompt: question, completion: missing}", "missing column"),
        ("{source: EMPTY, eval_source: EMPTY, prompt: question, completion: answer}", "empty completion"),
        ("{source: DATA, eval_source: DATA, prompt: question}", "needs `text`"),
        (
            "{source: DATA, eval_source: DATA, prompt: question, template: 'Q: {question}', completion: answer}",
            "one of",
        ),
        ("{source: DATA, eval_source: DATA, text: question, max_new_tokens: 4}", "generative tasks only"),
    ],
)
def test_bad_generative_tasks_exit_2_before_anything_is_written(task, message, tiny_causal_dir, tmp_path, capsys):
    rows = [{"question": f"what is {i}?", "answer": str(i)} for i in range(20)]
    data, empty = tmp_path / "data.jsonl", tmp_path / "empty.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    empty.write_text(
        "".join(json.dumps(r | {"answer": "" if i == 3 else r["answer"]}) + "\n" for i, r in enumerate(rows))
    )
    task = task.replace("DATA", str(data)).replace("EMPTY", str(empty))
    out = tmp_path / "study"
    argv = ["run", "--profile", "smoke", "--out", str(out), "--set", f"model.name={tiny_causal_dir}"]
    argv += ["--set", f"tasks={{qa: {task}}}", "--set", "deploy.enabled=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "runs").exists()


def test_a_prompt_past_the_models_context_is_refused(tiny_causal_dir, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["run", "--profile", "smoke", "--out", str(out), "--set", f"model.name={tiny_causal_dir}"]
    argv += [
        "--set",
        "model.max_length=1024",
        "--set",
        "tasks={squad_v2: {train_max: 8}}",
        "--set",
        "deploy.enabled=false",
    ]
    assert main(argv) == 2
    assert "longer than the context" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_the_qa_profiles_fine_tune_smollm2_here_and_tinyllama_on_a_gpu():
    qa, gpu = load_config(None, "qa"), load_config(None, "qa-gpu")
    assert qa.model.name == "smollm2-135m" and list(qa.tasks) == ["squad_v2"] and qa.generative_tasks() == ["squad_v2"]
    assert qa.runtime.device == "auto" and qa.runtime.bf16 and qa.deploy.enabled
    assert qa.deploy.strategies == ["full", "merged", "separate", "multi"] and qa.deploy.grid.output_tokens == 16
    assert gpu.model.name == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T" and gpu.runtime.device == "cuda"
    assert gpu.data.squad_v2 == "rajpurkar/squad_v2" and gpu.tasks["squad_v2"].train_max is None  # the full train set
    assert gpu.model.gradient_checkpointing and len(gpu.seeds) == 3


def test_the_gpu_profile_trains_a_tiny_causal_llama_with_lora_on_every_linear_layer(tiny_causal_dir):
    config = load_config(None, "qa-gpu", [f"model.name={tiny_causal_dir}"])
    tokenizer = modeling.load_tokenizer(str(tiny_causal_dir))
    model = modeling.load_model(str(tiny_causal_dir), None, 0, tokenizer.pad_token_id)
    lora = modeling.prepare_for_method(model, "lora", config.training.lora)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert adapted == set(config.training.lora.target_modules)
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)  # the LM head stays the base's
    _, splits, _ = tokenize_completions(_task(), _splits(PROMPTS, ANSWERS), tokenizer, 64)
    lora.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora.train()
    batch = CompletionCollator(tokenizer, CPU)(splits["train"].to_list())
    batch.pop("example_id")  # the Trainer's order digest reads it
    lora(**batch).loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n)


def test_a_config_written_back_to_a_study_resolves_its_tasks_again(qa_config):
    """config.yaml holds every key with its value: defaults of generative keys on a
    classification task are no input error when a stage subcommand reads the study back."""
    again = validate(yaml.safe_load(to_yaml(qa_config)))
    assert again == qa_config
    kinds = {name: resolve_task(name, cfg, again.data).kind for name, cfg in again.tasks.items()}
    assert kinds == {"squad_v2": "generate", "sst2": "classify"}
    with pytest.raises(InputError, match="apply to generative tasks only"):
        resolve_task("sst2", again.tasks["sst2"].model_copy(update={"max_new_tokens": 8}), again.data)
