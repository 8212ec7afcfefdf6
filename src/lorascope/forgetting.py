"""Forgetting, measured directly: what fine-tuning cost the backbone elsewhere.

Transfer retention: a linear probe (standardised features, logistic regression whose
regularisation is chosen by cross-validation on the probe's own training examples) trained on
each model's pooled features of a task and scored on that task's eval examples; forgetting =
probe accuracy of the base − that of the run, with a paired bootstrap over eval examples.
Language modelling: the run's backbone under the base model's LM head, token cross-entropy on
held-out documents, run − base, with a bootstrap over documents. And whether drift predicts
forgetting: Spearman's rank correlation with a bootstrap interval over runs. Pure functions on
features, models and tables; the `forget` stage and `analyze` call them."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy import stats as sp
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from lorascope import stats
from lorascope.evaluation import length_batches
from lorascope.runtime import autocast
from lorascope.stats import Estimate
from lorascope.study import Table

# One row per model (the base, method "base", and every run) x probed task x probed layer.
FORGETTING = Table(
    "forgetting",
    (
        "task",
        "method",
        "seed",
        "probe_task",
        "layer",
        "metric",
        "score",
        "base_score",
        "forgetting",
        "ci_low",
        "ci_high",
        "own_task",
        "n_train",
        "n_eval",
        "probe_c",
    ),
)
# One row per run: its LM loss on held-out documents against the base's ("skipped" with a note).
LM_FORGETTING = Table(
    "lm_forgetting",
    (
        "task",
        "method",
        "seed",
        "objective",
        "documents",
        "tokens",
        "base_loss",
        "run_loss",
        "difference",
        "ci_low",
        "ci_high",
        "status",
        "note",
    ),
)
# lm_forgetting.csv's objective of a generative run's row under its own LM head (its other row,
# `causal`, is under the base's head like every run's)
OWN_HEAD = "causal, the run's own LM head"
# analyze: each run's drift beside its forgetting, and their rank correlations.
FORGET_DRIFT = Table("forget_drift", ("task", "method", "seed", "probe_task", "layer", "drift", "forgetting"))
FORGET_CORRELATION = Table(
    "forget_correlation", ("probe_task", "method", "layer", "n", "spearman", "ci_low", "ci_high", "p_value")
)
FORGET_STATISTICS = Table(
    "forget_statistics", ("task", "method", "probe_task", "layer", "n", "mean", "sd", "ci_low", "ci_high")
)
OTHER_TASKS = "other tasks (mean)"  # probe_task of a run's mean forgetting over the tasks it did not train on
C_GRID = np.logspace(-4, 2, 7)  # inverse regularisation strengths the cross-validation chooses from
MASK_SHARE = 0.15  # masked-LM: share of each document's tokens masked (at least one)


# ---------------------------------------------------------------- probes


def probe_layers(blocks: int, every: int | None) -> list[int]:
    """Hidden-state indices probed: the last block's output, and every k-th block's."""
    return sorted({blocks, *(range(every, blocks + 1, every) if every else ())})


def fixed_sample(labels, n: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified sample of `n` rows (all rows when n is None or not
    smaller): the same examples for every model."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    rows, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=stratify, random_state=seed)
    return np.sort(rows)


class Probe(NamedTuple):
    """Which eval examples a probe classified correctly, and the regularisation it chose."""

    correct: np.ndarray
    c: float


def probe(train_x, train_y, eval_x, eval_y, *, folds: int = 5, seed: int = 0) -> Probe:
    """Logistic regression on standardised features; C is chosen by stratified k-fold
    cross-validation (log loss) on the training examples only, then refit on all of them."""
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    folds = min(folds, int(np.bincount(train_y)[np.unique(train_y)].min()))
    if folds < 2:
        raise ValueError("a probe needs at least two training examples of every class")
    model = LogisticRegressionCV(
        Cs=C_GRID,
        l1_ratios=(0.0,),
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="neg_log_loss",
        max_iter=5000,
        use_legacy_attributes=False,
    )
    fitted = make_pipeline(StandardScaler(), model).fit(np.asarray(train_x, dtype=np.float64), train_y)
    return Probe(fitted.predict(np.asarray(eval_x, dtype=np.float64)) == eval_y, float(model.C_))


def forgetting(base_correct, run_correct, *, bootstrap: int, confidence: float, seed: int) -> Estimate:
    """Base accuracy − run accuracy on the same eval examples, with the percentile interval of a
    paired bootstrap over examples (none when bootstrap is 0)."""
    base, run = np.asarray(base_correct, dtype=float), np.asarray(run_correct, dtype=float)
    low, high = (
        stats.bootstrap_paired_interval(base, run, confidence=confidence, n_resamples=bootstrap, seed=seed)
        if bootstrap
        else (math.nan, math.nan)
    )
    return Estimate(float(base.mean() - run.mean()), low, high)


# ---------------------------------------------------------------- language modelling


def probe_rows(
    features: torch.Tensor, layers: list[int], labels, n_train: int, probe_task: str, trained, fc
) -> list[dict]:
    """forgetting.csv rows of one model on one probed task, one per layer: its probe fitted on
    the first `n_train` examples and scored on the rest (`trained`: (task, method, seed), None
    for the base; `fc`: the forget settings)."""
    task, method, seed = trained if trained is not None else ("", "base", None)
    rows = []
    for slot, layer in enumerate(layers):
        x = features[slot].double().numpy()
        fit = probe(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], folds=fc.folds, seed=fc.seed)
        rows.append(
            {
                "task": task,
                "method": method,
                "seed": seed,
                "probe_task": probe_task,
                "layer": layer,
                "metric": "accuracy",
                "score": fit.correct.mean(),
                "correct": fit.correct,
                "own_task": task == probe_task,
                "n_train": n_train,
                "n_eval": len(fit.correct),
                "probe_c": fit.c,
            }
        )
    return rows


def with_base_reference(frame: pd.DataFrame, fc) -> pd.DataFrame:
    """Each run's forgetting against the base's probe on the same task, layer and eval examples."""
    base = frame[frame["method"] == "base"].set_index(["probe_task", "layer"])
    out = []
    for row in frame.to_dict("records"):
        reference = base.loc[(row["probe_task"], row["layer"])]
        estimate = forgetting(
            reference["correct"], row["correct"], bootstrap=fc.bootstrap, confidence=fc.confidence, seed=fc.seed
        )
        is_base = row["method"] == "base"
        out.append(
            {
                **row,
                "base_score": reference["score"],
                "forgetting": np.nan if is_base else estimate.value,
                "ci_low": np.nan if is_base else estimate.low,
                "ci_high": np.nan if is_base else estimate.high,
            }
        )
    out = pd.DataFrame(out).drop(columns="correct")
    return FORGETTING.frame(out.assign(seed=out["seed"].astype("Int64")))


def lm_with_head(path: str, decoder: bool) -> tuple[torch.nn.Module | None, str]:
    """The checkpoint as a causal LM (decoders) or masked LM (encoders) with its pretrained head,
    or None and why not: a checkpoint saved without the head (the bundled MiniLM is a bare
    sentence encoder) would score with a random head."""
    kind = "causal-LM" if decoder else "masked-LM"
    loader = AutoModelForCausalLM if decoder else AutoModelForMaskedLM
    try:
        lm, info = loader.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as err:
        return None, f"no {kind} head can be built for this checkpoint ({str(err).splitlines()[0]}); skipped"
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(f"{lm.base_model_prefix}."))
    if missing:
        return None, f"the checkpoint has no {kind} head (missing {', '.join(missing[:3])}); skipped"
    return lm.eval(), ""


def with_backbone(lm: torch.nn.Module, classifier: torch.nn.Module) -> torch.nn.Module:
    """`lm` with `classifier`'s backbone and its own LM head. A head tied to the input embeddings
    is untied first, so it stays the base's embedding matrix when a run changed the embeddings."""
    head = lm.get_output_embeddings()
    if head.weight is lm.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    missing, _ = lm.base_model.load_state_dict(classifier.base_model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"the classifier's backbone lacks {missing[:3]}: not the LM's architecture")
    return lm


