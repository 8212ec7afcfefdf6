"""The study directory: lock, manifest, the one cache rule, and the table records every writer
and the report share (lorascope.atomic writes every output).

Every output is written to a temporary sibling and renamed into place, so a study killed at
any moment holds only complete results; the next run removes the leftovers and redoes them.

The cache rule: an output (a file or a folder) is valid for a fingerprint when its stamp, a
sibling `.<name>.fingerprint` file, holds that fingerprint. The stamp is removed before the
output is replaced and written after it is in place, so a kill in between leaves no stamp and
the output is redone; a stamp never vouches for an output it was not written for."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import filelock
import pandas as pd
import yaml

from lorascope import dependencies, executors, integrity, optuna_storage, runtime
from lorascope.atomic import atomic_dir, atomic_write, remove_partials
from lorascope.config import StudyConfig
from lorascope.config_io import fingerprint, results_fingerprint, to_yaml, validate
from lorascope.dependencies import Declared
from lorascope.errors import InputError

# ---------------------------------------------------------------- the cache rule


def _stamp(target: Path) -> Path:
    return target.with_name(f".{target.name}.fingerprint")


def _read_stamp(target: Path) -> dict | None:
    """{"fingerprint": ..., "files": integrity.record(target)}, or None: never written, half
    written, or a stamp of the older plain format, which recorded no files (its output is redone)."""
    stamp = _stamp(target)
    if not stamp.is_file():
        return None
    try:
        data = json.loads(stamp.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) and {"fingerprint", "files"} <= data.keys() else None


def stamp_of(target: Path) -> str | None:
    """The fingerprint `target` was written for, or None (never written, or half written)."""
    data = _read_stamp(target)
    return None if data is None or not target.exists() else data["fingerprint"]


def is_current(target: Path, fingerprint: str) -> bool:
    """`target` was written for `fingerprint` and every file it wrote is still there, whole
    (lorascope.integrity). A damaged output loses its stamp, with one line saying which file and
    why, so it is redone like one never written."""
    data = _read_stamp(target)
    if data is None or data["fingerprint"] != fingerprint:
        return False
    problem = integrity.damage(target, data["files"])
    if problem is not None:
        print(f"{target.parent / problem}; redoing it", file=sys.stderr)
        _stamp(target).unlink(missing_ok=True)
        return False
    return True


@contextlib.contextmanager
def fresh(target: Path, fingerprint: str):
    """Around the (atomic) writing of `target`: its stamp goes first and comes back, with the
    new fingerprint and the record of every file written, only when the block succeeds."""
    _stamp(target).unlink(missing_ok=True)
    yield
    stamp = {"fingerprint": fingerprint, "files": integrity.record(target)}
    atomic_write(_stamp(target), json.dumps(stamp, indent=1) + "\n")


def verify(root: Path) -> tuple[list[str], int, int]:
    """Every stamped output under `root` checked against its record: (what is missing or
    damaged, one line each; outputs checked; bytes read), and the study's own tuning storage
    against the finished trials its intact tuned files record. Changes nothing."""
    problems, outputs, size, tuned = [], 0, 0, []
    for stamp in sorted(Path(root).rglob(".*.fingerprint")):
        target = stamp.with_name(stamp.name[1 : -len(".fingerprint")])
        data = _read_stamp(target)
        where = target.relative_to(root)
        if data is None:
            problems.append(f"{where}: its stamp records no files (written by an older lorascope)")
            continue
        outputs += 1
        size += sum(entry[0] for entry in data["files"].values())
        problem = integrity.damage(target, data["files"])
        if problem is not None:
            problems.append(f"{where.parent / problem}")
        elif where.parent == Path("tuned") and target.suffix == ".yaml":
            tuned.append((str(where), yaml.safe_load(target.read_text())))
    problems += [f"{lost.file} {lost.why}" for lost in optuna_storage.lost_trials(root, tuned)]
    return problems, outputs, size


def write_current(target: Path, data: str | bytes, fingerprint: str) -> None:
    """`target` written atomically and stamped with `fingerprint`."""
    with fresh(target, fingerprint):
        atomic_write(target, data)


@contextlib.contextmanager
def current_dir(target: Path, fingerprint: str):
    """A scratch folder that becomes `target`, stamped with `fingerprint`, if the block succeeds."""
    with fresh(target, fingerprint), atomic_dir(target) as scratch:
        yield scratch


# ---------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Table:
    """One CSV under tables/: its leading columns are declared once, beside its writer, and
    the report reads it through the same record, so a renamed column breaks a test, not the
    report. Writers may add columns after the declared ones; they may not leave one out."""

    name: str
    columns: tuple[str, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.csv"

    def path(self, folder: Path) -> Path:
        return Path(folder) / self.file

    def frame(self, rows) -> pd.DataFrame:
        """Rows (dicts or a frame) with the declared columns first; a missing one is an error."""
        frame = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
        if frame.empty and not len(frame.columns):
            frame = pd.DataFrame(columns=list(self.columns))
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{self.file}: rows lack the declared column(s) {missing}")
        return frame[list(self.columns) + [c for c in frame.columns if c not in self.columns]]

    def write(self, folder: Path, rows, fingerprint: str | None = None) -> pd.DataFrame:
        frame = self.frame(rows)
        text = frame.to_csv(index=False)
        if fingerprint is None:
            atomic_write(self.path(folder), text)
        else:
            write_current(self.path(folder), text, fingerprint)
        return frame

    def read(self, folder: Path) -> pd.DataFrame | None:
        """The table, or None when it was never written or has no rows."""
        path = self.path(folder)
        if not path.is_file():
            return None
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            return None
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: written without the column(s) {missing}; rerun the stage that writes it")
        return None if frame.empty else frame


# ---------------------------------------------------------------- the study


class Study:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------ paths
    def run_dir(self, task: str, method: str, seed: int) -> Path:
        return self.root / "runs" / task / method / f"seed{seed}"

    def prepared_dir(self, task: str) -> Path:
        return self.root / "prepared" / task

    def baseline_dir(self, task: str, name: str) -> Path:
        return self.root / "baselines" / task / name

    def features_path(self, task: str, model_id: str) -> Path:
        return self.root / "features" / task / f"{model_id}.safetensors"

    def probe_features_path(self, probe_task: str, model_id: str) -> Path:
        """A model's features on a probed task's fixed examples (the forget stage's)."""
        return self.root / "forget" / "features" / probe_task / f"{model_id}.safetensors"

    def lm_losses_path(self, model_id: str) -> Path:
        """A model's per-document LM losses (the forget stage's)."""
        return self.root / "forget" / "lm" / f"{model_id}.safetensors"

    def tuned_path(self, task: str, method: str) -> Path:
        return self.root / "tuned" / f"{task}_{method}.yaml"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    # ------------------------------------------------------------ config and manifest
    def load_config(self) -> StudyConfig:
        path = self.root / "config.yaml"
        if not path.is_file():
            raise InputError(f"{self.root} is not a study directory (no config.yaml)")
        return validate(yaml.safe_load(path.read_text()) or {}, source=str(path))

    def write_config(self, config: StudyConfig) -> None:
        atomic_write(self.root / "config.yaml", to_yaml(config))
        manifest = self.manifest()
        versions = runtime.versions()
        manifest.update(
            config_fingerprint=results_fingerprint(config),
            study=identity(config),
            lorascope=versions["lorascope"],
            versions={k: v for k, v in versions.items() if k != "python"},
            hardware=runtime.hardware(),
            python=versions["python"],
        )
        self._write_manifest(manifest)

    def manifest(self) -> dict:
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write(self.root / "manifest.json", json.dumps(manifest, indent=2) + "\n")

    def _set_stage(self, name: str, **fields) -> None:
        manifest = self.manifest()
        manifest.setdefault("stages", {}).setdefault(name, {}).update(fields)
        self._write_manifest(manifest)

    @contextlib.contextmanager
    def stage(self, name: str, fingerprint: str):
        """Records the stage's status, fingerprint and wall time in manifest.json. `seconds` adds
        up every invocation for the same fingerprint (a killed and resumed stage counts both
        parts, a rerun that finds everything done adds ~0); `last_seconds` is this invocation."""
        previous = self.manifest()["stages"].get(name, {})
        spent = previous.get("seconds", 0.0) if previous.get("fingerprint") == fingerprint else 0.0
        self._set_stage(name, status="running", fingerprint=fingerprint, started=_now())
        started = time.perf_counter()

        def timing() -> dict:
            last = time.perf_counter() - started
            return {"seconds": round(spent + last, 1), "last_seconds": round(last, 1)}

        try:
            yield
        except BaseException:
            self._set_stage(name, status="failed", **timing())
            raise
        self._set_stage(name, status="done", finished=_now(), **timing())

    def check_same_study(self, config: StudyConfig) -> None:
        """Refuse (InputError) to write `config`'s study into a folder that holds another: one whose
        manifest records other values of the keys every output depends on, so that nothing there
        could be reused and every run would be overwritten. A folder without that record (new, or
        written by an older lorascope) is taken as it is."""
        recorded = self.manifest().get("study")
        if recorded is None:
            return
        differ = [key for key, value in identity(config).items() if recorded.get(key) != value]
        if differ:
            verb = "differs" if len(differ) == 1 else "differ"
            raise InputError(
                f"{self.root} holds another study (its {' and '.join(differ)} {verb} from this config's, so nothing "
                "there could be reused); choose another --out, or delete that folder to start over"
            )

    # ------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self):
        """One writer per study; the OS drops the lock when its process dies (even kill -9). A
        study directory that cannot be one (a file, a folder this user cannot write) is bad
        input, found here, before any stage runs."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root} is a file, not a study directory")
        lock = filelock.FileLock(self.root / ".lock", timeout=0)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except filelock.Timeout:
            raise InputError(f"{self.root} is being written by another lorascope process") from None
        except OSError as err:
            raise InputError(f"{self.root}: cannot write the study directory ({err.strerror})") from None
        try:
            remove_partials(self.root)
            yield self
        finally:
            lock.release()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a study. `needs`: the stages whose outputs it reads (run first by the
    stage's subcommand); `outputs`: the declarations (lorascope.dependencies) of what it writes,
    whose fingerprints decide, output by output, what is current and what is redone;
    `standalone`: reads whatever exists instead of bringing inputs up to date (and reuses
    nothing). `run(study, config)` skips every output that is current."""

    name: str
    help: str
    run: Callable[[Study, StudyConfig], None]
    needs: tuple[str, ...] = ()
    outputs: tuple[Declared, ...] = ()
    standalone: bool = False

    def fingerprint(self, config: StudyConfig) -> str:
        """The manifest's record of the config this stage ran with: the sections its outputs declare."""
        sections = sorted(set().union(*(output.sections() for output in self.outputs)))
        return fingerprint(self.name, {key: getattr(config, key) for key in sections})


def run_stages(config: StudyConfig, root: Path, stages: list[Stage], write_config: bool = True) -> Study:
    """Run `stages` in order under the study lock, after writing config.yaml and the manifest
    (`write_config`); each records its status and time in manifest.json. The executor
    (runtime.workers / ray_address) is started first, so a bad one stops before anything is
    written, and the stages' units run on it."""
    study = Study(root)
    with executors.started(config.runtime), study.lock():
        study.check_same_study(config)
        if write_config:
            study.write_config(config)
        for stage in stages:
            with study.stage(stage.name, stage.fingerprint(config)):
                stage.run(study, config)
    return study


def identity(config: StudyConfig) -> dict:
    """What makes a study folder one study: the values of the config keys of the prepared splits
    that are not a task's own (the model by its identity, its max_length, the data settings but
    the path), which every output depends on through them (lorascope.dependencies)."""
    keys = [key for key in dependencies.PREPARED.config if "{" not in key]
    return {key: dependencies.config_value(config, key) for key in keys}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
