"""Heatmaps: Grad-CAM (pytorch-grad-cam) on the layer each backbone names, the model's own spatial-attention map,
and colour overlays for people to look at.

``predict`` and ``serve`` of an ONNX export import this module in an install without PyTorch: torch (and
pytorch-grad-cam, whose colour overlay ``overlay`` uses) are imported only inside the functions that compute or draw
a map, which an ONNX export never asks for.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from liverus.data.io import write_png

if TYPE_CHECKING:
    import torch

__all__ = [
    "has_gradcam_layers",
    "gradcam_target_layers",
    "gradcam_heatmap",
    "attention_heatmap",
    "overlay",
    "save_overlay",
    "figure_rgb",
    "heatmap_on_original",
    "heatmap_figure",
    "heatmap_plot",
    "attribution_figure",
    "attribution_plot",
]


def has_gradcam_layers(model: torch.nn.Module) -> bool:
    """Whether ``model`` names layers for Grad-CAM (a convolutional backbone whose output has a gradient)."""
    try:
        model.gradcam_layers()
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True


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


class _FirstCallRecorder:
    """For each Grad-CAM target layer, its first output in a forward pass and the gradient of exactly that output.

    pytorch-grad-cam's own recorder (``ActivationsAndGradients``) pairs the i-th target layer with the i-th output
    recorded and the i-th gradient to arrive, which is right when every target layer runs once per forward pass. A
    feature model runs its backbone several times per image (mirror, turns, zooms, the whole-scan view), and an
    ensemble of such members with their own backbones runs them one after another: the second layer's map was then
    the first member's mirrored pass. Keyed by layer, the pairing no longer depends on call or autograd order. The
    first call is the untransformed lesion crop (``LesionFeatureModel`` runs it first), so the map is in image
    coordinates. Same interface as the recorder it replaces (``activations``, ``gradients``, call, ``release``).
    """

    def __init__(self, model: torch.nn.Module, target_layers: list[torch.nn.Module]) -> None:
        self.model = model
        self._outputs: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._count = len(target_layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(target_layers)]

    def _hook(self, index: int):
        def record(module, inputs, output):
            if index in self._outputs:
                return
            self._outputs[index] = output.detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self._grads.__setitem__(index, grad.detach()))

        return record

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.clear()
        return self.model(x)

    def _in_layer_order(self, found: dict[int, torch.Tensor], what: str) -> list[torch.Tensor]:
        missing = [i for i in range(self._count) if i not in found]
        if missing:
            raise RuntimeError(f"Grad-CAM recorded no {what} for target layer(s) {missing}: the model did not run "
                               "them with gradients")  # fmt: skip
        return [found[i].cpu() for i in range(self._count)]

    activations = property(lambda self: self._in_layer_order(self._outputs, "activation"))
    gradients = property(lambda self: self._in_layer_order(self._grads, "gradient"))

    def clear(self) -> None:
        self._outputs.clear()
        self._grads.clear()

    def release(self) -> None:
        self.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _gradcam_context(model: torch.nn.Module) -> AbstractContextManager[None]:
    """The model's own setting for Grad-CAM (a feature model keeps the autograd graph of the mapped pass only)."""
    context = getattr(model, "gradcam_context", None)
    return context() if context is not None else nullcontext()


def gradcam_heatmap(model: torch.nn.Module, x: torch.Tensor, target_class: int | None = None) -> np.ndarray:
    """Grad-CAM of ``target_class`` (None: the last class, malignant) for normalised model inputs ``x`` (N, C, H, W).
    For a model that runs a target layer more than once per image, each layer's first call is the one mapped.

    Returns:
        (N, H, W) heatmaps in [0, 1].
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if target_class is None:
        target_class = int(getattr(model, "num_classes", 2)) - 1
    was_training = model.training
    # Gradients reach the target layer through the input too, so a frozen backbone (feature models) has a map.
    x = x.detach().requires_grad_(True)
    layers = gradcam_target_layers(model)
    with torch.enable_grad(), _gradcam_context(model), GradCAM(model=model, target_layers=layers) as cam:
        cam.activations_and_grads.release()  # replaced by a recorder that pairs by layer (see _FirstCallRecorder)
        cam.activations_and_grads = _FirstCallRecorder(model, layers)
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)] * len(x))
    model.train(was_training)
    return np.clip(np.asarray(maps, dtype=np.float32), 0, 1)


def attention_heatmap(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The spatial-attention map of a ``CustomModel`` for normalised inputs, upsampled to the input size, in [0, 1].

    Raises:
        ValueError: if the model has no spatial attention (baseline, ``no_spatial`` ablation).
    """
    import torch.nn.functional as F

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
    """Save an RGB image as PNG, atomically."""
    return write_png(path, rgb, rgb=True)


