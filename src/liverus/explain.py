"""``liverus explain``: Grad-CAM and spatial-attention overlays for images, written as PNG files.

The heatmaps themselves are computed in :mod:`liverus.engine.heatmaps`; their agreement with lesion masks in
:mod:`liverus.evaluation.faithfulness`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from liverus.data.inputs import input_items, parse_box
from liverus.data.io import DataError, read_image, read_mask
from liverus.engine.heatmaps import save_overlay
from liverus.engine.predictor import Predictor

__all__ = ["run_explain"]


def run_explain(args: argparse.Namespace) -> int:
    """Write one overlay PNG per image and method; print each image's probability. Returns: the exit code."""
    predictor = Predictor.from_path(args.model, segmenter=getattr(args, "segmenter", None))
    if predictor.model is None:
        raise ValueError("liverus explain needs the PyTorch model.pt (ONNX exports carry no gradients)")
    if not predictor.has_heatmaps:
        raise ValueError(f"model {predictor.name} has no convolutional layers, so it has no heatmap to explain")
    methods = ["gradcam", "attention"] if args.method == "both" else [args.method]
    if "attention" in methods and not predictor.model.has_spatial_attention:
        if args.method == "attention":
            raise ValueError(f"model {predictor.name} has no spatial attention; use --method gradcam")
        methods.remove("attention")
    out = Path(args.out)
    bad = 0
    items = input_items(args.inputs, mask=getattr(args, "mask", None), box=parse_box(getattr(args, "box", None)))
    for item in items:
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
    return 1 if bad else 0
