"""A study folder vouches for its files: each kind of artifact (and the study's own tuning
storage) truncated or deleted is found on reuse, exactly its unit is redone, the tables come out
as from an undamaged study, and `lorascope verify` names the same file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lorascope import integrity, tuning
from lorascope.cli import main
from lorascope.stages import BY_NAME
from lorascope.study import Study, run_stages, verify

STAGES = [BY_NAME[name] for name in ("prepare", "baselines", "train", "represent", "drift", "weights")]
TUNED = [BY_NAME[name] for name in ("prepare", "tune", "train")]
TIMING = ("train_seconds", "train_tokens_per_second", "peak_rss_bytes", "peak_rss_added_bytes")
# one file of each kind of artifact, and the stamped output (unit) it belongs to
ARTIFACTS = {
    "run weights": ("runs/sst2/full/seed42/model.safetensors", "runs/sst2/full/seed42"),
    "adapter": ("runs/sst2/lora/seed42/adapter_model.safetensors", "runs/sst2/lora/seed42"),
    "predictions": ("runs/sst2/lora/seed42/predictions.csv", "runs/sst2/lora/seed42"),
    "features": ("features/sst2/base.safetensors", "features/sst2/base.safetensors"),
    "baseline": ("baselines/sst2/head_only/metrics.json", "baselines/sst2/head_only"),
    "prepared splits": ("prepared/sst2/meta.json", "prepared/sst2"),
    "table": ("tables/weights.csv", "tables/weights.csv"),
}


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 10)])
    else:
        path.unlink()


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Each stamp's identity: rewritten (atomically, so a new inode) when its output is redone."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob(".*.fingerprint"))
    }


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_csv(root / "tables" / f"{name}.csv").drop(columns=list(TIMING), errors="ignore")
        for name in ("performance", "baselines", "drift_layers", "weights")
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_study_config):
    config = tiny_study_config("runtime.workers=1", "runtime.threads=1")
    root = tmp_path_factory.mktemp("intact") / "study"
    run_stages(config, root, STAGES)
    return config, root


@pytest.mark.parametrize("how", ["truncated", "deleted"])
@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_a_damaged_artifact_is_found_and_only_its_unit_redone(finished, tmp_path, kind, how, capsys):
    config, intact = finished
    root = tmp_path / "study"
    shutil.copytree(intact, root)
    name, unit = ARTIFACTS[kind]
    _damage(root / name, how)

    problems, _, _ = verify(root)
    assert len(problems) == 1 and problems[0].startswith(name), problems
    assert main(["verify", str(root)]) == 1
    assert name in capsys.readouterr().out

    before = _stamps(root)
    run_stages(config, root, STAGES)
    assert f"{name} " in capsys.readouterr().err  # one line names the file
    after = _stamps(root)
    unit_stamp = str(Path(unit).with_name(f".{Path(unit).name}.fingerprint"))
    assert {k for k in after if after[k] != before[k]} == {unit_stamp}
    for table, frame in _tables(root).items():
        pd.testing.assert_frame_equal(frame, _tables(intact)[table], obj=table)
    assert verify(root)[0] == [] and main(["verify", str(root)]) == 0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_study_config):
    """LoRA runs trained with the best of a two-trial search kept in the study's own storage."""
    config = tiny_study_config(
        "runtime.workers=1",
        "runtime.threads=1",
        "methods=[lora]",
        "tune.enabled=true",
        "tune.trials=2",
        "tune.startup_trials=1",
    )
    root = tmp_path_factory.mktemp("tuned") / "study"
    run_stages(config, root, TUNED)
    return config, root


def _tuned_copy(tuned, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "study"
    shutil.copytree(tuned[1], root)
    _damage(root / "tune" / "optuna.db", how)
    return root


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_damaged_tuning_storage_is_found_and_its_searches_redone(tuned, tmp_path, how, capsys):
    """The study's own storage no longer holds the finished trials tuned/sst2_lora.yaml records:
    verify names it, and the run redoes that search from nothing. It reaches the same trials (each
    is seeded), so the tuned file is rewritten with the same values and the run trained with them
    is kept."""
    config, intact = tuned
    root = _tuned_copy(tuned, tmp_path, how)

    problems, _, _ = verify(root)
    assert len(problems) == 1 and problems[0].startswith("tune/optuna.db "), problems
    assert main(["verify", str(root)]) == 1
    assert "tune/optuna.db " in capsys.readouterr().out

    before = _stamps(root)
    run_stages(config, root, TUNED)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("tune/optuna.db ")]
    after = _stamps(root)
    assert {k for k in after if after[k] != before[k]} == {"tuned/.sst2_lora.yaml.fingerprint"}
    trials = [pd.read_csv(r / "tables" / "trials.csv").drop(columns=["duration_s", "worker"]) for r in (root, intact)]
    pd.testing.assert_frame_equal(*trials)
    redone, first = (yaml.safe_load((r / "tuned" / "sst2_lora.yaml").read_text()) for r in (root, intact))
    assert redone.pop("storage") != first.pop("storage")  # the copy's own file; the same search otherwise
    assert redone == first and first["own_storage"] == "tune/optuna.db"
    assert verify(root)[0] == [] and main(["verify", str(root)]) == 0


