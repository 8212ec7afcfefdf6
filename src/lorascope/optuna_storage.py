"""Where Optuna searches live: the storage a search uses (SQLite in the study for one process,
an RDB server or a journal file for many workers), and what keeps shared searches alive when
workers die: heartbeats and failing stale trials so they are queued again."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import warnings
from pathlib import Path

import filelock
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError

from lorascope.config import StudyConfig
from lorascope.errors import InputError, first_line

SQLITE_SUFFIXES = {".db", ".sqlite", ".sqlite3"}


@dataclasses.dataclass
class Backend:
    storage: optuna.storages.BaseStorage
    url: str  # for the records: password redacted
    kind: str  # default (SQLite in the study, one process) | rdb | journal
    address: str  # what open_storage takes to open this storage again (in a worker): password kept
    lock_path: Path | None = None

    @contextlib.contextmanager
    def exclusive(self):
        """The default storage serves one process, so every RUNNING trial found in it is stale."""
        if self.lock_path is None:
            yield
            return
        lock = filelock.FileLock(self.lock_path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise InputError(
                f"another process is tuning with {self.url}; several workers need a shared "
                "--storage (PostgreSQL/MySQL URL or a journal file)"
            ) from None
        try:
            yield
        finally:
            lock.release()


def open_storage(study_root, config: StudyConfig, storage: str | None = None, shared: bool = False) -> Backend:
    """`storage` (else tune.storage): an RDB URL (sqlite:///, postgresql://, mysql://) with
    Optuna's heartbeat, or a journal file path; none: tune/optuna.db in the study directory, or
    for several workers (`shared`) the journal file tune/optuna.journal there."""
    tune = config.tune
    url = storage or tune.storage
    if url is None and shared:
        url = str((Path(study_root) / "tune" / "optuna.journal").resolve())
    if url is None:
        path = (Path(study_root) / "tune" / "optuna.db").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Backend(
            RDBStorage(f"sqlite:///{path}"),
            f"sqlite:///{path}",
            "default",
            f"sqlite:///{path}",
            path.with_suffix(".lock"),
        )
    if "://" in url:
        return Backend(_rdb(url, tune), redact(url), "rdb", url)
    path = Path(url).expanduser()
    if path.suffix in SQLITE_SUFFIXES:
        raise InputError(f"storage {url}: a path is read as an Optuna journal file; for SQLite give sqlite:///{url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Backend(JournalStorage(JournalFileBackend(str(path))), str(path), "journal", str(path))


def _rdb(url: str, tune, attempts: int = 3) -> RDBStorage:
    """RDBStorage with Optuna's heartbeat. Workers that start together on a new database race to
    create its tables (the loser sees "already exists" or a unique-key error); a second attempt
    finds them."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=tune.heartbeat_s,
                    grace_period=4 * tune.heartbeat_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retries),
                )
        except Exception as err:
            if attempt + 1 < attempts and isinstance(err, DBAPIError):  # not a bad scheme or a missing driver
                time.sleep(0.5 * (attempt + 1))
                continue
            message = first_line(err)
            raise InputError(f"storage {redact(url)}: cannot open it ({message})") from None
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else url


def fail_stale(ostudy: optuna.Study, backend: Backend, config: StudyConfig) -> None:
    """Fail the trials of dead workers and queue them again with their parameters. RDB: Optuna's
    heartbeat. Journal: lorascope's heartbeat (a user attribute). Default storage: this process
    holds it alone, so any RUNNING trial is left over from a killed run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if backend.kind == "rdb":
            optuna.storages.fail_stale_trials(ostudy)
            return
    grace = 0 if backend.kind == "default" else 4 * config.tune.heartbeat_s
    now = time.time()
    for trial in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get("heartbeat") or trial.datetime_start.timestamp()
        if now - last < grace:
            continue
        try:
            ostudy.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it first and queued the retry
        attempt = trial.user_attrs.get("attempt", 0) + 1
        if trial.params and attempt <= config.tune.max_retries:
            ostudy.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "attempt": attempt})


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial, seconds: float):
    """Records a sign of life every `seconds` while a trial runs (journal storage)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(seconds):
            trial.set_user_attr("heartbeat", time.time())

    trial.set_user_attr("heartbeat", time.time())
    thread = threading.Thread(target=beat, name=f"heartbeat-trial{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
