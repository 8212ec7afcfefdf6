"""Report sections on the verdict and task quality: the summary line, the verdict table, task
performance per seed with baselines, and the method comparison. All numbers come from the
analyze stage's tables (flags, statistics, verdict)."""

from __future__ import annotations

import itertools
from typing import Any

import pandas as pd

from lorascope.analysis import FORGETTING_CRITERION
from lorascope.comparisons import DIFFERENCE, pair_name
from lorascope.report import format as fmt
from lorascope.report.document import NOT_RUN, Document
from lorascope.report.figures import finite, method_label, method_order, performance_figure
from lorascope.report.loader import ANALYZE, StudyView
from lorascope.stats import describe

# {a}: the method judged, {b}: the reference it is judged against
CRITERIA = {
    "quality": ("quality gap: {b} − {a} (one-sided)", "pp"),
    "drift": ("drift reduction: 1 − mean drift({a}) / mean drift({b}), drift = 1 − CKA", "%"),
    "deployment": (
        "deployment: separate-adapter serving overhead, one example a request (measure, engine: its rule)",
        "%",
    ),
    "generation throughput": ("generation throughput: separate / merged output tokens/s, most clients (shown)", ""),
    FORGETTING_CRITERION: ("forgetting: {a} − {b}, probe accuracy lost on the other tasks", "pp"),
    "recommended": ("**{a} recommended** = quality and (drift or deployment)", ""),
}
DIRECTION = {"at most": "≤", "at least": "≥"}


def _outcome_cell(r) -> tuple[str, str]:
    text = str(r.outcome) if isinstance(r.outcome, str) else NOT_RUN
    if text == "inconclusive" and finite(r.seeds_needed):
        span = (
            f"{int(r.seeds_needed_low)}–{int(r.seeds_needed_high)}"
            if finite(r.seeds_needed_high)
            else f"{int(r.seeds_needed_low) if finite(r.seeds_needed_low) else '?'}–>1000"
        )
        text = f"inconclusive; at this spread ~{int(r.seeds_needed)} seed pairs would decide it ({span})"
    elif text == "inconclusive" and finite(r.n) and not finite(r.seeds_needed):
        text = "inconclusive; at this spread more than 1000 seed pairs, or none, would decide it"
    return text, {"met": "met", "not met": "notmet", "inconclusive": "inconclusive", "shown": "shown"}.get(
        str(r.outcome), "notrun"
    )


def _label(criterion: str, method: str, reference: str) -> tuple[str, str]:
    if criterion in CRITERIA:
        label, unit = CRITERIA[criterion]
        return label.format(a=method_label(method), b=method_label(reference)), unit
    if criterion.startswith("quality ("):
        return f"quality gap on {criterion[9:-1]} (shown, not a criterion)", "pp"
    if criterion.startswith("failure rate "):
        return f"failure rate, {method_label(criterion.rsplit(' ', 1)[1])} (flagged / runs)", "%"
    return criterion, ""


def _criterion_number(value: Any, unit: str) -> str:
    if not finite(value):
        return "—"
    if unit == "%":
        return f"{100 * float(value):.1f} %"
    if unit == "pp":
        return f"{float(value):.2f} pp"
    return f"{float(value):.4g}"


