"""``liverus explain``: Grad-CAM and spatial-attention overlays for images, written as PNG files.

The heatmaps themselves are computed in :mod:`liverus.engine.heatmaps`; their agreement with lesion masks in
:mod:`liverus.evaluation.faithfulness`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from liverus.data.inputs import expand_inputs
from liverus.data.io import DataError, read_image
from liverus.engine.heatmaps import overlay, save_overlay
from liverus.engine.predictor import Predictor

__all__ = ["run_explain"]


def run_explain(args: argparse.Namespace) -> int:
    """Write one overlay PNG per image and method; print each image's probability. Returns: the exit code."""
    predictor = Predictor.from_path(args.model)
    if predictor.model is None:
        raise ValueError("liverus explain needs the PyTorch model.pt (ONNX exports carry no gradients)")
    methods = ["gradcam", "attention"] if args.method == "both" else [args.method]
    if "attention" in methods and not predictor.model.has_spatial_attention:
        if args.method == "attention":
            raise ValueError(f"model {predictor.name} has no spatial attention; use --method gradcam")
        methods.remove("attention")
    out = Path(args.out)
    bad = 0
    for path in expand_inputs(args.inputs):
        try:
            img = read_image(path)
        except DataError as exc:
            print(f"skipped {exc}", file=sys.stderr)
            bad += 1
            continue
        pre = predictor.prepare(img)
        prob = float(predictor.probabilities([pre])[0])
        for method in methods:
            heat = predictor.heatmap(pre, method)
            dest = save_overlay(out / f"{Path(path).stem}_{method}.png", overlay(pre.image, heat))
            print(f"{path}: p(malignant)={prob:.3f} -> {dest}")
    return 1 if bad else 0
