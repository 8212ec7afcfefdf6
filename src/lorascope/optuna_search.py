"""The Optuna parts a search is made of: the TPE sampler seeded per trial, the pruner, and the
callback that hands the Trainer's dev evaluations to a trial."""

from __future__ import annotations

import hashlib

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from lorascope.config import StudyConfig


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE with a random generator seeded for each trial from (seed, the number of earlier trials
    that count: all but surplus trials and killed or interrupted trials that were queued again).
    TPE keeps no other state (the history comes from the storage), so the k-th trial gets the
    same parameters whether the search ran in one go or was killed and resumed (the rerun of the
    killed trial takes its place); trials that workers create at the same moment have different
    numbers, so different seeds, so different parameters."""

    def __init__(self, seed: int, startup_trials: int):
        self.seed, self.startup_trials = seed, startup_trials
        self._tpe = self._seeded(0)

    def _seeded(self, index: int) -> optuna.samplers.TPESampler:
        digest = hashlib.sha256(f"{self.seed}/{index}".encode()).digest()
        seed = int.from_bytes(digest[:4], "little")
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials)

    def before_trial(self, study, trial) -> None:
        trials = study.get_trials(deepcopy=False)
        rerun = rerun_numbers(trials)
        skipped = {t.number for t in trials if t.state == TrialState.FAIL and (t.number in rerun or is_surplus(t))}
        self._tpe = self._seeded(sum(t.number < trial.number and t.number not in skipped for t in trials))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def rerun_numbers(trials) -> set[int]:
    """Numbers of the trials that were interrupted or failed as stale and queued again (by
    lorascope, or by Optuna's RetryHeartbeatStaleTrialCallback on RDB storages)."""
    numbers = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return numbers | {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def is_surplus(trial) -> bool:
    return bool(trial.user_attrs.get("surplus"))


def pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    tune = config.tune
    if not tune.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune.prune_startup_trials, n_warmup_steps=tune.prune_warmup_steps
    )


class DevReporter(TrainerCallback):
    """Hands each dev evaluation of training.DevSelection (it logs `dev_<metric>` at the step it
    evaluated) to the Optuna trial, and stops a trial the pruner finds poor. Must come after
    DevSelection in the Trainer's callbacks."""

    def __init__(self, trial: optuna.Trial, metric: str, prune: bool):
        self.trial, self.key, self.prune = trial, f"dev_{metric}", prune
        self.reported: set[int] = set()

    def on_step_end(self, args, state, control, **_):
        self._report(state, may_prune=True)

    def on_epoch_end(self, args, state, control, **_):
        self._report(state, may_prune=True)

    def on_train_end(self, args, state, control, **_):
        self._report(state, may_prune=False)  # the last evaluation; nothing left to save by stopping

    def _report(self, state, may_prune: bool) -> None:
        entry = state.log_history[-1] if state.log_history else {}
        step = entry.get("step")
        if self.key not in entry or step != state.global_step or step in self.reported:
            return
        self.reported.add(step)
        self.trial.report(entry[self.key], step)
        if may_prune and self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.key} {entry[self.key]:.4f} at step {step} is below the median")
