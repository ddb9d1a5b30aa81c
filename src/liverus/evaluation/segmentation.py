"""Segmentation metrics: Dice, IoU, the 95th-percentile Hausdorff distance and detection, per class with intervals.

Dice and IoU follow their usual definitions (Maier-Hein et al., "Metrics reloaded", 2024); HD95 is the 95th
percentile of the symmetric surface distances, computed from SciPy's Euclidean distance transform (MONAI's
``compute_hausdorff_distance`` does the same, but MONAI is too large a dependency for one function). A lesion counts
as *detected* when the largest predicted region overlaps the true lesion (the region a box-free pipeline crops).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverus.engine.segment import largest_region

__all__ = ["dice", "iou", "hd95", "largest_region", "segmentation_summary"]


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    p, t = pred.astype(bool), true.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union of two binary masks (1.0 when both are empty)."""
    p, t = pred.astype(bool), true.astype(bool)
    union = (p | t).sum()
    return 1.0 if union == 0 else float((p & t).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th percentile of the symmetric boundary distances, in pixels (NaN when one mask is empty)."""
    p, t = pred.astype(bool), true.astype(bool)
    if not p.any() or not t.any():
        return float("nan")
    sp, st = _surface(p), _surface(t)
    d_to_t = ndimage.distance_transform_edt(~st)[sp]
    d_to_p = ndimage.distance_transform_edt(~sp)[st]
    return float(np.percentile(np.concatenate([d_to_t, d_to_p]), 95))


def _mean_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    return {"mean": float(v.mean()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "n": int(len(v))}  # fmt: skip


def segmentation_summary(
    preds: Sequence[np.ndarray],
    trues: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Per-image metrics summarised for all images and per class, with percentile-bootstrap 95% intervals.

    Args:
        preds: predicted binary masks.
        trues: expert masks, one per prediction.
        labels: each image's class (e.g. benign / malignant).

    Returns:
        ``{"all": {metric: {"mean", "ci95", "n"}}, "by_class": {class: {...}}}`` for ``dice``, ``iou``, ``hd95``
        and ``detected``.
    """
    rows = []
    for p, t in zip(preds, trues, strict=True):
        big = largest_region(p)
        rows.append([dice(p, t), iou(p, t), hd95(p, t), float((big & t.astype(bool)).any())])
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    names = ("dice", "iou", "hd95", "detected")
    rng = np.random.default_rng(seed)
    labels_a = np.asarray(labels)

    def summarise(sel: np.ndarray) -> dict:
        return {name: _mean_ci(arr[sel, i], n_boot, rng) for i, name in enumerate(names)}

    out = {"all": summarise(np.ones(len(arr), bool)), "by_class": {}}
    for cls in sorted(set(labels_a.tolist())):
        out["by_class"][cls] = summarise(labels_a == cls)
    return out


def evaluate_segmenter(model_path, data, out, *, n_boot: int = 2000, skip_bad: bool = False) -> dict:
    """``liverus segment evaluate``: Dice, IoU, HD95 and detection per class on labelled data with lesion masks;
    writes ``metrics.json`` and ``report.html`` to ``out`` (never over an earlier evaluation).

    Raises:
        ValueError: if ``out`` holds an evaluation, or no image of ``data`` has a lesion mask.
    """
    from pathlib import Path

    from liverus.data import CaseCache, load_cases, prepare_cases
    from liverus.engine.segment import segment_cases
    from liverus.evaluation.report import render_report, table_html
    from liverus.models.segmentation import load_segmenter
    from liverus.utils import atomic_write_json

    out = Path(out)
    if (out / "metrics.json").exists():
        raise ValueError(f"{out} already holds an evaluation (metrics.json); choose another --out")
    model, card = load_segmenter(model_path)
    cases = [c for c in load_cases(data) if c.mask or c.polygon]
    if not cases:
        raise ValueError(f"no image in {data} has a lesion mask; segmentation is scored against masks")
    cache = CaseCache(card.require_preprocess(model_path))
    cases, skipped = prepare_cases(cases, cache, skip_bad=skip_bad)
    preds, trues = segment_cases(model, card, cases, cache)
    summary = segmentation_summary(preds, trues, [c.label for c in cases], n_boot=n_boot)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", {"model": str(model_path), "data": str(data), "skipped": skipped,
                                             "evaluation": summary})  # fmt: skip
    rows = []
    for group, metrics in [("all", summary["all"]), *summary["by_class"].items()]:
        rows.append([group, metrics["dice"]["n"]] + [_fmt_ci(metrics[m]) for m in ("dice", "iou", "hd95", "detected")])
    sections = [("Segmentation", table_html(["images", "n", "Dice", "IoU", "HD95 (px)", "detected"], rows)
                 + "<p>Per-image means with percentile-bootstrap 95% intervals, on the preprocessed images. A "
                 "segmentation that is better for one class than the other can itself carry the class into a "
                 "classifier that uses predicted masks.</p>")]  # fmt: skip
    render_report(out / "report.html", f"liverus segmentation: {card.model_name}", sections,
                  subtitle=f"{model_path} on {data}")  # fmt: skip
    text = "\n".join(
        f"{group}: Dice {_fmt_ci(m['dice'])}, IoU {_fmt_ci(m['iou'])}, HD95 {_fmt_ci(m['hd95'])} px, detected "
        f"{_fmt_ci(m['detected'])} (n={m['dice']['n']})"
        for group, m in [("all", summary["all"]), *summary["by_class"].items()]
    )
    return {"evaluation": summary, "text": text + f"\nreport: {out / 'report.html'}"}


def _fmt_ci(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.3f} [{lo:.3f}, {hi:.3f}]"
