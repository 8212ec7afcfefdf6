"""Stage `analyze`: statistics across seeds, flagged runs and the verdict (lorascope.analysis),
from whatever tables exist."""

from lorascope.analysis import analyze
from lorascope.study import Stage

STAGE = Stage("analyze", "statistics across seeds, flagged runs, verdict", run=analyze, standalone=True)
