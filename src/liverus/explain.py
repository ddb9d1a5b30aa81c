"""``liverus explain``: Grad-CAM and spatial-attention overlays for images, written as PNG files; for feature models
(``radiomics_*``) also each feature group's contribution to the decision (a bar chart and its numbers as JSON).

The heatmaps themselves are computed in :mod:`liverus.engine.heatmaps`, their agreement with lesion masks in
:mod:`liverus.evaluation.faithfulness`, and the contributions in :mod:`liverus.engine.contributions`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from liverus.data.inputs import input_items, parse_box
from liverus.data.io import DataError, printable, read_image, read_mask
from liverus.engine.contributions import contributions_figure
from liverus.engine.heatmaps import save_overlay
from liverus.engine.predictor import Predictor
from liverus.utils import atomic_write_json

__all__ = ["run_explain"]


def run_explain(args: argparse.Namespace) -> int:
    """Write one overlay PNG per image and method (and, for feature models, ``STEM_features.png`` and ``.json``);
    print each image's probability. Returns: the exit code."""
    predictor = Predictor.from_path(
        args.model, segmenter=getattr(args, "segmenter", None), box_average=getattr(args, "box_average", None)
    )
    if predictor.model is None:
        raise ValueError("liverus explain needs the PyTorch model.pt (ONNX exports carry no gradients)")
    features = predictor.has_contributions
    methods = ["gradcam", "attention"] if args.method == "both" else [args.method]
    if not predictor.has_heatmaps:
        if not features:
            raise ValueError(f"model {predictor.name} has no convolutional layers, so it has no heatmap to explain")
        methods = []  # radiomics only, or boosted trees: the feature contributions are the explanation
    if "attention" in methods and not predictor.model.has_spatial_attention:
        if args.method == "attention":
            raise ValueError(f"model {predictor.name} has no spatial attention; use --method gradcam")
        methods.remove("attention")
    out = Path(args.out)
    bad = 0
    items = input_items(args.inputs, mask=getattr(args, "mask", None), box=parse_box(getattr(args, "box", None)))
    for item in items:
        if item.problem:
            print(f"skipped {item.path}: {item.problem}", file=sys.stderr)
            bad += 1
            continue
        try:
            img = read_image(item.path)
            lesion = read_mask(item.mask, img.shape) if item.mask else None
            pre = predictor.prepare(img, lesion=lesion, box=item.box)
        except (DataError, ValueError) as exc:
            print(f"skipped {item.path}: {exc.problem if isinstance(exc, DataError) else exc}", file=sys.stderr)
            bad += 1
            continue
        prob = float(predictor.probabilities([pre])[0])
        source = pre.lesion_source
        for method in methods:
            fig = predictor.heatmap_figure(pre, img, prob, method, lesion_source=source)
            dest = save_overlay(out / f"{Path(item.path).stem}_{method}.png", fig)
            print(f"{item.path}: p(malignant)={prob:.3f} -> {dest}")
        if features:
            found = predictor.contributions([pre])
            shares = found.as_dicts()[0]
            stem = out / f"{Path(item.path).stem}_features"
            atomic_write_json(stem.with_suffix(".json"), {
                "path": printable(item.path), "model": predictor.name, "p_malignant": round(prob, 6),
                "baseline_logit": round(float(found.baseline[0]), 6), "logit": round(float(found.logit[0]), 6),
                "contributions": shares, "lesion_source": source,
            })  # fmt: skip
            chart = contributions_figure(
                shares, probability=prob, baseline_probability=float(found.baseline_probability[0])
            )
            dest = save_overlay(stem.with_suffix(".png"), chart)
            top = ", ".join(f"{k} {v:+.2f}" for k, v in list(shares.items())[:3])
            print(f"{item.path}: p(malignant)={prob:.3f}; log-odds from {top} -> {dest}")
    return 1 if bad else 0
