"""DeLong's AUC variance and paired test, McNemar's test, calibration and temperature scaling.

DeLong is written here because neither scikit-learn nor SciPy provides it (the reference implementations are R's
pROC and a few unmaintained gists); this is the fast O(n log n) algorithm of Sun & Xu (2014) built on mid-ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from liverus.evaluation.metrics import EvaluationError, check_inputs

__all__ = [
    "delong_auc_variance",
    "delong_ci",
    "delong_test",
    "mcnemar_test",
    "expected_calibration_error",
    "calibration_summary",
    "fit_temperature",
    "apply_temperature",
    "calibration_slope_intercept",
    "corrected_resampled_ttest",
    "net_benefit",
]


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.zeros(n)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(n)
    out[order] = ranks
    return out


def _structural(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components V10 (positives) and V01 (negatives) for k score vectors."""
    scores = np.atleast_2d(scores)
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise EvaluationError("DeLong needs both benign and malignant cases")
    k = scores.shape[0]
    tx, ty, tz = np.empty((k, m)), np.empty((k, n)), np.empty((k, m + n))
    for r in range(k):
        tx[r], ty[r] = _midrank(pos[r]), _midrank(neg[r])
        tz[r] = _midrank(np.concatenate([pos[r], neg[r]]))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_auc_variance(y_true: Sequence, p: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns: ``(aucs, covariance)`` for one score vector (n,) or several (k, n) on the same cases."""
    y = np.asarray(y_true).astype(int)
    s = np.atleast_2d(np.asarray(p, dtype=float))
    if s.shape[1] != len(y):
        raise EvaluationError(f"mismatched lengths: {len(y)} labels but {s.shape[1]} scores")
    aucs, v10, v01 = _structural(y, s)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_ci(y_true: Sequence, p: Sequence, alpha: float = 0.05) -> tuple[float, float, float]:
    """Returns: ``(auc, low, high)``, the DeLong (normal approximation) interval, clipped to [0, 1]; NaNs when one
    class is absent."""
    y, s = check_inputs(y_true, p)
    if len(np.unique(y)) < 2:
        return math.nan, math.nan, math.nan
    aucs, cov = delong_auc_variance(y, s)
    se = math.sqrt(max(cov[0, 0], 0.0))
    z = stats.norm.ppf(1 - alpha / 2)
    auc = float(aucs[0])
    return auc, max(0.0, auc - z * se), min(1.0, auc + z * se)


def delong_test(y_true: Sequence, p_a: Sequence, p_b: Sequence, alpha: float = 0.05) -> dict:
    """DeLong's test for two correlated AUCs (two models on the same cases).

    Returns:
        ``auc_a``, ``auc_b``, ``diff`` (a - b), ``ci`` of the difference, ``z`` and the two-sided ``p_value``.
    """
    y, a = check_inputs(y_true, p_a)
    _, b = check_inputs(y_true, p_b)
    if len(np.unique(y)) < 2:
        raise EvaluationError("DeLong's test needs both classes among the cases")
    aucs, cov = delong_auc_variance(y, np.vstack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    z_crit = stats.norm.ppf(1 - alpha / 2)
    if se == 0:
        z, p = (0.0, 1.0) if diff == 0 else (math.inf, 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "ci": (diff - z_crit * se, diff + z_crit * se),
        "z": z,
        "p_value": p,
    }


def mcnemar_test(y_true: Sequence, pred_a: Sequence, pred_b: Sequence) -> dict:
    """Exact McNemar test on the discordant correct/incorrect pairs of two models' binary decisions.

    Returns:
        ``b`` (a right, b wrong), ``c`` (a wrong, b right) and the two-sided exact ``p_value``.
    """
    y = np.asarray(y_true)
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if not len(y) == len(a) == len(b):
        raise EvaluationError(f"mismatched lengths: {len(y)}, {len(a)}, {len(b)}")
    ra, rb = a == y, b == y
    n01, n10 = int((ra & ~rb).sum()), int((~ra & rb).sum())
    n = n01 + n10
    p = 1.0 if n == 0 else float(stats.binomtest(n01, n, 0.5).pvalue)
    return {"a_right_b_wrong": n01, "a_wrong_b_right": n10, "p_value": p}


def expected_calibration_error(y_true: Sequence, p: Sequence, n_bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of (bin share) x |observed rate - mean predicted probability|."""
    y, s = check_inputs(y_true, p)
    bins = np.clip((s * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - s[sel].mean())
    return float(ece)


def calibration_summary(y_true: Sequence, p: Sequence, n_bins: int = 10) -> dict:
    """ECE, Brier score and the reliability-diagram points (scikit-learn's ``calibration_curve``)."""
    y, s = check_inputs(y_true, p)
    frac_pos, mean_pred = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
    return {
        "ece": expected_calibration_error(y, s, n_bins),
        "brier": float(brier_score_loss(y, s)),
        **calibration_slope_intercept(y, s),
        "reliability": {"mean_predicted": mean_pred.tolist(), "fraction_positive": frac_pos.tolist()},
    }


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_temperature(y_true: Sequence, p: Sequence) -> float:
    """Fit temperature scaling (Guo et al., 2017) on validation data by minimising the log loss.

    For two classes the softmax probability is ``sigmoid(z1 - z0)``, so the temperature divides that logit.

    Returns:
        ``T`` > 0 (T > 1 softens over-confident predictions).
    """
    from scipy.optimize import minimize_scalar

    y, s = check_inputs(y_true, p)
    z = _logit(s)

    def nll(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-z / math.exp(log_t))), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())

    res = minimize_scalar(nll, bounds=(-3, 3), method="bounded")
    return float(math.exp(res.x))


