"""Generation requests to a vLLM server (OpenAI-compatible /v1/completions, token ids in and out):
timed requests stream a fixed number of tokens (`ignore_eos`, `max_tokens` N, `stream: true` so
the first token is timed); the checks read teacher-forced log-probabilities of the reference
completion (`prompt_logprobs`) and greedy completions, compared with PEFT's
(peft_generation.compare). Full and merged answer to the base's name, an adapter to its own."""

from __future__ import annotations

import http.client
import json

import torch

from lorascope.serving.grid import Request, Send
from lorascope.serving.inputs import Models
from lorascope.serving.peft_engine import tasks_of
from lorascope.serving.peft_generation import compare, until_eos
from lorascope.serving.streaming import Streamed, server_sent_events
from lorascope.serving.vllm_engine import ENGINE, Kind
from lorascope.serving.vllm_server import VllmServer, VllmServerError, refused, unreachable

COMPLETIONS = "/v1/completions"
CHECK_PROMPTS = 16  # prompts per check request
# vLLM's CPU kernels (fp32) against eager PyTorch on SmolLM2-135M: max |Δ log-probability| 2e-4
# over 1,500 completion tokens; another adapter, or none, moves them by more than 0.1
VLLM_LOGPROB_ATOL = 2e-3
# The grid sends the same prompts again (every cell, every adapter of `bench`): with vLLM's prefix
# cache a repeated prompt skips its prefill (time to first token 145 ms against 503 ms on the same
# 8 SQuAD prompts), which PEFT always computes. Off, unless deploy.vllm.args turns it back on.
NO_PREFIX_CACHE = ("--no-enable-prefix-caching",)
ONE_PROMPT = (
    "a vLLM completion request names one adapter: multi is timed one prompt a request, the server "
    "batching requests of several adapters"
)


def _prompts(rows: list[dict]) -> list[list[int]]:
    return [list(r["input_ids"]) for r in rows]


def complete(server: VllmServer, body: dict) -> dict:
    """One non-streamed completion request; its JSON answer."""
    what = f"{COMPLETIONS} for {body.get('model')!r}"
    try:
        status, data = server.request("POST", COMPLETIONS, body)
    except OSError as err:
        raise unreachable(server, what, err) from err
    if status != 200:
        raise refused(server, what, status, data)
    return json.loads(data)


def stream(server: VllmServer, model: str, rows: list[dict], tokens: int) -> Streamed:
    """A timed request: `tokens` greedy tokens for each row's prompt, end-of-sequence ignored,
    every streamed chunk stamped on arrival (its token_ids counted)."""
    body = {
        "model": model,
        "prompt": _prompts(rows),
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    what = f"{COMPLETIONS} (stream) for {model!r}"
    streamed = Streamed.start(len(rows))
    connection = http.client.HTTPConnection(server.host, server.port, timeout=server.request_timeout)
    try:
        connection.request("POST", COMPLETIONS, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise refused(server, what, response.status, response.read())
        for event in server_sent_events(response):
            for choice in event.get("choices", ()):
                if n := len(choice.get("token_ids") or ()):
                    streamed.arrived(choice["index"], n)
    except OSError as err:
        raise unreachable(server, what, err) from err
    finally:
        connection.close()
    if streamed.output_tokens != tokens * len(rows):
        raise VllmServerError(f"{what} streamed {streamed.output_tokens} tokens, {tokens * len(rows)} were asked for")
    return streamed.finish()


def prompt_logprobs(server: VllmServer, model: str, rows: list[dict]) -> list[torch.Tensor]:
    """Log-probability of each reference completion token, teacher-forced: the prompt and the
    completion sent as one prompt, vLLM scoring every prompt token (`prompt_logprobs`: 0 returns
    the prompt's own token at each position)."""
    out = []
    for start in range(0, len(rows), CHECK_PROMPTS):
        chunk = rows[start : start + CHECK_PROMPTS]
        whole = [{"input_ids": [*r["input_ids"], *r["completion_ids"]]} for r in chunk]
        body = {"model": model, "prompt": _prompts(whole), "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        choices = sorted(complete(server, body)["choices"], key=lambda c: c["index"])
        for r, choice in zip(chunk, choices):
            n, scored = len(r["input_ids"]), choice["prompt_logprobs"]
            values = [scored[n + i][str(token)]["logprob"] for i, token in enumerate(r["completion_ids"])]
            out.append(torch.tensor(values, dtype=torch.float32))
    return out


def greedy(server: VllmServer, model: str, rows: list[dict], tokens: int, eos_token_id) -> list[list[int]]:
    """Greedy completions (at most `tokens`, cut at end-of-sequence) of each row's prompt."""
    out = []
    for start in range(0, len(rows), CHECK_PROMPTS):
        chunk = rows[start : start + CHECK_PROMPTS]
        body = {"model": model, "prompt": _prompts(chunk), "max_tokens": tokens, "temperature": 0}
        choices = sorted(complete(server, body | {"return_token_ids": True})["choices"], key=lambda c: c["index"])
        out += [until_eos(c["token_ids"], eos_token_id) for c in choices]
    return out


def served_name(strategy: str, task: str) -> str:
    return "base" if strategy in ("full", "merged") else task


def generation(models: Models, checked: dict, references: dict, tokens: int, eos, max_model_len: int = 512) -> Kind:
    """Generation requests: checked against PEFT's answers (peft_generation.check_correctness)
    on each task's labelled prompts (greedy answers of at most `tokens`), timed at `tokens` a
    prompt, on servers that take `max_model_len` tokens."""

    def check(server: VllmServer, strategy: str) -> list[dict]:
        rows = []
        for task in tasks_of(strategy, models):
            name, examples = served_name(strategy, task), checked[task]
            served = {
                "logprobs": prompt_logprobs(server, name, examples),
                "greedy": greedy(server, name, examples, tokens, eos),
            }
            row = compare(f"vllm_{strategy}_vs_peft", task, served, references[strategy][task], VLLM_LOGPROB_ATOL)
            rows.append({"engine": ENGINE, "strategy": strategy} | row)
        return rows

    def sender(server: VllmServer, strategy: str) -> Send:
        def send(request: Request) -> Streamed:
            task = request.rows[0]["task"] if strategy == "multi" else models.first
            return stream(server, served_name(strategy, task), request.rows, tokens)

        return send

    return Kind(
        None, check, sender, ONE_PROMPT, "vllm-generation", max_model_len=max_model_len, server_args=NO_PREFIX_CACHE
    )