def _masked(ids: torch.Tensor, keep: torch.Tensor, draws: torch.Tensor, mask_id: int):
    """Inputs with MASK_SHARE of the eligible tokens (at least one) masked, and the labels."""
    draws = draws[:, : ids.shape[1]].masked_fill(~keep, 2.0)
    chosen = (draws < MASK_SHARE) | (draws == draws.min(dim=1, keepdim=True).values)
    chosen &= keep
    return ids.masked_fill(chosen, mask_id), ids.masked_fill(~chosen, -100)


@torch.no_grad()
def document_losses(
    lm: torch.nn.Module,
    documents,
    tokenizer,
    *,
    decoder: bool,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per document: summed token cross-entropy (nats) and the number of scored tokens. Decoders
    score every next token; encoders the masked tokens, masked the same way for every model
    (draws fixed by `seed` and the document's row)."""
    lm = lm.to(device).eval()
    sums, counts = np.zeros(len(documents)), np.zeros(len(documents), dtype=np.int64)
    draws = torch.rand(len(documents), max(documents["length"]), generator=torch.Generator().manual_seed(seed))
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    for rows, batch in length_batches(documents, tokenizer, batch_size, device):
        ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        if decoder:
            inputs, labels = batch, ids[:, 1:].masked_fill(~attention[:, 1:], -100)
        else:
            masked, labels = _masked(
                ids, attention & ~torch.isin(ids, special), draws[rows].to(device), tokenizer.mask_token_id
            )
            inputs = {**batch, "input_ids": masked}
        with autocast(device, bf16):
            logits = lm(**inputs).logits
        logits = logits[:, :-1] if decoder else logits
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        sums[rows] = loss.sum(dim=1).double().cpu().numpy()
        counts[rows] = (labels != -100).sum(dim=1).cpu().numpy()
    return sums, counts


def loss_change(
    base_sums, base_counts, run_sums, run_counts, *, bootstrap: int, confidence: float, seed: int
) -> Estimate:
    """Mean token cross-entropy of the run − the base's on the same documents (each the total
    over tokens / the tokens), with a percentile bootstrap over documents."""

    def change(bs, bc, rs, rc, axis=-1):
        return rs.sum(axis) / rc.sum(axis) - bs.sum(axis) / bc.sum(axis)

    data = tuple(np.asarray(a, dtype=float) for a in (base_sums, base_counts, run_sums, run_counts))
    value = float(change(*data))
    if not bootstrap or len(data[0]) < 2:
        return Estimate(value, math.nan, math.nan)
    if np.allclose(data[0], data[2]):  # the base against itself: every resample is 0
        return Estimate(value, value, value)
    result = sp.bootstrap(
        data,
        change,
        paired=True,
        vectorized=True,
        n_resamples=bootstrap,
        method="percentile",
        confidence_level=confidence,
        rng=np.random.default_rng(seed),
    )
    return Estimate(value, float(result.confidence_interval.low), float(result.confidence_interval.high))


# ---------------------------------------------------------------- does drift predict forgetting?


def lm_change_row(trained, objective: str, names: list[str], base_part, run_part, fc) -> dict:
    """lm_forgetting.csv's row of one run: its LM loss on the documents of `names` against the
    base's (`base_part`, `run_part`: per-document loss sums and token counts)."""
    change = loss_change(*base_part, *run_part, bootstrap=fc.bootstrap, confidence=fc.confidence, seed=fc.seed)
    task, method, seed = trained
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "objective": objective,
        "documents": len(base_part[0]),
        "tokens": int(base_part[1].sum()),
        "base_loss": base_part[0].sum() / base_part[1].sum(),
        "run_loss": run_part[0].sum() / run_part[1].sum(),
        "difference": change.value,
        "ci_low": change.low,
        "ci_high": change.high,
        "status": "ok",
        "note": f"documents: {', '.join(names)}"
        + (" (the run's own task: no other task in the study)" if names == [task] else ""),
    }


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis (Pearson of average ranks); NaN where one side is constant."""
    rx, ry = sp.rankdata(x, axis=-1), sp.rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    scale = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, (rx * ry).sum(-1) / scale, np.nan)


def spearman_interval(x, y, *, n_resamples: int, confidence: float, seed: int) -> tuple[Estimate, float]:
    """Spearman's rho of paired values (scipy's), its percentile bootstrap interval over the pairs
    (resamples where one side came out constant are left out) and scipy's p-value. Fewer than
    three pairs, or a constant side: NaN."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Estimate(math.nan, math.nan, math.nan), math.nan
    result = sp.spearmanr(x, y)
    low = high = math.nan
    if n_resamples:
        idx = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
        boot = _spearman(x[idx], y[idx])
        alpha = (1 - confidence) / 2
        low, high = np.nanquantile(boot, [alpha, 1 - alpha])
    return Estimate(float(result.statistic), float(low), float(high)), float(result.pvalue)


