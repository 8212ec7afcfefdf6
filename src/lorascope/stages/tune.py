"""Stage `tune` (optional, tune.enabled): the Optuna search per task x method on dev;
`lorascope tune` runs it regardless."""

from lorascope import dependencies
from lorascope.config import StudyConfig
from lorascope.study import Stage, Study
from lorascope.tuning import tune_study


def run(study: Study, config: StudyConfig) -> None:
    if config.tune.enabled:
        tune_study(study, config)


STAGE = Stage(
    "tune",
    "Optuna search per task x method on the dev split",
    run=run,
    needs=("prepare",),
    outputs=(dependencies.SEARCH,),
)