def verdict_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Verdict")
    missing = view.need("verdict")
    if missing:
        doc.not_run(f"{missing} (the analyze stage writes it)")
        return
    verdict = view.tables["verdict"]
    reference = _reference(view)
    rows, rules = [], {}
    for task in view.tasks(verdict):
        for r in verdict[verdict["task"] == task].itertuples():
            label, unit = _label(r.criterion, str(getattr(r, "method", "lora")), reference)
            if isinstance(r.rule, str):
                rules.setdefault((r.criterion, r.rule), []).append(task)
            if r.criterion == "recommended":
                rows.append([f"**{task}**", label, "", "", "", _outcome_cell(r)])
                continue
            threshold = (
                f"{DIRECTION.get(r.direction, str(r.direction))} {_criterion_number(r.threshold, unit)}"
                if finite(r.threshold)
                else ""
            )
            low_high = (
                f"[{_criterion_number(r.ci_low, unit)}, {_criterion_number(r.ci_high, unit)}]"
                if finite(r.ci_low) and finite(r.ci_high)
                else "—"
            )
            rows.append([task, label, _criterion_number(r.value, unit), low_high, threshold, _outcome_cell(r)])
    doc.table(
        ["task", "criterion", "value", f"{view.confidence:.0%} interval", "threshold", "outcome"], rows, css="verdict"
    )
    doc.para(
        "**met** — the whole interval is on the good side of the threshold; **not met** — the whole interval "
        "is on the wrong side; **inconclusive** — the interval straddles the threshold (or one value gives "
        "no interval); **not run** — the inputs for the criterion do not exist; **shown** — a row that "
        "informs and is not part of the verdict. The threshold itself counts as met. The drift criterion is "
        "decided by the paired contrast in its rule, which tests it without a ratio; its interval is "
        "Fieller's for the ratio of mean drifts.",
        css="note",
    )
    doc.para(
        "**Seeds needed**: for an inconclusive criterion, the number of seed pairs at which its t-interval "
        "would clear the threshold if the mean and the spread stayed as observed (t-distribution, not the "
        "normal); in brackets the same number at the ends of the 95 % confidence interval of the spread. "
        "It is an estimate from few seeds: the spread of three values is uncertain by a factor of about 0.5 "
        "to 6, and the number of seeds grows with its square.",
        css="note",
    )
    shared = {criterion for (criterion, _), tasks in rules.items() if len(tasks) == len(view.tasks(verdict))}
    doc.bullets(
        f"`{criterion}`" + ("" if criterion in shared else f" ({', '.join(tasks)})") + f": {rule}"
        for (criterion, rule), tasks in rules.items()
    )


def _reference(view: StudyView) -> str:
    """analysis.reference of the study's config: the method every other is judged against."""
    return ((view.config.get("analysis") or {}).get("reference")) or "full"


def _judged_methods(verdict: pd.DataFrame) -> list[str]:
    """The methods verdict.csv judges against the reference, in its order."""
    rows = verdict[(verdict["criterion"] == "recommended") & verdict["method"].notna()] if "method" in verdict else []
    return list(dict.fromkeys(str(m) for m in rows["method"])) if len(rows) else []


def _describe(view: StudyView, task: str, method: str, metric: str, subset: str) -> dict:
    """The analyze stage's n / mean / sd / t-interval row, or the one of no values."""
    table = view.tables["statistics"]
    rows = (
        table[
            (table["kind"] == "describe")
            & (table["task"] == task)
            & (table["method"] == method)
            & (table["metric"] == metric)
            & (table["subset"] == subset)
        ]
        if table is not None
        else []
    )
    return rows.iloc[0].to_dict() if len(rows) else describe([])


def summary(view: StudyView, missing_sections: list[str]) -> str:
    cfg, flags = view.config, view.tables["flags"]
    model = (cfg.get("model") or {}).get("name", "the configured model")
    tasks = list(cfg.get("tasks") or {})
    seeds = cfg.get("seeds") or []
    reference = _reference(view)
    judged = [m for m in (cfg.get("methods") or ["lora"]) if m != reference]
    compared = (
        "LoRA against full fine-tuning"
        if judged == ["lora"] and reference == "full"
        else f"{', '.join(map(method_label, judged))} against {method_label(reference)}"
    )
    parts = [
        f"{compared} of `{model}` on {len(tasks)} task(s) ({', '.join(tasks) or '—'}), "
        f"seeds {', '.join(map(str, seeds)) or '—'}."
    ]
    verdict = view.tables["verdict"]
    if verdict is not None:
        groups: dict[str, list[str]] = {}
        several = len(_judged_methods(verdict)) > 1
        for r in verdict[verdict["criterion"] == "recommended"].itertuples():
            named = f"{r.task} ({method_label(str(r.method))})" if several else str(r.task)
            groups.setdefault(str(r.outcome), []).append(named)
        words = {
            "met": "LoRA is recommended for",
            "not met": "LoRA is not recommended for",
            "inconclusive": "the evidence is inconclusive for",
            NOT_RUN: "criteria were not run for",
        }
        if several:  # each entry names its method
            words = {"met": "recommended:", "not met": "not recommended:", "inconclusive": "inconclusive:"} | {
                NOT_RUN: "not run:"
            }
        said = [f"{words.get(k, k)} {', '.join(v)}" for k, v in groups.items()]
        if said:
            parts.append(
                f"Verdict ({'a method' if several else 'LoRA'} is recommended when its quality is within the "
                f"threshold of {'the reference' if several else 'full FT'} and it drifts less or deploys cheaply): "
                + "; ".join(said)
                + "."
            )
    else:
        parts.append("No verdict yet: the analyze stage has not run.")
    if flags is not None:
        means = []
        for task in view.tasks(flags):
            metric = str(flags.loc[flags["task"] == task, "primary_metric"].iloc[0])
            m = {meth: _describe(view, task, meth, metric, "unflagged")["mean"] for meth in ("lora", "full")}
            if finite(m["lora"]) and finite(m["full"]):
                means.append(f"{task} {metric} {m['lora']:.3f} vs {m['full']:.3f}")
        if means:
            parts.append("Mean primary metric of unflagged runs, LoRA vs full FT: " + "; ".join(means) + ".")
        n_flag = int(flags["flagged"].sum())
        parts.append(
            f"{n_flag} of {len(flags)} runs {'is' if n_flag == 1 else 'are'} flagged as failed "
            f"(shown, and left out of the 'unflagged' statistics)."
        )
    if missing_sections:
        parts.append("Not run: " + ", ".join(missing_sections) + ".")
    return " ".join(parts)