def test_a_storage_given_is_never_checked_or_deleted(tuned, tmp_path):
    """With --storage (or tune.storage) the study's own file is not the one searched: the current
    tuned files are kept and the damaged file is left as it is (verify still names it)."""
    config, _ = tuned
    root = _tuned_copy(tuned, tmp_path, "truncated")
    damaged = (root / "tune" / "optuna.db").read_bytes()
    given = tmp_path / "shared.journal"
    records = tuning.tune_study(Study(root), config, storage=str(given))
    assert records["sst2", "lora"]["trials"]["complete"] == 2 and not given.exists()
    assert (root / "tune" / "optuna.db").read_bytes() == damaged
    assert verify(root)[0][0].startswith("tune/optuna.db ")


def test_an_intact_study_verifies_and_reuses_everything(finished, capsys):
    config, root = finished
    before = _stamps(root)
    problems, outputs, size = verify(root)
    assert problems == [] and outputs == len(before) and size > 0
    run_stages(config, root, STAGES)
    assert _stamps(root) == before


def test_the_record_names_every_file_with_its_size_and_digest(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "out" / "sub" / "b.bin").write_bytes(b"")
    recorded = integrity.record(tmp_path / "out")
    assert recorded == {
        "out/a.bin": [10, integrity.digest(tmp_path / "out" / "a.bin")],
        "out/sub/b.bin": [0, integrity.digest(tmp_path / "out" / "sub" / "b.bin")],
    }
    assert integrity.damage(tmp_path / "out", recorded) is None
    (tmp_path / "out" / "a.bin").write_bytes(b"y" * 10)  # same size, other content
    assert "other content" in integrity.damage(tmp_path / "out", recorded)


def test_a_full_disk_stops_at_the_first_failed_write_leaves_nothing_partial_and_resumes(
    tiny_study_config, tmp_path, monkeypatch
):
    """Writes failing with ENOSPC (as safetensors reports it) stop the study at the first run
    instead of failing every run in turn; no half-written run and no failed run is left; the
    rerun trains everything."""
    import errno

    from lorascope import runs
    from lorascope.errors import DiskFull

    config = tiny_study_config("runtime.workers=1")
    stages = [BY_NAME["prepare"], BY_NAME["train"]]
    run_stages(config, tmp_path, stages[:1])
    calls = []

    def full_disk(setup, splits, tokenizer, scratch):
        calls.append(setup.method)
        (scratch / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "train_run", full_disk)
    with pytest.raises(DiskFull, match=r"no space left on the device while writing .*runs/sst2/\w+/seed42 \("):
        run_stages(config, tmp_path, stages)
    assert len(calls) == 1
    assert not list(tmp_path.rglob(".partial-*"))  # the half-written run folder is gone
    assert not list(tmp_path.glob("runs/*/*/*/metrics.json"))  # and no run is recorded as failed
    monkeypatch.undo()
    run_stages(config, tmp_path, stages)
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 2
    assert pd.read_csv(tmp_path / "tables" / "performance.csv")["status"].eq("ok").all()


def test_a_study_that_will_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """The smoke study needs about 290 MB (294 MB written); with 100 MB free it stops at once
    with both figures, and with 300 MB free it warns."""
    import collections

    from lorascope import preflight
    from lorascope.config_io import load_config

    need = preflight.disk_need(load_config(None, "smoke"))
    assert 250e6 < need < 330e6
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(0, 0, 100_000_000))
    out = tmp_path / "study"
    assert main(["run", "--profile", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"about {need / 1e6:,.0f} MB still to write, 100 MB free at {out}" in err[0]
    assert not out.exists()
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(0, 0, int(need * 1.1)))
    preflight.check_disk(load_config(None, "smoke"), out)
    assert capsys.readouterr().err.startswith("warning: the study may not fit")
