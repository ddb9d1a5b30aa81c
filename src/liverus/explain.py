"""Heatmaps: Grad-CAM (pytorch-grad-cam) and the model's own spatial-attention map, overlays, and faithfulness
against experts' lesion masks (pointing game, share of heatmap energy inside the lesion)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "gradcam_target_layer",
    "gradcam_heatmap",
    "attention_heatmap",
    "overlay",
    "save_overlay",
    "faithfulness",
    "faithfulness_for_model",
    "run_explain",
]


def gradcam_target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The layer Grad-CAM looks at: the last convolutional stage of the backbone (7x7 at 224 px)."""
    bb = model.backbone
    if hasattr(bb, "layer4"):
        return bb.layer4[-1]
    if hasattr(bb, "net"):
        return bb.net._conv_head
    raise ValueError(f"no Grad-CAM target layer known for backbone {type(bb).__name__}")


def gradcam_heatmap(model: torch.nn.Module, x: torch.Tensor, target_class: int = 1) -> np.ndarray:
    """Grad-CAM of ``target_class`` (1 = malignant) for normalised images ``x`` (N, C, H, W).

    Returns:
        (N, H, W) heatmaps in [0, 1].
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    with torch.enable_grad(), GradCAM(model=model, target_layers=[gradcam_target_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)] * len(x))
    model.train(was_training)
    return np.clip(np.asarray(maps, dtype=np.float32), 0, 1)


def attention_heatmap(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The spatial-attention map of a ``CustomModel``, upsampled to the input size and scaled to [0, 1].

    Raises:
        ValueError: if the model has no spatial attention (baseline, ``no_spatial`` ablation).
    """
    model.eval()
    amap = model.spatial_attention_map(x)
    if amap is None:
        raise ValueError(f"model {getattr(model, 'model_name', '')!r} has no spatial attention map")
    up = F.interpolate(amap.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    return ((up - lo) / np.maximum(hi - lo, 1e-8)).astype(np.float32)


def overlay(gray_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Overlay a [0, 1] heatmap (jet colormap, red = high) on a gray image.

    Returns:
        An **RGB** ``uint8`` image. pytorch-grad-cam's ``show_cam_on_image`` with ``use_rgb=True`` does the colour
        mapping; OpenCV's colormaps are BGR, which this conversion takes care of.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat((gray_u8.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return show_cam_on_image(rgb, heat.astype(np.float32), use_rgb=True, image_weight=1 - alpha)


def save_overlay(path: str | Path, rgb: np.ndarray) -> Path:
    """Save an RGB image as PNG (converted to OpenCV's BGR order for writing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def faithfulness(heatmaps: np.ndarray, lesions: np.ndarray) -> dict:
    """Agreement of heatmaps with lesion masks.

    Args:
        heatmaps: (N, H, W) in [0, 1].
        lesions: (N, H, W) binary masks; cases with an empty mask are ignored.

    Returns:
        ``pointing_game`` (share of heatmaps whose maximum lies inside the lesion), ``energy_inside`` (mean share of
        heatmap mass inside the lesion), ``lesion_area`` (mean lesion share of the image: the chance level of
        ``energy_inside`` for a flat heatmap) and ``n``.
    """
    hits, energy, area = [], [], []
    for h, m in zip(heatmaps, lesions, strict=True):
        m = m > 0
        if not m.any():
            continue
        peak = np.unravel_index(int(np.argmax(h)), h.shape)
        hits.append(bool(m[peak]))
        total = float(h.sum())
        energy.append(float(h[m].sum()) / total if total > 0 else 0.0)
        area.append(float(m.mean()))
    if not hits:
        return {"pointing_game": float("nan"), "energy_inside": float("nan"), "lesion_area": float("nan"), "n": 0}
    return {
        "pointing_game": float(np.mean(hits)),
        "energy_inside": float(np.mean(energy)),
        "lesion_area": float(np.mean(area)),
        "n": len(hits),
    }


def run_explain(args: argparse.Namespace) -> int:
    """``liverus explain``: write overlay PNGs (and print faithfulness when lesion masks are beside the images)."""
    from liverus.data.io import DataError, read_image
    from liverus.inference import Predictor
    from liverus.predict import expand_inputs

    predictor = Predictor.from_path(args.model)
    if predictor.model is None:
        raise ValueError("liverus explain needs the PyTorch model.pt (ONNX exports carry no gradients)")
    methods = ["gradcam", "attention"] if args.method == "both" else [args.method]
    if "attention" in methods and predictor.model.head.spatial is None:
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


def faithfulness_for_model(model_path: str | Path, cases: list, *, max_cases: int = 100, seed: int = 0) -> dict:
    """Grad-CAM (and spatial-attention, where the model has it) faithfulness on cases with lesion masks.

    Args:
        model_path: a run's ``model.pt``.
        cases: cases (only those with a lesion mask or polygon are used), e.g. the held-out fold.
        max_cases: a seeded random sample of at most this many cases keeps the cost bounded on a CPU.

    Returns:
        ``{"gradcam": faithfulness(...), "attention": faithfulness(...) or None}``.
    """
    from liverus.data import CaseCache, PreprocessConfig
    from liverus.models import load_model

    model, extra = load_model(model_path)
    usable = [c for c in cases if c.mask or c.polygon]
    if len(usable) > max_cases:
        idx = np.random.default_rng(seed).choice(len(usable), max_cases, replace=False)
        usable = [usable[i] for i in sorted(idx)]
    if not usable:
        return {"gradcam": faithfulness(np.zeros((0, 1, 1)), np.zeros((0, 1, 1))), "attention": None}
    cache = CaseCache(PreprocessConfig(**extra["preprocess"]))
    mean, std = extra.get("normalization", model.normalization)
    cams, atts, masks = [], [], []
    for start in range(0, len(usable), 16):
        arrs = np.stack([cache.get(c) for c in usable[start : start + 16]])
        x = (torch.from_numpy(arrs[:, :1].astype(np.float32) / 255.0) - mean) / std
        if model.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        cams.append(gradcam_heatmap(model, x))
        if model.head.spatial is not None:
            atts.append(attention_heatmap(model, x))
        masks.append(arrs[:, 2])
    lesions = np.concatenate(masks)
    return {
        "gradcam": faithfulness(np.concatenate(cams), lesions),
        "attention": faithfulness(np.concatenate(atts), lesions) if atts else None,
    }