def _pairing_check(flags: pd.DataFrame) -> str:
    """Do the runs of one task and seed, whatever their method, share head init and data order?"""
    cols = [c for c in ("head_init_digest", "data_order_digest") if c in flags]
    if not cols:
        return ""
    total = mismatched = 0
    for _, group in flags.dropna(subset=cols).groupby(["task", "seed"]):
        if group["method"].nunique() >= 2:
            total += 1
            mismatched += int(any(group[c].nunique() > 1 for c in cols))
    if total == 0:
        return ""
    if mismatched == 0:
        return f"Checked: the head-initialisation and data-order digests agree for all {total} pairs."
    return (
        f"**Warning:** the head-initialisation or data-order digests differ for {mismatched} of {total} pairs; "
        f"those pairs are not real pairs."
    )


def _baseline_lines(baselines: pd.DataFrame | None, task: str, metric: str) -> list[str]:
    if baselines is None:
        return ["Baselines: not run (tables/baselines.csv missing)."]
    rows = baselines[baselines["task"] == task]
    if rows.empty:
        return ["Baselines: not run for this task."]
    lines = []
    for r in rows.itertuples():
        if r.baseline == "majority":
            lines.append(f"majority-class baseline: {metric} {fmt.num(r.primary_value)}")
        elif r.baseline == "head_only":
            lines.append(
                f"head-only probe (frozen backbone): {metric} {fmt.num(r.primary_value)}"
                + ("" if r.status == "ok" else f" — {r.status}")
            )
        elif r.baseline in ("zero_shot", "always_unanswerable"):
            name = "zero-shot base model" if r.baseline == "zero_shot" else "always unanswerable"
            lines.append(f"{name} baseline: {metric} {fmt.num(r.primary_value)}, exact {fmt.num(r.exact)}")
        elif str(r.baseline).startswith("overfit"):
            verdict = "passed" if fmt.truthy(r.passed) else "**FAILED**"
            generative = finite(getattr(r, "exact", None))
            fitted = (
                f"exact match {fmt.num(r.exact, 3)}" if generative else f"training accuracy {fmt.num(r.accuracy, 3)}"
            )
            lines.append(
                f"overfit check, {method_label(str(r.method))}: {verdict} ({fitted} on the few examples it was trained on)"
            )
    return lines


