"""Stage `prepare`: tokenized train / dev / eval / probe splits of every task."""

from lorascope import dependencies
from lorascope.prepared import prepare_tasks
from lorascope.study import Stage

STAGE = Stage(
    "prepare", "load, check, split and tokenize the tasks", run=prepare_tasks, outputs=(dependencies.PREPARED,)
)
