"""Stage `report`: report.md and a self-contained report.html from whatever the study holds."""

from lorascope.config import StudyConfig
from lorascope.report import write_report
from lorascope.study import Stage, Study


def run(study: Study, config: StudyConfig) -> None:
    write_report(study.root)


STAGE = Stage("report", "report.md and a self-contained report.html", run=run, standalone=True)