def performance_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Task performance")
    flags = view.tables["flags"]
    if flags is None:
        doc.not_run(f"{view.why['flags']}; {ANALYZE}")
        return
    ci = f"{view.confidence:.0%} CI"
    figure = performance_figure(flags, view.tasks(flags), view.tables["baselines"], view.confidence)
    doc.figure(
        view.save(figure, "performance"),
        f"Primary metric per run on the eval split (validation split, never used for selection). Filled "
        f"dots: runs; hollow: flagged runs; grey lines join the two runs of one seed; diamonds: mean ± {ci} "
        f"(t-interval over unflagged seeds); horizontal lines: baselines.",
    )
    doc.para(
        "**Paired design.** A seed fixes the classifier-head initialisation (a generative task has no new "
        "head) and the order of the training data identically for both methods, so the LoRA and full-FT runs of one seed are a real pair and "
        "paired tests on their differences are valid. " + _pairing_check(flags)
    )
    for task in view.tasks(flags):
        rows = flags[flags["task"] == task]
        metric = str(rows["primary_metric"].dropna().iloc[0]) if rows["primary_metric"].notna().any() else "metric"
        methods = method_order(rows["method"])
        pair = "lora" in methods and "full" in methods
        doc.heading(3, f"{task} — {metric}")
        headers = ["seed"] + [f"{method_label(m)} {metric}" for m in methods] + (["LoRA − full FT"] if pair else [])
        table = []
        by = {(r.method, int(r.seed)): r for r in rows.itertuples() if r.method in methods}
        for seed in sorted({s for _, s in by}):
            line: list[Any] = [str(seed)]
            for m in methods:
                r = by.get((m, seed))
                if r is None:
                    line.append("—")
                elif r.status != "ok" or not finite(r.primary_value):
                    line.append((f"{r.status} ⚑", "flag"))
                else:
                    line.append((f"{r.primary_value:.4f} ⚑", "flag") if r.flagged else f"{r.primary_value:.4f}")
            if pair:
                a, b = by.get(("lora", seed)), by.get(("full", seed))
                ok = a is not None and b is not None and finite(a.primary_value) and finite(b.primary_value)
                line.append(f"{a.primary_value - b.primary_value:+.4f}" if ok else "—")
            table.append(line)
        for subset in ("all", "unflagged"):
            described = [_describe(view, task, m, metric, subset) for m in methods + ([DIFFERENCE] if pair else [])]
            name = "all runs" if subset == "all" else "unflagged runs"
            texts = [f"{fmt.pm(d['mean'], d['sd'])} (n={int(d['n'])})" for d in described]
            if pair and finite(described[-1]["mean"]):
                texts[-1] = "+" * (described[-1]["mean"] >= 0) + texts[-1]
            table.append([(t, "sub") for t in [f"mean ± sd, {name}", *texts]])
            table.append(
                [(t, "sub") for t in [f"{ci}, {name}", *(fmt.interval(d["ci_low"], d["ci_high"]) for d in described)]]
            )
        doc.table(headers, table)
        doc.bullets(_baseline_lines(view.tables["baselines"], task, metric))
        bad = rows[rows["flagged"]]
        bad = bad.assign(_m=bad["method"].map(methods.index)).sort_values(["_m", "seed"])
        doc.bullets([f"⚑ {method_label(r.method)} seed {r.seed}: {r.reason}" for r in bad.itertuples()])
    doc.para(
        "Flags: tables/flags.csv (the analyze stage). A flagged run diverged, failed, or does not beat the "
        "majority baseline (a generative task: the better of zero-shot base and always unanswerable) by the margin; it is shown and kept out of the 'unflagged' statistics, never silently "
        "averaged. Intervals: mean ± t(1−α/2, n−1)·sd/√n over seeds; the difference column pairs runs by seed.",
        css="note",
    )


def _drawn(method: str, n: Any) -> str:
    return f" MC, {int(n):,} draws" if method == "monte carlo" else ""


def comparisons(view: StudyView) -> tuple[pd.DataFrame | None, str]:
    """The analyze stage's LoRA-vs-full rows of statistics.csv, or why there are none."""
    stats = view.tables["statistics"]
    if stats is None or view.tables["flags"] is None:
        return None, f"{view.why['statistics'] or view.why['flags']}; {ANALYZE}"
    table = stats[stats["kind"] == "compare"]
    if table.empty:
        return None, f"tables/statistics.csv has no comparison rows (no task has runs of both methods); {ANALYZE}"
    return table, ""


