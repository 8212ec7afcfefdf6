"""How the report writes numbers: one function per kind, "—" for a value that is missing."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lorascope.report.figures import finite


def num(x: Any, digits: int = 4) -> str:
    return f"{float(x):.{digits}f}" if finite(x) else "—"


def pm(mean: Any, sd: Any, digits: int = 4) -> str:
    if not finite(mean):
        return "—"
    return f"{float(mean):.{digits}f} ± {float(sd):.{digits}f}" if finite(sd) else f"{float(mean):.{digits}f}"


def interval(low: Any, high: Any, digits: int = 4, unit: str = "") -> str:
    return f"[{num(low, digits)}, {num(high, digits)}]{unit}" if finite(low) and finite(high) else "—"


def p_value(p: Any) -> str:
    if not finite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def seconds(s: Any) -> str:
    if not finite(s):
        return "—"
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def value(v: Any) -> str:
    """A config or hyperparameter value."""
    if v is None:
        return "None"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(value(x) for x in v) or "[]"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def cell(v: Any) -> str:
    """A raw table cell: 4 significant digits for floats."""
    if isinstance(v, (float, np.floating)):
        if not finite(v):
            return "—"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def truthy(v: Any) -> bool:
    """A boolean cell as pandas reads it back from CSV (True, 'True', 1.0)."""
    return str(v).strip().lower() in ("true", "1", "1.0")
