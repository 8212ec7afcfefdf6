"""Where Optuna searches live: the storage a search uses (SQLite in the study for one process,
an RDB server or a journal file for many workers), and what keeps shared searches alive when
workers die: heartbeats and failing stale trials so they are queued again."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
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
OWN_FILES = ("tune/optuna.db", "tune/optuna.journal")  # the storage a study keeps itself, one or several workers


@dataclasses.dataclass
class Backend:
    storage: optuna.storages.BaseStorage
    url: str  # for the records: password redacted
    kind: str  # default (SQLite in the study, one process) | rdb | journal
    address: str  # what open_storage takes to open this storage again (in a worker): password kept
    lock_path: Path | None = None
    own: str | None = None  # the study's own storage (OWN_FILES), relative to the study; None for one given

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
        path = (Path(study_root) / OWN_FILES[1]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Backend(JournalStorage(JournalFileBackend(str(path))), str(path), "journal", str(path), own=OWN_FILES[1])
    if url is None:
        path = (Path(study_root) / OWN_FILES[0]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Backend(
            RDBStorage(f"sqlite:///{path}"),
            f"sqlite:///{path}",
            "default",
            f"sqlite:///{path}",
            path.with_suffix(".lock"),
            OWN_FILES[0],
        )
    if "://" in url:
        return Backend(_rdb(url, tune), redact(url), "rdb", url)
    path = Path(url).expanduser()
    if path.suffix in SQLITE_SUFFIXES:
        raise InputError(f"storage {url}: a path is read as an Optuna journal file; for SQLite give sqlite:///{url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Backend(JournalStorage(JournalFileBackend(str(path))), str(path), "journal", str(path))


# ---------------------------------------------------------------- the study's own storage, checked


@dataclasses.dataclass
class Lost:
    """The study's own storage file no longer holds finished trials its tuned files record."""

    file: str  # relative to the study: tune/optuna.db or tune/optuna.journal
    why: str
    searches: list[str]  # the study names of the searches lost
    unreadable: bool  # missing or damaged as a file: every search in it is lost and it is removed


def lost_trials(study_root, records: list[tuple[str, dict]]) -> list[Lost]:
    """Each own storage file that cannot be opened, or lacks a search's COMPLETE / PRUNED trials
    as a tuned file (its path, its record) counts them. Only records of searches kept in the
    study's own storage are checked (a storage given by --storage / tune.storage never is);
    trials added since (another process, a resumed search) are no damage. Reads, never writes."""
    root, by_file = Path(study_root), {}
    for where, record in records:
        own = record.get("own_storage", _own_by_url(root, record.get("storage")))
        if own in OWN_FILES:
            by_file.setdefault(own, []).append((where, record))
    lost = []
    for own, recorded in by_file.items():
        names = [record["study_name"] for _, record in recorded]
        where, record = recorded[0]
        finished = record["trials"]["complete"] + record["trials"]["pruned"]
        path = root / own
        if not path.is_file():
            lost.append(Lost(own, f"is missing; {where} records {finished} finished trial(s) in it", names, True))
            continue
        try:
            found = _finished_in(path)
        except Exception as err:
            lost.append(Lost(own, f"cannot be opened ({first_line(err)})", names, True))
            continue
        short = [(w, r) for w, r in recorded if not _holds(found.get(r["study_name"]), r)]
        if short:
            where, record = short[0]
            complete, pruned = found.get(record["study_name"], (set(), 0))
            why = (
                f"holds {len(complete)} complete and {pruned} pruned trial(s) of the search {where} records with "
                f"{record['trials']['complete']} complete and {record['trials']['pruned']} pruned"
            )
            journal = path.suffix == ".journal"  # an append-only log cut short: nothing after the cut is sure
            lost.append(Lost(own, why, names if journal else [r["study_name"] for _, r in short], journal))
    return lost


def drop_searches(study_root, lost: Lost) -> None:
    """What a damaged own storage lost made to start again from nothing: the file removed when
    it is unreadable, else the lost searches deleted from it."""
    path = Path(study_root) / lost.file
    if lost.unreadable:
        path.unlink(missing_ok=True)
        return
    storage = RDBStorage(f"sqlite:///{path.resolve()}")
    for name in lost.searches:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)


def _own_by_url(root: Path, url: str | None) -> str | None:
    """A tuned file written before records said which storage was the study's own: its storage
    is the study's own when it names that file in this study folder."""
    for own in OWN_FILES:
        path = str((root / own).resolve())
        if url in (path, f"sqlite:///{path}"):
            return own
    return None


def _holds(found: tuple[set[int], int] | None, record: dict) -> bool:
    if found is None:
        return record["trials"]["complete"] + record["trials"]["pruned"] == 0
    complete, pruned = found
    best = record.get("best_trial")
    return (
        len(complete) >= record["trials"]["complete"]
        and pruned >= record["trials"]["pruned"]
        and (best is None or best in complete)
    )


def _finished_in(path: Path) -> dict[str, tuple[set[int], int]]:
    """Each search's COMPLETE trial numbers and PRUNED count in a storage file; raises when it
    cannot be read whole. SQLite is opened read-only (Optuna would create missing tables)."""
    found: dict[str, tuple[set[int], int]] = {}

    def add(name: str, state: str, number: int) -> None:
        complete, pruned = found.get(name, (set(), 0))
        if state == "COMPLETE":
            complete.add(number)
        found[name] = (complete, pruned + (state == "PRUNED"))

    if path.suffix == ".journal":
        with path.open("rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            raise ValueError("its last record is cut short")
        storage = JournalStorage(JournalFileBackend(str(path)))
        for summary in storage.get_all_studies():
            for trial in storage.get_all_trials(storage.get_study_id_from_name(summary.study_name), deepcopy=False):
                add(summary.study_name, trial.state.name, trial.number)
        return found
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(check)
        rows = db.execute(
            "SELECT studies.study_name, trials.state, trials.number FROM trials JOIN studies USING (study_id)"
        ).fetchall()
    finally:
        db.close()
    for name, state, number in rows:
        add(name, state, number)
    return found


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