def apply_temperature(p: Sequence, temperature: float) -> np.ndarray:
    """Rescale probabilities of the positive class with a fitted temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return 1 / (1 + np.exp(-_logit(np.asarray(p, dtype=float)) / temperature))


def calibration_slope_intercept(y_true: Sequence, p: Sequence) -> dict:
    """Calibration slope and intercept as TRIPOD+AI asks for them (logistic recalibration).

    The slope is ``b`` of ``logit P(y=1) = a + b * logit(p)`` (1 = ideal; below 1: predictions too extreme); the
    intercept is calibration-in-the-large, ``a`` with the slope fixed at 1 (0 = ideal; negative: risks too high).
    Both are maximum-likelihood fits (scipy), which scikit-learn's penalised logistic regression is not by default.

    Returns:
        ``{"slope", "intercept"}`` (NaN when only one class is present).
    """
    from scipy.optimize import minimize, minimize_scalar

    y, s = check_inputs(y_true, p)
    if len(np.unique(y)) < 2:
        return {"slope": float("nan"), "intercept": float("nan")}
    z = _logit(s)

    def nll(a: float, b: float) -> float:
        eta = a + b * z
        return float(np.sum(np.logaddexp(0, eta) - y * eta))

    slope = minimize(lambda ab: nll(ab[0], ab[1]), x0=np.array([0.0, 1.0]), method="Nelder-Mead").x[1]
    intercept = minimize_scalar(lambda a: nll(a, 1.0), bounds=(-20, 20), method="bounded").x
    return {"slope": float(slope), "intercept": float(intercept)}


def corrected_resampled_ttest(diffs: Sequence[float], n_train: float, n_test: float) -> dict:
    """The corrected resampled t-test (Nadeau & Bengio 2003; Bouckaert & Frank 2004) for repeated cross-validation.

    The ``R x k`` per-fold differences of two models (same folds) are not independent, since the training sets
    overlap; the naive t-test's variance ``s^2 / n`` is replaced by ``(1 / n + n_test / n_train) * s^2``.

    Args:
        diffs: one difference (e.g. AUC of model minus AUC of baseline) per fold of every repeat.
        n_train: cases used for training in a fold (its training and validation parts).
        n_test: cases scored in a fold.

    Returns:
        ``mean_diff``, ``sd``, ``t``, ``df`` (n - 1), two-sided ``p_value`` and ``n`` (folds x repeats).
    """
    from scipy.stats import t as t_dist

    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2 or n_train <= 0 or n_test <= 0:
        return {"mean_diff": float(d.mean()) if n else math.nan, "sd": math.nan, "t": math.nan, "df": n - 1,
                "p_value": math.nan, "n": n}  # fmt: skip
    mean, var = float(d.mean()), float(d.var(ddof=1))
    se = math.sqrt((1 / n + n_test / n_train) * var)
    if se == 0:
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / se
        p = float(2 * t_dist.sf(abs(t), n - 1))
    return {"mean_diff": mean, "sd": math.sqrt(var), "t": t, "df": n - 1, "p_value": p, "n": n}


def net_benefit(y_true: Sequence, p: Sequence, thresholds: Sequence[float]) -> dict:
    """Decision-curve analysis (Vickers & Elkin 2006): the net benefit of acting on the model at each threshold
    probability ``pt``, ``TP/n - FP/n * pt / (1 - pt)``, beside treating all (``prev - (1 - prev) pt / (1 - pt)``) and
    treating none (0).

    Returns:
        ``{"thresholds", "model", "treat_all"}`` as lists.
    """
    y, s = check_inputs(y_true, p)
    t = np.asarray(thresholds, dtype=float)
    if ((t <= 0) | (t >= 1)).any():
        raise ValueError("threshold probabilities must lie in (0, 1)")
    n, prev = len(y), float(y.mean())
    odds = t / (1 - t)
    tp = np.array([np.sum((s >= x) & (y == 1)) for x in t]) / n
    fp = np.array([np.sum((s >= x) & (y == 0)) for x in t]) / n
    return {
        "thresholds": t.tolist(),
        "model": (tp - fp * odds).tolist(),
        "treat_all": (prev - (1 - prev) * odds).tolist(),
    }
