"""The study directory: lock, manifest, atomic writes and the stage runner.

Every output is written to a temporary sibling and renamed into place, so a study killed at
any moment holds only complete results; the next run removes the leftovers and redoes them."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import filelock
import torch
import yaml

from lorascope.config import StudyConfig, results_fingerprint, to_yaml, validate
from lorascope.errors import InputError

PARTIAL = ".partial-"
PACKAGES = ("lorascope", "torch", "transformers", "peft", "datasets", "accelerate", "pydantic")


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

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    # ------------------------------------------------------------ config and manifest
    def load_config(self) -> StudyConfig:
        path = self.root / "config.yaml"
        if not path.is_file():
            raise InputError(f"{self.root} is not a study directory (no config.yaml)")
        return validate(yaml.safe_load(path.read_text()) or {}, source=str(path))

    def write_config(self, config: StudyConfig) -> None:
        atomic_write_text(self.root / "config.yaml", to_yaml(config))
        manifest = self.manifest()
        manifest.update(
            config_fingerprint=results_fingerprint(config),
            lorascope=metadata.version("lorascope"),
            versions={p: _version(p) for p in PACKAGES},
            hardware=_hardware(),
            python=sys.version.split()[0],
        )
        self._write_manifest(manifest)

    def manifest(self) -> dict:
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.root / "manifest.json", json.dumps(manifest, indent=2) + "\n")

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

    # ------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self):
        """One writer per study; the OS drops the lock when its process dies (even kill -9)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.root / ".lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise InputError(f"{self.root} is being written by another lorascope process") from None
        try:
            remove_partials(self.root)
            yield self
        finally:
            lock.release()


def load_done(path: Path, fingerprint: str) -> dict | None:
    """The metrics of a finished item whose fingerprint matches, else None (redo it)."""
    metrics = path / "metrics.json"
    if not metrics.is_file():
        return None
    data = json.loads(metrics.read_text())
    return data if data.get("fingerprint") == fingerprint else None


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yields an empty temporary folder that replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f"{PARTIAL}{target.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(scratch, target)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{PARTIAL}{path.name}-{os.getpid()}")
    scratch.write_text(text)
    os.replace(scratch, path)


def remove_partials(root: Path) -> None:
    for leftover in root.rglob(f"{PARTIAL}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def run_stages(config: StudyConfig, root: Path, stages: list[tuple[str, Callable]], write_config: bool = True):
    """Run stage functions `fn(study, config) -> fingerprint-independent result` in order under
    the study lock. Each stage skips the items whose outputs exist for the same fingerprint."""
    study = Study(root)
    with study.lock():
        if write_config:
            study.write_config(config)
        for name, fn in stages:
            with study.stage(name, results_fingerprint(config)):
                fn(study, config)
    return study


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _hardware() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
