"""Representational drift tables: each run against the base model, layer by layer, with the
references a reader needs to judge a number: base vs base (the pipeline's check: must be 1),
seed vs seed within a method (the noise floor) and base vs shuffled base (the estimator's
bias floor). Plain tensors in, table rows out."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import torch

from lorascope import similarity as sim
from lorascope.study import Table

# How far from 1 base vs base may be, by the precision the features were computed in. fp32 is
# deterministic up to summation order (measured worst: 7e-12). Under bf16 autocast, batch
# composition changes rounding; measured with batches of 64 vs 32 on 192 SST-2 probe examples,
# worst over layers and CKA kinds: MiniLM-L6 mean 5e-7, head 2e-5; SmolLM2-135M mean 6e-5,
# head 7e-3. The bf16 bound is three times the worst; a broken measure (the reference study's
# formula: 0.23-0.40) or another model's features are off by far more.
BASE_VS_BASE_TOLERANCE = {False: 1e-6, True: 2e-2}  # keyed by "computed under bf16 autocast"
# x and y: the two models compared, as named by `comparison` (run_vs_base: x the base, y the run;
# seed_vs_seed: the lower seed first). top<k>_share_<x|y>: the share of that model's centred
# variance held by its k features of largest variance, before any standardisation
# (similarity.top_variance_shares). missing_reason: why a value or interval the data leave
# undefined is NaN ('' otherwise).
TOPS = (1, 3)
DRIFT_LAYERS = Table(
    "drift_layers",
    (
        "task",
        "comparison",
        "method",
        "seed",
        "layer",
        "pooling",
        "measure",
        "value",
        "ci_low",
        "ci_high",
        *(f"top{top}_share_{side}" for side in "xy" for top in TOPS),
        "missing_reason",
    ),
)
DRIFT_SUMMARY = Table(
    "drift_summary",
    ("task", "method", "seed", "pooling", "measure", "mean_over_layers", "mean_last_third", "comparison"),
)
# Measures from one centring and one Gram pair (similarity.compare), by their names there.
SHARED = {"linear_cka": "linear", "debiased_cka": "debiased", "rbf_cka": "rbf", "cosine": "cosine"}
POINT = {"legacy_index": sim.legacy_index}  # opt-in, no interval; not a similarity index (similarity.legacy_index)
# Measures whose base vs base must be 1. Not legacy_index: its value for a representation
# with itself is an inverse participation ratio (0.23-0.40 in the reference study).
SELF_IS_ONE = ("linear_cka", "debiased_cka", "rbf_cka")


class DriftCheckFailed(RuntimeError):
    """Base vs base is not 1: the feature pipeline is not deterministic, so no drift number
    can be trusted (the reference study's CKA scored its base model 0.23-0.40 against itself)."""


def layer_measures(
    x: torch.Tensor,
    y: torch.Tensor,
    measures,
    bootstrap: int,
    seed: int,
    confidence: float,
    dtype: torch.dtype = torch.float32,
    standardize: bool = False,
) -> list[dict]:
    """Every measure between two [examples × hidden] matrices, with bootstrap intervals over
    examples (none for RBF CKA, whose resampled kernels are not worth the time, nor for the
    legacy index). All but the legacy index share one centring and one pair of Gram matrices;
    `dtype`: of the Gram and bootstrap products (float64 is the reference; similarity's docstring).
    `standardize`: every feature z-scored first (drift.standardize)."""
    if standardize:
        x, y = sim.standardized(x), sim.standardized(y)
    kinds = [SHARED[m] for m in measures if m in SHARED]
    shared = sim.compare(x, y, kinds, bootstrap, seed, confidence, dtype) if kinds else {}
    rows = []
    for measure in measures:
        found = shared[SHARED[measure]] if measure in SHARED else (POINT[measure](x, y), math.nan, math.nan, "")
        rows.append({"measure": measure, **dict(zip(("value", "ci_low", "ci_high", "missing_reason"), found))})
    return rows


def variance_shares(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """drift_layers.csv's top<k>_share_<x|y>: where one or three features hold most of a model's
    variance, CKA and cosine measure those features (Timkey & van Schijndel 2021)."""
    return {
        f"top{top}_share_{side}": share
        for side, features in (("x", x), ("y", y))
        for top, share in zip(TOPS, sim.top_variance_shares(features, TOPS))
    }


def layer_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    layers: list[int],
    measures,
    *,
    bootstrap=0,
    bootstrap_seed=0,
    confidence=0.95,
    dtype=torch.float32,
    standardize=False,
    **fields,
) -> list[dict]:
    """Rows for every layer and measure of two [layers × examples × hidden] stacks."""
    rows = []
    for i, layer in enumerate(layers):
        shares = variance_shares(x[i], y[i])
        measured = layer_measures(x[i], y[i], measures, bootstrap, bootstrap_seed, confidence, dtype, standardize)
        rows += [{**fields, "layer": layer, **shares, **row} for row in measured]
    return rows


def task_drift_rows(
    task: str,
    pooling: str,
    base: torch.Tensor,
    base_again: torch.Tensor,
    runs: dict[tuple[str, int], torch.Tensor],
    layers: list[int],
    measures,
    *,
    bootstrap: int,
    confidence: float,
    seed: int,
    bf16: bool = False,
    standardize: bool = False,
) -> list[dict]:
    """All drift_layers.csv rows of one task and pooling. `base_again` is the base model's
    features computed a second time with different batches (so different padding); `bf16`:
    the features were computed under bf16 autocast (sets the base-vs-base tolerance);
    `standardize`: every feature z-scored before the measures (drift.standardize)."""
    common = {"task": task, "pooling": pooling, "standardize": standardize}
    informative = [i for i in range(len(layers)) if not sim.is_constant(base[i])]
    if len(informative) < len(layers):  # e.g. an encoder's first token before attention: always [CLS]
        keep = torch.tensor(informative, dtype=torch.long)
        base, base_again, layers = base[keep], base_again[keep], [layers[i] for i in informative]
        runs = {key: features[keep] for key, features in runs.items()}
    rows = layer_rows(base, base_again, layers, measures, comparison="base_vs_base", method="", seed="", **common)
    for row in rows:
        if row["measure"] in SELF_IS_ONE and abs(row["value"] - 1) > BASE_VS_BASE_TOLERANCE[bf16]:
            raise DriftCheckFailed(
                f"{task} {pooling} layer {row['layer']}: {row['measure']} of the base model "
                f"with itself is {row['value']:.8f}, not 1 within "
                f"{BASE_VS_BASE_TOLERANCE[bf16]:g} ({'bf16' if bf16 else 'fp32'})"
            )
    shuffled = base[:, torch.randperm(base.shape[1], generator=torch.Generator().manual_seed(seed))]
    rows += layer_rows(base, shuffled, layers, measures, comparison="shuffled_base", method="", seed="", **common)
    options = {"bootstrap": bootstrap, "bootstrap_seed": seed, "confidence": confidence}
    for (method, run_seed), features in sorted(runs.items()):
        rows += layer_rows(
            base,
            features,
            layers,
            measures,
            comparison="run_vs_base",
            method=method,
            seed=str(run_seed),
            **options,
            **common,
        )
    for method in sorted({m for m, _ in runs}):
        seeds = sorted(s for m, s in runs if m == method)
        for a, b in itertools.combinations(seeds, 2):
            rows += layer_rows(
                runs[(method, a)],
                runs[(method, b)],
                layers,
                measures,
                comparison="seed_vs_seed",
                method=method,
                seed=f"{a}-{b}",
                **options,
                **common,
            )
    return rows


def summary_rows(layer_table) -> list[dict]:
    """Per run (and per reference): the mean over layers, and over the last third of layers,
    where task-specific change concentrates."""
    rows = []
    keys = ["task", "method", "seed", "pooling", "measure", "comparison"]
    for key, group in layer_table.groupby(keys, sort=True, dropna=False):
        group = group.sort_values("layer")
        last = group.tail(max(1, math.ceil(len(group) / 3)))
        rows.append(
            {**dict(zip(keys, key)), "mean_over_layers": group["value"].mean(), "mean_last_third": last["value"].mean()}
        )
    return rows


def drift_tables(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """drift_layers.csv and drift_summary.csv frames from `task_drift_rows` rows."""
    layer_table = DRIFT_LAYERS.frame(pd.DataFrame(rows, columns=DRIFT_LAYERS.columns))
    return layer_table, DRIFT_SUMMARY.frame(pd.DataFrame(summary_rows(layer_table), columns=DRIFT_SUMMARY.columns))
