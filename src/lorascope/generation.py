"""Generative tasks' batches: the completion-only collator (training and the dev loss) and
batched greedy generation (evaluation), the same for every model (base, LoRA, full) on a
prepared split.

Generation: prompts sorted by length and left-padded, greedy with the KV cache, stopped at
eos or at the first token that holds a newline (an answer is one line); what follows a newline
inside that token is cut."""

from __future__ import annotations

import functools

import datasets
import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq, GenerationConfig

from lorascope.runtime import autocast

TRAIN_COLUMNS = ("input_ids", "attention_mask", "labels")


class CompletionCollator:
    """Right-padded prompt + completion batches with labels padded by -100 (prompt tokens carry
    -100 from tokenization), and the rows' example ids for the Trainer's order digest."""

    def __init__(self, tokenizer, device: torch.device):
        self.pad = DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8 if device.type == "cuda" else None
        )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad([{k: f[k] for k in TRAIN_COLUMNS} for f in features])
        if "example_id" in features[0]:
            batch["example_id"] = torch.tensor([f["example_id"] for f in features])
        return batch


@functools.lru_cache(maxsize=4)
def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """eos and every token whose text holds a newline; per tokenizer object, once (decoding
    SmolLM2's 49,152 tokens takes 0.3-0.7 s, a share of every evaluation worth keeping)."""
    vocabulary = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return (tokenizer.eos_token_id, *(i for i, text in enumerate(vocabulary) if "\n" in text))


def answer_text(generated: str) -> str:
    """The answer in generated text: its first line, stripped."""
    return generated.split("\n", 1)[0].strip()


def prompt_batches(split: datasets.Dataset, pad_token_id: int, batch_size: int, device: torch.device):
    """(row indices, left-padded prompt ids, attention mask), prompts ordered by length."""
    lengths = np.asarray(split["prompt_length"][:])
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(split), batch_size):
        rows = order[start : start + batch_size]
        prompts = [ids[:n] for ids, n in zip(split.select(rows)["input_ids"], lengths[rows])]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        yield rows, ids.to(device), mask.to(device)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    split: datasets.Dataset,
    *,
    tokenizer,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> tuple[list[str], int]:
    """The generated text of every example (its first line, stripped) in the split's order, and
    the number of new tokens generated (up to each row's stop token)."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stops),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    texts: list[str] = [""] * len(split)
    new_tokens = 0
    for rows, ids, mask in prompt_batches(split, tokenizer.pad_token_id, batch_size, device):
        with autocast(device, bf16):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        generated = out[:, ids.shape[1] :].cpu()
        for row, tokens in zip(rows, generated):
            ended = torch.isin(tokens, torch.tensor(stops)).nonzero()
            kept = tokens[: int(ended[0]) + 1] if len(ended) else tokens
            new_tokens += len(kept)
            texts[row] = answer_text(tokenizer.decode(kept, skip_special_tokens=True))
    model.train(was_training)
    return texts, new_tokens