def comparison_section(doc: Document, view: StudyView) -> None:
    doc.heading(2, "Method comparison")
    table, why = comparisons(view)
    if table is None:
        doc.not_run(why)
        return
    flags = view.tables["flags"]
    any_flagged = bool(flags["flagged"].any())
    order = {task: i for i, task in enumerate(view.tasks(table))}
    table = table.sort_values("task", key=lambda t: t.map(order), kind="stable")
    pairs = list(dict.fromkeys(table["method"].fillna("").astype(str)))
    several = len(pairs) > 1  # then each row names its pair a − b
    methods = method_order(flags["method"])
    labels = {pair_name(p): " − ".join(map(method_label, p)) for p in itertools.permutations(methods, 2)}
    for subset in ("all", "unflagged"):
        part = table[table["subset"] == subset]
        if part.empty or (subset == "unflagged" and not any_flagged):
            continue
        doc.heading(3, "All runs with a value" if subset == "all" else "Unflagged runs only")
        rows = []
        for r in part.itertuples():
            n = f"{int(r.n_a)} / {int(r.n_b)} / {int(r.n_pairs)}" if finite(r.n_pairs) else "—"
            named = [labels.get(r.method, str(r.method))] if several else []
            needed = getattr(r, "seeds_needed", None)
            rows.append(
                [
                    r.task,
                    *named,
                    r.metric,
                    n,
                    fmt.num(r.mean_diff_paired),
                    fmt.interval(r.bootstrap_low, r.bootstrap_high),
                    f"{fmt.p_value(r.welch_p)} ({fmt.p_value(r.welch_p_holm)})",
                    f"{fmt.p_value(r.paired_t_p)} ({fmt.p_value(r.paired_t_p_holm)})",
                    f"{fmt.p_value(r.permutation_paired_p)} ({fmt.p_value(r.permutation_paired_p_holm)})"
                    + _drawn(r.permutation_paired_method, r.permutation_paired_n),
                    f"{fmt.p_value(r.permutation_unpaired_p)} ({fmt.p_value(r.permutation_unpaired_p_holm)})"
                    + _drawn(r.permutation_unpaired_method, r.permutation_unpaired_n),
                    fmt.num(r.hedges_g, 2),
                    fmt.num(r.cohen_dz, 2),
                    str(int(needed)) if finite(needed) else "—",
                ]
            )
        doc.table(
            [
                "task",
                *(["pair a − b"] if several else []),
                "metric",
                "n a / b / pairs" if several else "n LoRA / full / pairs",
                "mean diff (a − b, paired)" if several else "mean diff (LoRA − full, paired)",
                "bootstrap 95 % CI of diff",
                "Welch t p (Holm)",
                "paired t p (Holm)",
                "sign-flip p (Holm)",
                "permutation p (Holm)",
                "Hedges' g",
                "d_z",
                "seed pairs to tell apart",
            ],
            rows,
        )
        if subset == "unflagged":
            doc.para(
                "Compare with the table above: a difference between them is the effect of the flagged runs.", css="note"
            )
    if not any_flagged:
        doc.para("No run is flagged, so the statistics without flagged runs equal these.", css="note")
    doc.bullets(
        [
            "**Welch t-test**: two-sided, unequal variances, all runs of each method (n LoRA, n full).",
            "**Paired t-test**: two-sided, on the per-seed differences d = LoRA − full FT, n = pairs, n − 1 degrees of "
            "freedom; valid because a seed fixes head initialisation and data order for both methods.",
            "**Sign-flip test** (paired permutation): all 2ⁿ sign patterns of d while there are at most 65,536; the "
            "smallest possible p is 2/2ⁿ (0.25 at n = 3), so three seeds can never reach p < 0.05. Beyond that, "
            "a seeded Monte Carlo test (marked MC with its number of random relabellings) with the valid "
            "p = (1 + relabellings at least as extreme) / (1 + relabellings).",
            "**Permutation test** (unpaired): all C(n_a + n_b, n_a) splits of the pooled runs while there are at most "
            "65,536 (9 + 9 runs), else Monte Carlo as above.",
            "**Bootstrap CI**: percentile interval of mean(d), resampling the pairs; with three seeds it cannot be wider "
            "than the range of d and undercovers.",
            "**Hedges' g** = J · (mean_LoRA − mean_full) / s_pooled, s_pooled = √(((n_a−1)s_a² + (n_b−1)s_b²) / "
            "(n_a + n_b − 2)), J = 1 − 3 / (4(n_a + n_b) − 9).",
            "**d_z** = mean(d) / sd(d) (sd with n − 1) of the paired differences — not d_av.",
            "**Holm**: step-down correction across tasks within each family of tests (each test and pair is one "
            "family); the adjusted p is in brackets.",
            "**Seed pairs to tell apart**: the number of seed pairs at which the paired t-interval of d would "
            "exclude zero, were its mean and sd to stay as observed (— from fewer than two pairs, or beyond 1000).",
        ]
    )
    doc.para("Source: tables/statistics.csv.", css="note")
