"""The study's stages in run order, one module each, named after its concern as the library
module and the report section that go with it (stage `forget`: stages/forgetting.py); the
CLI builds its subcommands and the run order from `STAGES`."""

from __future__ import annotations

from lorascope.stages import (
    analyze,
    baselines,
    deploy,
    drift,
    forgetting,
    prepare,
    report,
    representations,
    train,
    tune,
    weights,
)
from lorascope.study import Stage

STAGES: tuple[Stage, ...] = tuple(
    m.STAGE
    for m in (prepare, baselines, tune, train, representations, drift, weights, forgetting, deploy, analyze, report)
)
BY_NAME = {stage.name: stage for stage in STAGES}


def with_inputs(name: str) -> list[Stage]:
    """`name` and, unless it is standalone, every stage it needs (transitively), in run order."""
    wanted, todo = set(), [name]
    while todo:
        stage = BY_NAME[todo.pop()]
        if stage.name not in wanted:
            wanted.add(stage.name)
            todo += [] if stage.standalone else list(stage.needs)
    return [stage for stage in STAGES if stage.name in wanted]
