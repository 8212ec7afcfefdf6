"""What the report reads: config, manifest and every table, through the records their writers
declare (lorascope.study.Table), so the report is tested on the formats that are produced."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from lorascope.analysis import DRIFT_STATISTICS, FLAGS, VERDICT
from lorascope.answers import ANSWER_EXAMPLES, ANSWERS
from lorascope.atomic import atomic_write
from lorascope.comparisons import STATISTICS
from lorascope.drift import DRIFT_LAYERS, DRIFT_SUMMARY
from lorascope.forgetting import FORGET_CORRELATION, FORGET_DRIFT, FORGET_STATISTICS, FORGETTING, LM_FORGETTING
from lorascope.method_table import METHODS
from lorascope.report.document import slug
from lorascope.report.figures import ordered, png_bytes
from lorascope.representations import POOLED_POSITIONS
from lorascope.runs import BASELINES, PERFORMANCE
from lorascope.serving.checks import DEPLOYMENT_CHECKS
from lorascope.serving.generation_grid import DEPLOYMENT_GENERATION
from lorascope.serving.grid import DEPLOYMENT
from lorascope.serving.memory import DEPLOYMENT_MEMORY
from lorascope.study import Study, Table
from lorascope.tuning import TRIALS
from lorascope.weights import WEIGHTS

TABLES: tuple[Table, ...] = (
    PERFORMANCE,
    BASELINES,
    ANSWERS,
    ANSWER_EXAMPLES,
    FLAGS,
    STATISTICS,
    VERDICT,
    METHODS,
    DRIFT_LAYERS,
    DRIFT_SUMMARY,
    DRIFT_STATISTICS,
    POOLED_POSITIONS,
    WEIGHTS,
    FORGETTING,
    LM_FORGETTING,
    FORGET_STATISTICS,
    FORGET_DRIFT,
    FORGET_CORRELATION,
    DEPLOYMENT,
    DEPLOYMENT_MEMORY,
    DEPLOYMENT_CHECKS,
    DEPLOYMENT_GENERATION,
    TRIALS,
)
FIGURE_PREFIX = "report_"  # figures this package owns; others' figures are never touched
ANALYZE = "run `lorascope analyze STUDY`"


@dataclass
class StudyView:
    """A study directory as the report sees it. `tables[name]` is None when the table is
    missing, and `why[name]` says why."""

    study: Study
    config: dict
    manifest: dict
    tables: dict[str, pd.DataFrame | None]
    why: dict[str, str]
    figures: list[Path] = field(default_factory=list)  # drawn by this report

    @property
    def root(self) -> Path:
        return self.study.root

    @property
    def confidence(self) -> float:
        return float((self.config.get("analysis") or {}).get("confidence", 0.95))

    def need(self, *names: str) -> str | None:
        """None when every table exists, else the reason the first missing one is missing."""
        for name in names:
            if self.tables.get(name) is None:
                return self.why[name]
        return None

    def tasks(self, table: pd.DataFrame) -> list[str]:
        """The tasks of `table` in the config's order."""
        return ordered(table["task"].dropna().astype(str), list(self.config.get("tasks") or {}))

    def save(self, fig, name: str) -> Path:
        """A figure drawn by the report, as figures/report_<name>.png."""
        path = self.study.figures / f"{FIGURE_PREFIX}{slug(name).replace('-', '_')}.png"
        atomic_write(path, png_bytes(fig))
        self.figures.append(path)
        return path

    def other_figures(self, pattern: str) -> list[Path]:
        """Figures drawn by other stages (tune_*.png, ...), embedded as they are."""
        folder = self.study.figures
        return (
            [p for p in sorted(folder.glob(pattern)) if not p.name.startswith(FIGURE_PREFIX)] if folder.is_dir() else []
        )


def load(root: Path) -> StudyView:
    study = Study(root)
    config_path, manifest_path = root / "config.yaml", root / "manifest.json"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    tables, why = {}, {}
    for table in TABLES:
        tables[table.name] = table.read(study.tables)
        why[table.name] = "" if tables[table.name] is not None else f"tables/{table.file} missing or empty"
    if tables["flags"] is not None:
        tables["flags"]["flagged"] = tables["flags"]["flagged"].astype(bool)
    return StudyView(study, config, manifest, tables, why)
