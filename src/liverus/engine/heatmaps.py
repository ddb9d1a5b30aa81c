"""Heatmaps: Grad-CAM (pytorch-grad-cam) on the layer each backbone names, the model's own spatial-attention map,
and colour overlays for people to look at."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gradcam_target_layers", "gradcam_heatmap", "attention_heatmap", "overlay", "save_overlay"]


def gradcam_target_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers Grad-CAM looks at: whatever the backbone names (its last convolutional stage); every member's for
    an ensemble (pytorch-grad-cam averages their maps).

    Raises:
        ValueError: for a model whose backbone names none.
    """
    try:
        return model.gradcam_layers()
    except (AttributeError, NotImplementedError):
        raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}") from None


def gradcam_heatmap(model: torch.nn.Module, x: torch.Tensor, target_class: int = 1) -> np.ndarray:
    """Grad-CAM of ``target_class`` (1 = malignant) for normalised model inputs ``x`` (N, C, H, W).

    Returns:
        (N, H, W) heatmaps in [0, 1].
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    with torch.enable_grad(), GradCAM(model=model, target_layers=gradcam_target_layers(model)) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)] * len(x))
    model.train(was_training)
    return np.clip(np.asarray(maps, dtype=np.float32), 0, 1)


def attention_heatmap(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The spatial-attention map of a ``CustomModel`` for normalised inputs, upsampled to the input size, in [0, 1].

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
