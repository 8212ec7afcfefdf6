"""Stage `prepare`: tokenized train / dev / eval / probe splits of every task, then the sizes
the later stages' measures need, checked against them before anything is trained."""

import numpy as np

from lorascope import dependencies, preflight
from lorascope.config import StudyConfig
from lorascope.prepared import load_prepared, prepare_tasks
from lorascope.stages.forgetting import probe_examples
from lorascope.study import Stage, Study


def run(study: Study, config: StudyConfig) -> None:
    """Prepare every task; then refuse (InputError) the sizes a later measure cannot work with,
    and represent.layers the model lacks, so a study never stops after training for what the
    splits already told (preflight)."""
    prepare_tasks(study, config)
    preflight.check_layers(config)
    probed = preflight.probed_tasks(config)
    preflight.check_sizes(config, {name: split_sizes(study, config, name, name in probed) for name in config.tasks})


def split_sizes(study: Study, config: StudyConfig, name: str, probed: bool) -> preflight.SplitSizes:
    """One prepared task's sizes as the checks read them: the forgetting probe's training rows
    are the ones the forget stage will take (stages.forgetting.probe_examples), by class."""
    task, splits = load_prepared(study, name)
    classes = None
    if probed:
        rows, n_train = probe_examples(splits, config)
        counts = np.bincount(np.asarray(rows["label"])[:n_train], minlength=task.num_labels)
        classes = {label: int(count) for label, count in zip(task.label_names, counts) if count}
    return preflight.SplitSizes(eval=len(splits["eval"]), probe=len(splits["probe"]), probe_train=classes)


STAGE = Stage("prepare", "load, check, split and tokenize the tasks", run=run, outputs=(dependencies.PREPARED,))