def transfer_cost(table: pd.DataFrame) -> pd.DataFrame:
    """Each run's forgetting (last probed layer) on every probed task it did not train on, and
    their mean (probe_task OTHER_TASKS): task, method, seed, probe_task, forgetting."""
    runs = table[(table["method"] != "base") & ~table["own_task"].astype(bool)]
    runs = runs.loc[runs["layer"] == runs["layer"].max(), ["task", "method", "seed", "probe_task", "forgetting"]]
    runs = runs.assign(seed=runs["seed"].astype(int))
    mean = runs.groupby(["task", "method", "seed"], as_index=False)["forgetting"].mean().assign(probe_task=OTHER_TASKS)
    return pd.concat([runs, mean], ignore_index=True)


def seed_statistics(table: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """FORGET_STATISTICS rows: forgetting over seeds (n, mean, sd, t-interval) per training task,
    method, probed task and layer."""
    runs = table[table["method"] != "base"]
    rows = [
        {
            "task": task,
            "method": method,
            "probe_task": probe_task,
            "layer": layer,
            **stats.describe(group["forgetting"], confidence),
        }
        for (task, method, probe_task, layer), group in runs.groupby(["task", "method", "probe_task", "layer"])
    ]
    return FORGET_STATISTICS.frame(pd.DataFrame(rows, columns=FORGET_STATISTICS.columns))


def drift_points(
    table: pd.DataFrame,
    drift_summary: pd.DataFrame | None,
    drift_layers: pd.DataFrame | None,
    pooling: str,
    measure: str,
) -> pd.DataFrame:
    """FORGET_DRIFT rows: each run's drift (1 − similarity; mean over layers with layer NaN, and
    per layer) beside its forgetting on each task it did not train on (last probed layer) and
    their mean (probe_task OTHER_TASKS)."""
    cost = transfer_cost(table)
    if cost.empty or drift_summary is None:
        return FORGET_DRIFT.frame([])
    drifts = [drift_summary.rename(columns={"mean_over_layers": "value"}).assign(layer=math.nan)]
    if drift_layers is not None:
        drifts.append(drift_layers)
    frames = []
    for drift in drifts:
        drift = drift[
            (drift["comparison"] == "run_vs_base") & (drift["pooling"] == pooling) & (drift["measure"] == measure)
        ]
        drift = drift.assign(seed=drift["seed"].astype(int), drift=1 - drift["value"])[
            ["task", "method", "seed", "layer", "drift"]
        ]
        frames.append(cost.merge(drift, on=["task", "method", "seed"]))
    return FORGET_DRIFT.frame(pd.concat(frames, ignore_index=True))


def correlation_rows(points: pd.DataFrame, *, n_resamples: int, confidence: float, seed: int) -> pd.DataFrame:
    """FORGET_CORRELATION rows: Spearman of drift and forgetting per probed task (and over the
    mean of the other tasks), over all runs and within each method, for the mean over layers
    (layer NaN) and each layer."""
    rows = []
    for (probe_task, layer), cell in points.groupby(["probe_task", "layer"], dropna=False, sort=False):
        for method in ["all", *sorted(cell["method"].unique())]:
            sel = cell if method == "all" else cell[cell["method"] == method]
            rho, p = spearman_interval(
                sel["drift"], sel["forgetting"], n_resamples=n_resamples, confidence=confidence, seed=seed
            )
            rows.append(
                {
                    "probe_task": probe_task,
                    "method": method,
                    "layer": layer,
                    "n": len(sel),
                    "spearman": rho.value,
                    "ci_low": rho.low,
                    "ci_high": rho.high,
                    "p_value": p,
                }
            )
    return FORGET_CORRELATION.frame(pd.DataFrame(rows, columns=FORGET_CORRELATION.columns))
