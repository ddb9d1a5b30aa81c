"""``liverus explain``: maps of what raised or lowered the score (occlusion by default for feature models, Grad-CAM
for CNNs; every map the model has with ``--method all``), written as PNG files; for feature models (``radiomics_*``)
also each feature group's contribution to the decision (a chart with where the training lesions of each class put
each group, and its numbers as JSON).

The maps are computed in :mod:`liverus.engine.attribution` (occlusion) and :mod:`liverus.engine.heatmaps` (Grad-CAM,
attention), their faithfulness in :mod:`liverus.evaluation.faithfulness`, and the contributions in
:mod:`liverus.engine.contributions`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from liverus.data.inputs import input_items, parse_box
from liverus.data.io import DataError, printable, read_image, read_mask
from liverus.engine.heatmaps import save_overlay
from liverus.engine.predictor import Predictor
from liverus.utils import atomic_write_json

__all__ = ["run_explain"]


def run_explain(args: argparse.Namespace) -> int:
    """Write one map PNG per image and method (and, for feature models, ``STEM_features.png`` and ``.json``);
    print each image's probability. Returns: the exit code."""
    predictor = Predictor.from_path(
        args.model, segmenter=getattr(args, "segmenter", None), box_average=getattr(args, "box_average", None)
    )
    if not predictor.methods:
        raise ValueError("liverus explain needs the PyTorch model.pt (ONNX exports carry no maps)")
    features = predictor.has_contributions
    method = getattr(args, "method", "default")
    if method == "all" or (method == "default" and predictor.default_method is None):
        methods = list(predictor.methods)  # a CNN has no default map: each is drawn, labelled as not verified
    else:
        methods = [predictor.check_method(method)]
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
        for name in methods:
            fig = predictor.heatmap_figure(pre, img, prob, name, lesion_source=source)
            dest = save_overlay(out / f"{Path(item.path).stem}_{name}.png", fig)
            print(f"{item.path}: p(malignant)={prob:.3f} -> {dest}")
        if features:
            found, chart = predictor.contributions_chart(pre, prob)
            shares = found.as_dicts()[0]
            stem = out / f"{Path(item.path).stem}_features"
            atomic_write_json(stem.with_suffix(".json"), {
                "path": printable(item.path), "model": predictor.name, "p_malignant": round(prob, 6),
                "baseline_logit": round(float(found.baseline[0]), 6), "logit": round(float(found.logit[0]), 6),
                "reference_probability": round(float(found.baseline_probability[0]), 6),
                "contributions": shares, "training_lesions": found.training_context(), "lesion_source": source,
            })  # fmt: skip
            dest = save_overlay(stem.with_suffix(".png"), chart)
            top = ", ".join(f"{k} {v:+.2f}" for k, v in list(shares.items())[:3])
            print(f"{item.path}: p(malignant)={prob:.3f}; log-odds from {top} -> {dest}")
    return 1 if bad else 0
