"""From per-case predictions to the numbers a clinical reviewer reads: metrics with intervals, calibration,
subgroups, paired comparisons and cross-validation summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from liverus.data.audit import derived_columns
from liverus.engine.predictions import Predictions, read_predictions
from liverus.evaluation.metrics import THRESHOLD_METRICS, binary_metrics, bootstrap_ci
from liverus.evaluation.stats import calibration_summary, delong_ci, delong_test, mcnemar_test

__all__ = [
    "Predictions",
    "read_predictions",
    "evaluate_binary",
    "subgroup_table",
    "compare_models",
    "cv_summary",
    "derived_columns",
]


def _fmt_ci(ci) -> list[float]:
    return [float(ci[0]), float(ci[1])]


def evaluate_binary(
    pr: Predictions,
    threshold: float | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    subgroups: Sequence[str] = (),
) -> dict:
    """Metrics with 95% intervals, calibration and subgroup tables for one model.

    Args:
        pr: predictions.
        threshold: operating threshold; ``None`` uses each case's stored decision (``pr.pred``), as in
            cross-validation where every fold has its own threshold.
        n_boot: bootstrap resamples for the intervals.
        seed: bootstrap seed.
        subgroups: metadata columns to break the metrics down by.
    """
    if threshold is None:
        # Decisions differ per fold: compute threshold metrics on the stored decisions (threshold 0.5 on 0/1).
        m = binary_metrics(pr.y, pr.p, 0.5)
        from liverus.evaluation.metrics import threshold_metrics

        m.update(threshold_metrics(pr.y, pr.pred))
        m["confusion_matrix"] = [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
        m["threshold"] = None
        boot = bootstrap_ci(pr.y, pr.pred.astype(float), 0.5, n_resamples=n_boot, seed=seed)
        auc_boot = bootstrap_ci(pr.y, pr.p, 0.5, n_resamples=n_boot, seed=seed)
        boot["auc"], boot["pr_auc"] = auc_boot["auc"], auc_boot["pr_auc"]
    else:
        m = binary_metrics(pr.y, pr.p, threshold)
        boot = bootstrap_ci(pr.y, pr.p, threshold, n_resamples=n_boot, seed=seed)
    auc, lo, hi = delong_ci(pr.y, pr.p)
    out = {
        "n": int(len(pr)),
        "n_malignant": int(pr.y.sum()),
        "n_benign": int((1 - pr.y).sum()),
        "metrics": {k: m[k] for k in ("auc", "pr_auc", *THRESHOLD_METRICS)},
        "ci95_bootstrap": {k: _fmt_ci(v) for k, v in boot.items()},
        "auc_delong": {"auc": auc, "ci95": [lo, hi]},
        "confusion_matrix": m["confusion_matrix"],
        "threshold": m["threshold"],
        "undefined": m.get("undefined", {}),
        "calibration": calibration_summary(pr.y, pr.p) if len(pr) else {},
        "subgroups": {col: subgroup_table(pr, col, threshold) for col in subgroups},
    }
    return out


def subgroup_table(pr: Predictions, column: str, threshold: float | None) -> dict:
    """Per-value metrics of ``column`` (AUC with DeLong interval, sensitivity, specificity, counts).

    Raises:
        ValueError: if no case has the column.
    """
    values = [derived_columns(m).get(column) for m in pr.meta]
    if all(v in (None, "") for v in values):
        raise ValueError(f"subgroup column {column!r} is not in the predictions' metadata")
    table = {}
    for val in sorted({v for v in values if v not in (None, "")}):
        sel = np.array([v == val for v in values])
        y, p = pr.y[sel], pr.p[sel]
        pred = pr.pred[sel] if threshold is None else (p >= threshold).astype(int)
        auc, lo, hi = delong_ci(y, p) if len(np.unique(y)) == 2 else (math.nan, math.nan, math.nan)
        tp, fn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 1)).sum())
        tn, fp = int(((pred == 0) & (y == 0)).sum()), int(((pred == 1) & (y == 0)).sum())
        table[str(val)] = {
            "n": int(sel.sum()),
            "n_malignant": int(y.sum()),
            "auc": auc,
            "auc_ci95": [lo, hi],
            "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan,
            "note": "" if len(np.unique(y)) == 2 else "one class only: AUC undefined",
        }
    return table


def compare_models(preds: dict[str, Predictions], baseline: str) -> dict:
    """DeLong's paired AUC test and McNemar's test of every model against ``baseline`` on the same cases."""
    if baseline not in preds:
        raise ValueError(f"baseline {baseline!r} is not among the models {sorted(preds)}")
    ref = preds[baseline]
    out = {}
    for name, pr in preds.items():
        if name == baseline:
            continue
        other = pr.align(ref.paths)
        if not np.array_equal(other.y, ref.y):
            raise ValueError(f"labels of {name!r} and {baseline!r} differ on the same cases")
        d = delong_test(ref.y, other.p, ref.p)
        out[name] = {
            "auc": d["auc_a"],
            "auc_baseline": d["auc_b"],
            "auc_diff": d["diff"],
            "auc_diff_ci95": list(d["ci"]),
            "delong_p": d["p_value"],
            "mcnemar": mcnemar_test(ref.y, other.pred, ref.pred),
        }
    return out


def cv_summary(fold_metrics: list[dict]) -> dict:
    """Mean and standard deviation across folds of each metric (NaNs ignored)."""
    keys = [k for k in fold_metrics[0] if isinstance(fold_metrics[0][k], int | float)]
    out = {}
    for k in keys:
        vals = np.array([f.get(k, math.nan) for f in fold_metrics], dtype=float)
        out[k] = {
            "mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan,
            "sd": float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else math.nan,
            "per_fold": vals.tolist(),
        }
    return out
