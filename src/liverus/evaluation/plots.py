"""Figures with matplotlib (Agg backend, no display needed). Each function writes a PNG and returns its path."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from liverus.evaluation.analysis import Predictions  # noqa: E402
from liverus.utils import atomic_write_bytes  # noqa: E402

__all__ = ["roc_plot", "pr_plot", "confusion_plot", "reliability_plot", "training_curves_plot", "fold_plot"]

_FPR_GRID = np.linspace(0, 1, 101)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buf = io.BytesIO()  # rendered in memory, then renamed into place: no half-written figure
    fig.savefig(buf, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _roc_band(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    curves = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        fpr, tpr, _ = roc_curve(y[idx], p[idx])
        curves.append(np.interp(_FPR_GRID, fpr, tpr))
    arr = np.array(curves)
    return np.quantile(arr, 0.025, axis=0), np.quantile(arr, 0.975, axis=0)


def roc_plot(
    preds: dict[str, Predictions],
    path: Path,
    *,
    n_boot: int = 200,
    seed: int = 0,
    aucs: dict[str, tuple[float, float, float]] | None = None,
) -> Path:
    """ROC curves of several models in one figure, each with a 95% bootstrap band."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, pr in preds.items():
        if len(np.unique(pr.y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(pr.y, pr.p)
        label = name
        if aucs and name in aucs:
            a, lo, hi = aucs[name]
            label = f"{name}: AUC {a:.3f} [{lo:.3f}, {hi:.3f}]"
        (line,) = ax.plot(fpr, tpr, lw=1.8, label=label)
        if n_boot:
            lo_b, hi_b = _roc_band(pr.y, pr.p, n_boot, seed)
            ax.fill_between(_FPR_GRID, lo_b, hi_b, color=line.get_color(), alpha=0.15)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title="ROC (bands: 95% bootstrap)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def pr_plot(preds: dict[str, Predictions], path: Path) -> Path:
    """Precision-recall curves with the prevalence as the no-skill line."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    prevalence = None
    for name, pr in preds.items():
        if len(np.unique(pr.y)) < 2:
            continue
        prec, rec, _ = precision_recall_curve(pr.y, pr.p)
        ax.plot(rec, prec, lw=1.8, label=name)
        prevalence = pr.y.mean()
    if prevalence is not None:
        ax.axhline(prevalence, color="k", ls=":", lw=1, label=f"prevalence {prevalence:.2f}")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title="Precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def confusion_plot(cm: list[list[int]], classes: tuple[str, ...], path: Path, title: str = "") -> Path:
    """A confusion matrix with counts (rows: truth, columns: prediction)."""
    arr = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(arr, cmap="Blues")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(
                j,
                i,
                str(arr[i, j]),
                ha="center",
                va="center",
                color="white" if arr[i, j] > arr.max() / 2 else "black",
            )
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    return _save(fig, path)


def reliability_plot(preds: dict[str, Predictions], path: Path, n_bins: int = 10) -> Path:
    """Reliability diagram: observed malignancy rate against mean predicted probability per bin."""
    from sklearn.calibration import calibration_curve

    from liverus.evaluation.stats import expected_calibration_error

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for name, pr in preds.items():
        frac, mean = calibration_curve(pr.y, pr.p, n_bins=n_bins)
        ece = expected_calibration_error(pr.y, pr.p, n_bins)
        ax.plot(mean, frac, "o-", ms=4, label=f"{name} (ECE {ece:.3f})")
    ax.set(
        xlabel="mean predicted probability of malignancy",
        ylabel="observed fraction malignant",
        title="Reliability",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def decision_curve_plot(preds: dict[str, Predictions], path: Path) -> Path:
    """Decision curve: net benefit of each model against treating all and treating none, threshold 1-60%."""
    from liverus.evaluation.stats import net_benefit

    t = np.linspace(0.01, 0.6, 60)
    fig, ax = plt.subplots(figsize=(5, 4))
    first = next(iter(preds.values()))
    ax.plot(t, net_benefit(first.y, first.p, t)["treat_all"], "k--", lw=1, label="treat all")
    ax.axhline(0, color="k", lw=1, label="treat none")
    for name, pr in preds.items():
        ax.plot(t, net_benefit(pr.y, pr.p, t)["model"], lw=1.5, label=name)
    prev = float(np.mean(first.y))
    ax.set(xlabel="threshold probability of malignancy", ylabel="net benefit", title="Decision curve",
           ylim=(-0.05, max(prev, 0.05) * 1.1))  # fmt: skip
    ax.legend(fontsize=7)
    return _save(fig, path)


def training_curves_plot(metrics_csvs: dict[str, Path], path: Path) -> Path:
    """Training and validation loss, and validation AUC, per epoch (one line per run)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    plotted = False
    for name, f in metrics_csvs.items():
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        plotted = True
        ep = [int(r["epoch"]) for r in rows]
        a1.plot(ep, [float(r["train_loss"]) for r in rows], label=f"{name} train")
        a1.plot(ep, [float(r["val_loss"]) for r in rows], "--", label=f"{name} val")
        a2.plot(ep, [float(r["val_auc"]) for r in rows], label=name)
    a1.set(xlabel="epoch", ylabel="loss", title="Loss")
    a2.set(xlabel="epoch", ylabel="validation AUC", title="Validation AUC", ylim=(0.4, 1.0))
    if plotted:
        a1.legend(fontsize=6)
        a2.legend(fontsize=6)
    else:  # fitted feature models have no epochs
        for ax in (a1, a2):
            ax.text(0.5, 0.5, "no epochs (fitted, not trained by descent)", ha="center", va="center", fontsize=8)
    return _save(fig, path)


def fold_plot(per_fold_auc: dict[str, list[float]], path: Path) -> Path:
    """Test AUC of every fold, per model, with the mean."""
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(per_fold_auc)), 3.6))
    for i, vals in enumerate(per_fold_auc.values()):
        v = np.asarray(vals, dtype=float)
        ax.scatter(np.full(len(v), i) + np.linspace(-0.12, 0.12, len(v)), v, s=18)
        ax.hlines(np.nanmean(v), i - 0.25, i + 0.25, color="k")
    ax.set_xticks(range(len(per_fold_auc)), list(per_fold_auc), rotation=20, ha="right", fontsize=7)
    ax.set(ylabel="fold AUC", title="Per-fold AUC (bar: mean)")
    return _save(fig, path)
