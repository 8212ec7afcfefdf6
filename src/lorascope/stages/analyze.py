"""Stage `analyze`: statistics across seeds, flagged runs and the verdict (lorascope.analysis),
the methods side by side (lorascope.method_table), and the question-answering tables of
generative tasks (lorascope.answers), from whatever tables and predictions exist."""

from lorascope.analysis import analyze
from lorascope.answers import write_answer_tables
from lorascope.config import StudyConfig
from lorascope.method_table import write_method_table
from lorascope.study import Stage, Study


def run(study: Study, config: StudyConfig) -> None:
    """The analysis tables, then the QA breakdown, which reads run predictions, not tables, so
    it is written even where no run has trained yet (baselines alone)."""
    analyze(study, config)
    write_method_table(study, config)
    write_answer_tables(study, config)


STAGE = Stage("analyze", "statistics across seeds, flagged runs, verdict", run=run, standalone=True)
