"""Sizes checked before training: a study whose splits are too small for a measure stops at
validation or after `prepare` with one line naming the setting (exit 2), never after training;
and over small grids a study either refuses so or finishes (a property test)."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from conftest import GLUE
from lorascope import preflight
from lorascope.cli import main
from lorascope.config_io import load_config, to_yaml
from lorascope.errors import InputError
from lorascope.report import loader
from lorascope.report.figures import png_bytes
from lorascope.stages import BY_NAME
from lorascope.study import run_stages

# The whole study on every example, shrunk to seconds: one training step a run (batch 64 holds
# any train split here), two probe folds, few resamples, one thread, no serving (deploy has no
# size it could fail on: its request stream wraps around the eval examples).
SHRUNK = (
    "model.max_length=24",
    "training.lora.batch_size=64",
    "training.full.batch_size=64",
    "training.head.batch_size=64",
    "baselines.head_only=false",
    "baselines.overfit_steps=1",
    "drift.bootstrap=10",
    "forget.bootstrap=10",
    "forget.folds=2",
    "forget.lm=false",
    "analysis.bootstrap=50",
    "deploy.enabled=false",
    "runtime.workers=1",
    "runtime.threads=1",
)
TABLES = ("performance", "baselines", "drift_layers", "weights", "forgetting", "statistics", "verdict")


@pytest.fixture(scope="module")
def custom_task(tmp_path_factory) -> str:
    """A custom single-sentence task from files, 4:1 imbalanced (SST-2 sentences), so small dev
    splits leave a class of the forgetting probe short."""
    folder = tmp_path_factory.mktemp("custom")
    for split, rows in (("train", 300), ("validation", 80)):
        frame = pd.read_parquet(GLUE / "sst2" / f"{split}-00000-of-00001.parquet")
        few = pd.concat([frame[frame["label"] == 1].head(rows * 4 // 5), frame[frame["label"] == 0].head(rows // 5)])
        few[["sentence", "label"]].to_csv(folder / f"{split}.csv", index=False)
    return (
        f"{{source: {folder / 'train.csv'}, eval_source: {folder / 'validation.csv'}, text: sentence, "
        "label_names: [negative, positive]"
    )


def _task(kind: str, custom: str, train: int, evaluation: int, dev: int) -> str:
    """The `tasks` override of one drawn task: a GLUE pair task, or the custom single-sentence one."""
    sizes = f"train_max: {train}, eval_max: {evaluation}, dev_max: {dev}"
    return f"tasks={{mine: {custom}, {sizes}}}}}" if kind == "custom" else f"tasks={{{kind}: {{{sizes}}}}}"


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _study(config, folder: Path, overrides: list[str]) -> tuple[int, str, Path]:
    """`lorascope run` of `config` with `overrides` into folder/study: (exit code, stderr, the study)."""
    config_file = folder / "study.yaml"
    config_file.write_text(to_yaml(config))
    out = folder / "study"
    code, err = _run(["run", str(config_file), "--out", str(out), *itertools.chain(*(("--set", o) for o in overrides))])
    return code, err, out


def _finished(code: int, err: str, out: Path) -> None:
    assert code == 0, err
    for table in TABLES:
        assert (out / "tables" / f"{table}.csv").is_file(), table
    assert (out / "report.md").is_file()


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["rte", "custom"]),
    train=st.integers(2, 64),
    evaluation=st.integers(2, 64),
    dev=st.integers(2, 16),
    seeds=st.integers(1, 3),
)
def test_a_small_study_refuses_before_training_or_finishes(
    tiny_study_config, custom_task, tmp_path_factory, kind, train, evaluation, dev, seeds
):
    """Train and eval splits of 2 to 64 examples, dev of 2 to 16, one to three seeds, a GLUE pair
    task or a custom single-sentence one: `lorascope run` either refuses with one line before
    anything is trained (exit 2) or writes every table and the report (exit 0). The report's
    figures are built but not drawn (each is saved as one blank PNG: drawing took two thirds of
    a study's time here); the test below draws them at the smallest sizes that pass."""
    overrides = [*SHRUNK, _task(kind, custom_task, train, evaluation, dev), f"seeds={list(range(1, seeds + 1))}"]
    with pytest.MonkeyPatch.context() as patch:
        blank = png_bytes(Figure(figsize=(0.1, 0.1)))
        patch.setattr(loader, "png_bytes", lambda figure: blank)
        code, err, out = _study(tiny_study_config(), tmp_path_factory.mktemp("small"), overrides)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
        assert not (out / "runs").exists() and not (out / "baselines").exists(), err  # nothing trained
        event("refused after prepare" if out.exists() else "refused at validation")
        return
    _finished(code, err, out)
    event("finished")


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_smallest_study_that_passes_writes_its_report(tiny_study_config, tmp_path, seeds):
    """Two training examples, four eval (debiased CKA's least) and four dev examples (two of each
    class for the forgetting probe), figures rendered."""
    overrides = [*SHRUNK, _task("rte", "", 2, 4, 4), f"seeds={list(range(1, seeds + 1))}"]
    _finished(*_study(tiny_study_config(), tmp_path, overrides))
    assert len(list((tmp_path / "study" / "figures").glob("report_*.png"))) >= 3


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "data.probe_size=3",
            "tasks.sst2: drift needs at least 4 probe examples for debiased CKA; data.probe_size=3 allows fewer: "
            "raise it, or leave debiased_cka out of drift.measures",
        ),
        ("tasks.sst2.eval_max=1", "tasks.sst2.eval_max=1 allows fewer: raise it"),
        (
            "data.dev_max=3",
            "tasks.sst2: the forgetting probe needs 2 dev examples of each of two classes or more; data.dev_max=3 "
            "allows fewer: raise it, or leave sst2 out of forget.tasks",
        ),
        ("forget.probe_train=2", "forget.probe_train=2 allows fewer: raise it"),
    ],
)
def test_sizes_the_config_rules_out_are_refused_at_validation(tiny_study_config, setting, message):
    with pytest.raises(InputError, match=re.escape(message)):
        tiny_study_config(setting)


