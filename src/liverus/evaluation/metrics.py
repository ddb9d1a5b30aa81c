"""Clinical metrics: threshold-based and threshold-free, with stratified-bootstrap and DeLong intervals.

Undefined values (a metric whose denominator is zero, an AUC with one class present) are ``NaN`` with a reason in
``undefined``, never an exception from inside scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "OPERATING_POINTS",
    "operating_points",
    "EvaluationError",
    "check_inputs",
    "threshold_metrics",
    "threshold_free_metrics",
    "binary_metrics",
    "multiclass_metrics",
    "choose_threshold",
    "bootstrap_ci",
    "macro_bootstrap_ci",
    "THRESHOLD_METRICS",
]

THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (mismatched lengths, NaN scores, bad labels)."""


def check_inputs(
    y_true: Sequence, scores: Sequence, *, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and scores.

    Args:
        y_true: integer labels.
        scores: (n,) probabilities of the positive class, or (n, k) class probabilities.
        num_classes: expected number of classes for (n, k) scores.

    Returns:
        ``(y, s)`` as arrays.

    Raises:
        EvaluationError: for mismatched lengths, an empty set, NaN/inf scores or labels outside the classes.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1:
        raise EvaluationError(f"labels must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise EvaluationError("no cases to evaluate")
    if len(y) != len(s):
        raise EvaluationError(f"mismatched lengths: {len(y)} labels but {len(s)} scores")
    if not np.isfinite(s).all():
        bad = (
            int((~np.isfinite(s)).any(axis=tuple(range(1, s.ndim))).sum())
            if s.ndim > 1
            else int((~np.isfinite(s)).sum())
        )
        raise EvaluationError(f"{bad} score(s) are NaN or infinite")
    if not np.issubdtype(y.dtype, np.integer):
        if np.all(np.mod(y.astype(float), 1) == 0):
            y = y.astype(int)
        else:
            raise EvaluationError("labels must be integers")
    k = num_classes or (s.shape[1] if s.ndim == 2 else 2)
    if y.min() < 0 or y.max() >= k:
        raise EvaluationError(f"labels must be in [0, {k - 1}], got values {sorted(set(y.tolist()))}")
    return y, s


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def threshold_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics of binary predictions (1 = malignant). Undefined ratios are NaN."""
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    ppv, npv = _div(tp, tp + fp), _div(tn, tn + fn)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": _div(tp + tn, len(y)),
        "balanced_accuracy": (sens + spec) / 2 if not (math.isnan(sens) or math.isnan(spec)) else math.nan,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "mcc": (tp * tn - fp * fn) / denom if denom else math.nan,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def threshold_free_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC AUC and average precision; NaN when only one class is present."""
    if len(np.unique(y)) < 2:
        return {"auc": math.nan, "pr_auc": math.nan}
    return {"auc": float(skm.roc_auc_score(y, p)), "pr_auc": float(skm.average_precision_score(y, p))}


def binary_metrics(y_true: Sequence, p_pos: Sequence, threshold: float = 0.5) -> dict:
    """All binary metrics at ``threshold`` (predict malignant when ``p >= threshold``).

    Returns:
        A dict of metrics plus ``confusion_matrix`` ([[tn, fp], [fn, tp]]), ``n``, ``n_pos``, ``threshold`` and
        ``undefined`` (names of NaN metrics with the reason).
    """
    y, p = check_inputs(y_true, p_pos)
    if p.ndim != 1:
        raise EvaluationError("binary_metrics takes the positive-class probability, a 1-D array")
    pred = (p >= threshold).astype(int)
    out: dict = {**threshold_free_metrics(y, p), **threshold_metrics(y, pred)}
    out["confusion_matrix"] = [[out["tn"], out["fp"]], [out["fn"], out["tp"]]]
    out["n"], out["n_pos"], out["threshold"] = int(len(y)), int(y.sum()), float(threshold)
    undefined = {}
    if len(np.unique(y)) < 2:
        missing = "malignant" if y.sum() == 0 else "benign"
        undefined.update({"auc": f"no {missing} cases", "pr_auc": f"no {missing} cases"})
    for k in THRESHOLD_METRICS:
        if isinstance(out[k], float) and math.isnan(out[k]) and k not in undefined:
            undefined[k] = "zero denominator (a class or a prediction is absent)"
    out["undefined"] = undefined
    return out


def multiclass_metrics(y_true: Sequence, probs: Sequence, classes: Sequence[str]) -> dict:
    """Per-class (one-vs-rest) and macro metrics for k classes, predicting the arg-max class."""
    y, P = check_inputs(y_true, probs, num_classes=len(classes))
    if P.ndim != 2 or P.shape[1] != len(classes):
        raise EvaluationError(f"expected scores of shape (n, {len(classes)}), got {P.shape}")
    pred = P.argmax(1)
    per_class = {}
    for i, name in enumerate(classes):
        yi = (y == i).astype(int)
        per_class[name] = {
            **threshold_free_metrics(yi, P[:, i]),
            **threshold_metrics(yi, (pred == i).astype(int)),
        }
    macro = {
        k: float(np.nanmean([per_class[c][k] for c in classes]))
        for k in ("auc", "pr_auc", "sensitivity", "specificity", "f1")
    }
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "macro": macro,
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist(),
        "n": int(len(y)),
    }


def proportion_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided ``level`` interval of a proportion ``k / n``; ``(nan, nan)`` for
    ``n = 0``."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def proportion_lower_bound(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """The exact one-sided lower ``confidence`` bound of proportions ``k / n`` (0 where ``k = 0``)."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1 - confidence, k, n - k + 1)
    return np.where(k > 0, np.nan_to_num(bound), 0.0)


def choose_threshold(
    y_true: Sequence, p_pos: Sequence, method: str = "youden", target: float = 0.95, *, confidence: float | None = None
) -> float:
    """Choose the operating threshold on validation data.

    Args:
        method: ``youden`` (maximise sensitivity + specificity - 1), ``sensitivity`` (the highest threshold whose
            sensitivity is at least ``target``, for rule-out use) or ``specificity`` (the lowest threshold whose
            specificity is at least ``target``, for rule-in use).
        target: target sensitivity or specificity.
        confidence: for ``sensitivity`` and ``specificity``: the target must hold with this one-sided confidence,
            i.e. the exact (Clopper-Pearson) lower bound of the rate, not the rate itself, must reach ``target``,
            so that the point holds on new cases drawn like these. Where no threshold makes the bound reach it (too
            few cases), the threshold whose bound comes closest. ``None``: the point estimate.

    Returns:
        The threshold (predict malignant when ``p >= threshold``); 0.5 when only one class is present.

    Raises:
        ValueError: for an unknown method, a target outside (0, 1] or a confidence outside (0, 1).
    """
    y, p = check_inputs(y_true, p_pos)
    if method not in ("youden", "sensitivity", "specificity"):
        raise ValueError(f"unknown threshold method {method!r}; use youden, sensitivity or specificity")
    if not 0 < target <= 1:
        raise ValueError(f"target {method} must be in (0, 1], got {target}")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    # roc_curve's first point (threshold +inf: call nothing malignant) is not an operating point anyone would use.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if method == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if method == "specificity":
        spec = 1 - fpr
        reached = spec if confidence is None else proportion_lower_bound(np.round(spec * n_neg), n_neg, confidence)
        ok = np.nonzero(reached >= target - 1e-12)[0]
        if ok.size:
            return float(thr[ok[-1]])
        # None specific enough: the lowest threshold of the highest (bound of the) specificity is the closest.
        return float(thr[np.nonzero(reached == reached.max())[0][-1]])
    reached = tpr if confidence is None else proportion_lower_bound(np.round(tpr * n_pos), n_pos, confidence)
    ok = np.nonzero(reached >= target - 1e-12)[0]
    return float(thr[ok[0]]) if ok.size else float(thr[int(np.argmax(reached))])


# The targets of the rule-out and rule-in points hold with this one-sided confidence on the predictions they are
# chosen on (the lower bound of the rate, not the rate): chosen on the point estimate, AUL's rule-out point gave
# sensitivity 0.90 on new images where the out-of-fold estimate said 0.95.
OPERATING_CONFIDENCE = 0.95
OPERATING_POINTS = {
    "youden": ("youden", 0.0, "maximises sensitivity + specificity"),
    "rule_out": ("sensitivity", 0.95, "sensitivity >= 0.95 with 95% confidence: below it, malignancy is unlikely"),
    "rule_in": ("specificity", 0.90, "specificity >= 0.90 with 95% confidence: above it, malignancy is likely"),
}


def operating_points(y_true: Sequence, p_pos: Sequence) -> dict[str, dict]:
    """The named operating points of a binary model, chosen on (pooled, out-of-fold or validation) predictions.

    Returns:
        ``{name: {"threshold", "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "target",
        "target_held"}}`` for ``youden``, ``rule_out`` (sensitivity >= 0.95 at its lower 95% confidence bound) and
        ``rule_in`` (specificity >= 0.90 likewise): the rates reached on these data with their exact two-sided 95%
        intervals (what to expect on new cases like these), and whether the one-sided 95% lower bound reached the
        target (False where there are too few cases to promise it). The two-sided interval's lower end lies below
        the one-sided bound, so it can dip under a target that is held.
    """
    y, p = check_inputs(y_true, p_pos)
    out = {}
    pos, neg = y == 1, y == 0
    for name, (method, target, meaning) in OPERATING_POINTS.items():
        confidence = None if method == "youden" else OPERATING_CONFIDENCE
        t = choose_threshold(y, p, method, target or 0.95, confidence=confidence)
        pred = p >= t
        tp, tn = int(pred[pos].sum()), int((~pred[neg]).sum())
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        held = True
        if method != "youden":
            k, n = (tp, n_pos) if method == "sensitivity" else (tn, n_neg)
            held = bool(n and proportion_lower_bound(np.array([k]), n, OPERATING_CONFIDENCE)[0] >= target - 1e-12)
        out[name] = {
            "threshold": t,
            "sensitivity": tp / n_pos if n_pos else float("nan"),
            "sensitivity_ci95": list(proportion_interval(tp, n_pos)),
            "specificity": tn / n_neg if n_neg else float("nan"),
            "specificity_ci95": list(proportion_interval(tn, n_neg)),
            "target": meaning,
            "target_held": held,
        }
    return out


def macro_bootstrap_ci(
    y_true: Sequence, probs: Sequence, *, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the macro (one-vs-rest mean over classes) AUC and average precision of k-class scores
    by a bootstrap stratified by class (every resample keeps each class's count, so every class is present).

    Macro average precision is the metric UltraBench reports for AUL's normal / benign / malignant task.

    Returns:
        ``{"auc": (low, high), "pr_auc": (low, high)}``.
    """
    y, P = check_inputs(y_true, probs, num_classes=np.asarray(probs).shape[1])
    rng = np.random.default_rng(seed)
    strata = [np.nonzero(y == c)[0] for c in np.unique(y)]
    classes = range(P.shape[1])
    auc, ap = [], []
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(s, len(s)) for s in strata])
        yy, pp = y[idx], P[idx]
        per = [threshold_free_metrics((yy == k).astype(int), pp[:, k]) for k in classes]
        auc.append(np.nanmean([m["auc"] for m in per]))
        ap.append(np.nanmean([m["pr_auc"] for m in per]))
    q = (100 * alpha / 2, 100 * (1 - alpha / 2))
    return {k: tuple(float(v) for v in np.percentile(vals, q)) for k, vals in (("auc", auc), ("pr_auc", ap))}


def bootstrap_ci(
    y_true: Sequence,
    p_pos: Sequence,
    threshold: float,
    *,
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals for every binary metric by stratified bootstrap.

    Resampling keeps the number of benign and malignant cases fixed (stratified), so every resample has both classes.
    With ``groups`` it resamples whole groups (cluster bootstrap) within each class instead of single images.

    Returns:
        ``{metric: (low, high)}``; NaN where the metric was undefined in too many resamples.
    """
    y, p = check_inputs(y_true, p_pos)
    rng = np.random.default_rng(seed)
    names = ("auc", "pr_auc", *THRESHOLD_METRICS)
    samples: dict[str, list[float]] = {k: [] for k in names}
    if groups is None:
        strata = [np.nonzero(y == c)[0] for c in np.unique(y)]
        units = [[np.array([i]) for i in idx] for idx in strata]
    else:
        g = np.asarray(groups)
        units = []
        for c in np.unique(y):
            idx = np.nonzero(y == c)[0]
            units.append([idx[g[idx] == gg] for gg in np.unique(g[idx])])
    pred = (p >= threshold).astype(int)
    for _ in range(n_resamples):
        parts = []
        for u in units:
            pick = rng.integers(0, len(u), len(u))
            parts.extend(u[j] for j in pick)
        idx = np.concatenate(parts)
        yy, pp = y[idx], p[idx]
        tf = threshold_free_metrics(yy, pp)
        tm = threshold_metrics(yy, pred[idx])
        for k in names:
            samples[k].append(tf[k] if k in tf else tm[k])
    out = {}
    for k, vals in samples.items():
        arr = np.asarray(vals, dtype=float)
        arr = arr[np.isfinite(arr)]
        if len(arr) < 0.5 * n_resamples:
            out[k] = (math.nan, math.nan)
        else:
            out[k] = (float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2)))
    return out
