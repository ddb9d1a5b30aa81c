"""Summaries of three-class studies (normal / benign / malignant) of ``liverus cv`` / ``compare``.

The binary summary (:func:`liverus.evaluation.study.summarize_study`) is built around one malignancy probability:
DeLong, operating points, decision curves. A three-class study is summarised on its own terms instead: per repeat,
the pooled out-of-fold one-vs-rest AUC and average precision of each class and their macro means (macro average
precision is UltraBench's AUL metric), the confusion matrix at the arg-max, calibration per class; across repeats,
mean ± SD. To compare with binary studies, it also reports the benign-vs-malignant AUC on the lesion images, scored by
``p_malignant / (p_benign + p_malignant)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from liverus.engine.predictions import read_class_probabilities
from liverus.evaluation import plots
from liverus.evaluation.rendering import fmt, write_page
from liverus.evaluation.report import cases_of_run, data_summary, multiclass_evaluation
from liverus.evaluation.stats import delong_ci
from liverus.evaluation.study import fold_runs, model_configs, n_repeats, skipped_files
from liverus.utils import STAGES, atomic_write_json

__all__ = ["summarize_multiclass_study"]


def _benign_vs_malignant(targets: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict:
    """AUC of benign vs malignant on the lesion images, comparable with a binary study's pooled AUC."""
    if not {"benign", "malignant"} <= set(classes):
        return {}
    b, m = classes.index("benign"), classes.index("malignant")
    keep = np.isin(targets, [b, m])
    y = (targets[keep] == m).astype(int)
    score = probs[keep, m] / np.clip(probs[keep, b] + probs[keep, m], 1e-12, None)
    auc, lo, hi = delong_ci(y, score)
    return {"auc": float(auc), "ci95": [float(lo), float(hi)], "n": int(keep.sum())}


def _repeat_rows(ev: dict, bvm: dict) -> dict:
    return {
        "macro_auc": ev["macro"]["auc"],
        "macro_average_precision": ev["macro"]["pr_auc"],
        "accuracy": ev["accuracy"],
        "balanced_accuracy": ev["balanced_accuracy"],
        "auc_per_class": {c: m["auc"] for c, m in ev["per_class"].items()},
        "benign_vs_malignant_auc": bvm.get("auc", float("nan")),
    }


def _mean_sd(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan")}


@STAGES.timed("reports and figures")
def summarize_multiclass_study(out: Path, labels: list[str]) -> dict:
    """Pool each model's out-of-fold class probabilities (per repeat) and write ``summary.json`` and ``report.html``.

    Args:
        out: the study folder.
        labels: model labels (sub-folders of ``out``).

    Returns:
        The summary: per model ``pooled`` (the full evaluation of repeat 0), ``benign_vs_malignant`` (repeat 0),
        ``repeats`` (one row per finished repeat) and ``across_repeats`` (mean ± SD); ``text`` and ``report``.
    """
    out = Path(out)
    study = json.loads((out / "study.json").read_text())
    models, scored = {}, set()
    for label in labels:
        models[label], paths = _pool_model(out, label)
        scored |= paths
    skipped = skipped_files(out)
    analysed = [c for c in cases_of_run(study["config"], out) if c.path in scored]
    summary = {"task": "three_class", "models": labels, "results": models}
    summary["text"] = _multiclass_text(models)
    atomic_write_json(out / "summary.json", summary)
    confusion = {
        label: plots.confusion_plot(
            m["pooled"]["confusion_matrix"],
            tuple(m["classes"]),
            out / "figures" / f"confusion_{label}.png",
            title=label,
        )
        for label, m in models.items()
    }
    write_page(
        out / "report.html",
        "multiclass_study.html.j2",
        title="liverus three-class study: " + ", ".join(labels),
        subtitle=str(out),
        results=models,
        confusion_plots=confusion,
        data_summary=data_summary(analysed),
        skipped_files=skipped,
        model_configs=model_configs(out, labels, study["config"]),
    )
    summary["report"] = str(out / "report.html")
    return summary


def _pool_model(out: Path, label: str) -> tuple[dict, set[str]]:
    """One model's summary over the finished repeats (repeat 0 pooled in full, the others as rows) and the paths of
    the cases repeat 0 scored.

    Raises:
        ValueError: if no repeat of the model is finished.
    """
    rows, pooled, classes, bvm0, scored = [], None, (), {}, set()
    for r in range(n_repeats(out)):
        runs = fold_runs(out, label, r)
        if not runs or not all((run / "predictions_test.csv").is_file() for run in runs):
            continue  # an unfinished repeat is left out, as in the binary summary
        paths, targets, probs, classes = read_class_probabilities([run / "predictions_test.csv" for run in runs])
        # The pooled (first) repeat's macro figures get bootstrap intervals; the others give the spread.
        ev = multiclass_evaluation(probs, targets, classes, n_boot=2000 if pooled is None else 0)
        bvm = _benign_vs_malignant(targets, probs, classes)
        rows.append(_repeat_rows(ev, bvm))
        if pooled is None:
            pooled, bvm0, scored = ev, bvm, set(paths)
    if pooled is None:
        raise ValueError(f"{out / label} holds no finished cross-validation (fold*/predictions_test.csv)")
    across = {
        k: _mean_sd([row[k] for row in rows])
        for k in ("macro_auc", "macro_average_precision", "balanced_accuracy", "benign_vs_malignant_auc")
    }
    result = {
        "classes": list(classes),
        "pooled": pooled,
        "benign_vs_malignant": bvm0,
        "repeats": rows,
        "across_repeats": across,
    }
    return result, scored


def _multiclass_text(models: dict[str, dict]) -> str:
    """The table the study prints: macro AUC, macro average precision, balanced accuracy and benign-vs-malignant AUC
    per model, mean ± SD over the repeats when there are several."""
    lines = [
        f"{'model':34s} {'macro AUC':>10s} {'macro AP':>9s} {'bal. acc':>9s} {'benign vs malignant AUC':>24s} "
        f"{'repeats':>8s}"
    ]
    for label, m in models.items():
        a = m["across_repeats"]
        spread = len(m["repeats"]) > 1

        def cell(key: str, a=a, spread=spread) -> str:
            return f"{fmt(a[key]['mean'])}±{fmt(a[key]['sd'])}" if spread else fmt(a[key]["mean"])

        lines.append(
            f"{label:34s} {cell('macro_auc'):>10s} {cell('macro_average_precision'):>9s} "
            f"{cell('balanced_accuracy'):>9s} {cell('benign_vs_malignant_auc'):>24s} {len(m['repeats']):>8d}"
        )
    return "\n".join(lines)