def test_without_debiased_cka_drift_needs_two_probe_examples(tiny_study_config):
    config = tiny_study_config("data.probe_size=2", "drift.measures=[linear_cka, cosine]")
    assert preflight.probe_need(config)[0] == 2
    with pytest.raises(InputError, match=re.escape("drift needs at least 2 probe examples; data.probe_size=1 allows")):
        tiny_study_config("data.probe_size=1", "drift.measures=[linear_cka, cosine]")


def test_splits_too_small_for_a_measure_are_refused_after_prepare(tiny_study_config, custom_task, tmp_path):
    """The custom task's 4:1 dev split of 4 examples holds one of the rarer class: the forgetting
    probe could not cross-validate, which the forget stage would find only after training."""
    config = tiny_study_config(_task("custom", custom_task, 32, 32, 4))
    with pytest.raises(InputError) as refused:
        run_stages(config, tmp_path, [BY_NAME["prepare"], BY_NAME["train"]])
    assert str(refused.value) == (
        "tasks.mine: the forgetting probe trains on 1 negative, 3 positive dev example(s); it needs at least 2 of "
        "each of two classes or more: raise forget.probe_train, data.dev_max (tasks.mine.dev_max) or "
        "data.dev_fraction, or leave mine out of forget.tasks"
    )
    assert not (tmp_path / "runs").exists()
    run_stages(tiny_study_config(_task("custom", custom_task, 32, 32, 8)), tmp_path, [BY_NAME["prepare"]])  # 6 and 2


def test_an_eval_split_smaller_than_the_probe_needs_is_refused_after_prepare():
    sizes = {"mine": preflight.SplitSizes(eval=3, probe=3, probe_train={"a": 2, "b": 2})}
    config = load_config(None, "smoke")
    with pytest.raises(InputError, match=r"^tasks.mine: the eval split holds 3 example\(s\), so the probe split 3; "):
        preflight.check_sizes(config, sizes)
    preflight.check_sizes(config, {"mine": preflight.SplitSizes(eval=4, probe=4, probe_train=None)})


def test_layers_the_model_lacks_are_refused_before_training(tiny_study_config, tmp_path):
    config = tiny_study_config("represent.layers=[0, 3]")
    with pytest.raises(InputError, match=r"represent.layers: \[3\] out of range; this model has layers 0..2"):
        run_stages(config, tmp_path, [BY_NAME["prepare"], BY_NAME["train"]])
    assert not (tmp_path / "runs").exists()


def test_the_docs_list_every_size_check():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "study-directory.md").read_text()
    section = docs[docs.index("## Sizes checked before training") :]
    for setting in ("data.probe_size", "forget.probe_train", "baselines.overfit_examples", "seeds"):
        assert setting in section, setting
