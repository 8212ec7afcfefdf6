"""The study's report: `report.md` and a self-contained `report.html`, verdict first.

loader reads the study through the tables' own records; the section modules only render
(quality, answers, methods, cost, representation, forgetting, deployment, generation serving, provenance,
reference); figures draws them; document holds the blocks and their two renderings. Nothing here
trains, times or recomputes a statistic: every number comes from a table an earlier stage wrote,
and a missing table turns its section into "not run" (generation serving, which only studies that
served a generative task have, is left out instead)."""

from __future__ import annotations

from pathlib import Path

from lorascope.atomic import atomic_write
from lorascope.report import answers, quality
from lorascope.report.cost import cost_section
from lorascope.report.deployment import deployment_section
from lorascope.report.document import Document, to_html, to_markdown
from lorascope.report.figures import use_method_colors
from lorascope.report.forgetting import forgetting_section
from lorascope.report.generation_serving import generation_section
from lorascope.report.loader import FIGURE_PREFIX, load
from lorascope.report.methods import methods_section
from lorascope.report.provenance import hparams_section, provenance_section
from lorascope.report.reference import load_reference, reference_section
from lorascope.report.representations import drift_section, weights_section

__all__ = ["load_reference", "write_report"]


def write_report(study_root: Path | str) -> tuple[Path, Path]:
    """Write `report.md` and a self-contained `report.html` for a study directory; returns their
    paths. Works on any partial study: a missing input makes its section read "not run"."""
    root = Path(study_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    view = load(root)
    use_method_colors(view.config.get("methods") or [])
    sections = [  # (name, render, why it is not run)
        ("verdict", quality.verdict_section, view.need("verdict")),
        ("task performance", quality.performance_section, view.need("flags")),
        ("question answering", answers.answers_section, answers.missing(view)),
        ("method comparison", quality.comparison_section, quality.comparisons(view)[1] or None),
        ("methods", methods_section, view.need("methods")),
        ("training cost", cost_section, view.need("performance")),
        ("drift", drift_section, view.need("drift_layers")),
        ("weight-space change", weights_section, view.need("weights")),
        ("forgetting", forgetting_section, view.need("forgetting")),
        ("deployment", deployment_section, view.need("deployment")),
        ("generation serving", generation_section, None),  # only for studies that served generation
        ("hyperparameters", hparams_section, None),
        ("reference study", reference_section, None),
        ("provenance", provenance_section, None if view.manifest else "manifest.json missing"),
    ]
    name = view.config.get("name") or root.name
    doc = Document()
    doc.heading(1, f"lorascope report — {name}")
    doc.para(quality.summary(view, [s for s, _, missing in sections if missing]), css="summary")
    for _, render, _ in sections:
        render(doc, view)
    shown = {p.resolve() for p in doc.figure_paths()}
    others = [p for p in view.other_figures("*.png") if p.resolve() not in shown]
    if others:
        doc.heading(2, "Other figures")
        for path in others:
            doc.figure(path, f"figures/{path.name}")
    for stale in view.study.figures.glob(f"{FIGURE_PREFIX}*.png") if view.study.figures.is_dir() else []:
        if stale not in view.figures:
            stale.unlink(missing_ok=True)
    md_path, html_path = root / "report.md", root / "report.html"
    atomic_write(md_path, to_markdown(doc, root))
    atomic_write(html_path, to_html(doc, f"lorascope report — {name}"))
    return md_path, html_path