def heatmap_on_original(heat: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int], *,
                        letterbox: bool = True) -> np.ndarray:  # fmt: skip
    """Map a heatmap of the preprocessed crop (S, S) back onto the original image (H, W).

    Args:
        heat: [0, 1] heatmap on the model's input.
        box: the crop's box ``(x0, y0, x1, y1)`` in original pixels (``Preprocessed.box``).
        shape: the original image's ``(H, W)``.
        letterbox: whether the crop was letterboxed (aspect kept, padded) or stretched into the square.

    Returns:
        (H, W) heatmap, zero outside the crop.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    s = heat.shape[0]
    if letterbox:  # undo the padding: the crop's content sits centred in the square
        scale = s / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        oy, ox = (s - nh) // 2, (s - nw) // 2
        heat = heat[oy : oy + nh, ox : ox + nw]
    crop = cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    out = np.zeros(shape, np.float32)
    H, W = shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0:sy1, sx0:sx1] = crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return out


def heatmap_figure(crop_u8: np.ndarray, heat: np.ndarray, **kwargs) -> np.ndarray:
    """A figure for people (:func:`heatmap_plot`, same arguments) rendered as an RGB ``uint8`` image."""
    return figure_rgb(heatmap_plot(crop_u8, heat, **kwargs))


def _panels(count: int, height: float = 4.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, height), dpi=100, squeeze=False, layout="constrained")
    return fig, axes[0]


def _original_panel(ax, original_u8: np.ndarray, box: tuple[int, int, int, int], lesion_source: str) -> None:
    """The original image with the analysed region outlined (a map is drawn on it by the caller)."""
    from matplotlib.patches import Rectangle

    ax.imshow(original_u8, cmap="gray", vmin=0, vmax=255)
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5))
    ax.set_title("original image, analysed region outlined", fontsize=9)
    if lesion_source:
        ax.set_xlabel(f"lesion: {lesion_source}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def heatmap_plot(
    crop_u8: np.ndarray,
    heat: np.ndarray,
    *,
    probability: float,
    title: str = "Grad-CAM",
    original_u8: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
    letterbox: bool = True,
    lesion_source: str = "",
    note: str = "",
):
    """The heatmap on the analysed crop with a colour bar and the probability, and, when the original image is
    given, the heatmap drawn back onto it at its own coordinates with the crop outlined; ``note`` (what the map is
    not) above the panels. The colour bar sits below the panels, so no title or label runs into it. Returns: the
    matplotlib figure (:func:`heatmap_figure` renders it; tests read its text boxes)."""
    fig, axes = _panels(2 if original_u8 is not None and box is not None else 1)
    if note:
        fig.suptitle(note, fontsize=9, color="#922b21", wrap=True)
    ax = axes[0]
    ax.imshow(crop_u8, cmap="gray", vmin=0, vmax=255)
    im = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(f"{title}: p(malignant) = {probability:.3f}", fontsize=10)
    ax.axis("off")
    if len(axes) == 2:
        _original_panel(axes[1], original_u8, box, lesion_source)
        full = heatmap_on_original(heat, box, original_u8.shape[:2], letterbox=letterbox)
        axes[1].imshow(np.ma.masked_where(full <= 0, full), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.colorbar(im, ax=list(axes), orientation="horizontal", fraction=0.05, shrink=0.6,
                 label="heatmap (1 = most influential)")  # fmt: skip
    return fig


def attribution_figure(views: list[tuple[str, np.ndarray, np.ndarray]], **kwargs) -> np.ndarray:
    """:func:`attribution_plot` rendered. Returns: an RGB ``uint8`` image."""
    return figure_rgb(attribution_plot(views, **kwargs))


def attribution_plot(
    views: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    probability: float,
    lesion: np.ndarray | None = None,
    original_u8: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
    letterbox: bool = True,
    lesion_source: str = "",
    method: str = "occlusion",
    note: str = "",
):
    """Signed attribution maps (:mod:`~liverus.engine.attribution`) for people: each view with its map (red: the
    region's content raised the probability of malignancy, blue: lowered it; one colour scale for all views), the
    lesion outline on the first view, and, when the original image is given, the first view's map drawn back onto
    it with the analysed region outlined.

    Args:
        views: ``(name, image (S, S) uint8, map (S, S) in log-odds)`` per view, the lesion crop first.
        lesion: the lesion mask of the first view, outlined.
        note: what the maps are not (a map shown on request that failed the faithfulness check), under the title.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    extra = original_u8 is not None and box is not None
    fig, axes = _panels(len(views) + extra, height=4.9)
    scale = max(max(float(np.abs(m).max()) for _, _, m in views), 1e-6)
    colours = ScalarMappable(Normalize(-scale, scale), plt.get_cmap("RdBu_r"))

    def tinted(heat: np.ndarray) -> np.ndarray:
        # Opacity grows with |value|: a region that did not move the score leaves the image as it is.
        rgba = colours.to_rgba(heat)
        rgba[..., 3] = 0.75 * np.clip(np.abs(heat) / scale, 0, 1) ** 0.7
        return rgba

    for i, (name, image, heat) in enumerate(views):
        ax = axes[i]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(tinted(heat))
        if i == 0 and lesion is not None and lesion.any():
            ax.contour(lesion > 0, levels=[0.5], colors="yellow", linewidths=1.0)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if lesion is not None and lesion.any():
        axes[0].set_xlabel("yellow: the lesion outline the model read", fontsize=8)
    if extra:
        _original_panel(axes[-1], original_u8, box, lesion_source)
        axes[-1].imshow(tinted(heatmap_on_original(views[0][2], box, original_u8.shape[:2], letterbox=letterbox)))
    title = f"{method}: what raised (red) or lowered (blue) p(malignant) = {probability:.3f}"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.colorbar(colours, ax=list(axes), orientation="horizontal", fraction=0.05, shrink=0.6,
                 label="change in log-odds of malignancy when the region is hidden (blurred)")  # fmt: skip
    return fig


def figure_rgb(fig) -> np.ndarray:
    """A drawn matplotlib figure as an RGB ``uint8`` image (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
