"""Attribution by perturbation: which parts of each view moved the score, measured by hiding them (captum's
``Occlusion``), and the deletion / insertion curves that check any map against the model.

Occlusion is faithful by construction: a region's value is the change in the model's log-odds of malignancy when
that region's content is hidden, so it explains every model the same way, a feature model (radiomics, frozen deep
features, the fitted classifier) as much as a CNN. Hidden means *blurred*: the patch is replaced by the same patch
under a strong Gaussian blur (sigma half the patch), which removes texture, margins and small structures but keeps
the local brightness, so no artificial bright or black square (an edge the model would react to) is drawn into the
ultrasound image. The lesion outline (the mask channel) is never hidden: what the outline itself says (shape and
margin) is in the feature contributions (:mod:`~liverus.engine.contributions`), not in the map.

The deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018) hide (deletion) or reveal (insertion) a view's
grid cells in the order a map ranks them and follow the probability of the predicted class: a faithful map makes it
fall fast when deleting and rise fast when inserting. The same blur hides a cell in both curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch

from liverus.engine.forward import model_input

__all__ = [
    "OcclusionGrid",
    "image_channels",
    "hidden_images",
    "occlusion_maps",
    "malignancy_log_odds",
    "cell_order",
    "deletion_insertion",
]


class OcclusionGrid:
    """A ``cells`` x ``cells`` grid of square windows covering a ``size`` x ``size`` view at an even stride, the last
    window ending at the border: when ``size`` is not a multiple of ``cells`` the windows grow until the stride is a
    whole number of pixels, so neighbours overlap by a few pixels (captum's sliding windows then are these cells).

    Raises:
        ValueError: for fewer than 2 or more than 32 cells, or windows under 4 pixels.
    """

    def __init__(self, size: int, cells: int = 8) -> None:
        if not 2 <= cells <= 32:
            raise ValueError(f"an occlusion grid has 2 to 32 cells per side, got {cells}")
        self.size, self.cells = int(size), int(cells)
        self.window = math.ceil(size / cells)
        if self.window < 4:
            raise ValueError(f"{cells} cells on a {size}-pixel view leave windows under 4 pixels; use fewer cells")
        while (size - self.window) % (cells - 1):
            self.window += 1
        self.stride = (size - self.window) // (cells - 1)
        self.starts = [i * self.stride for i in range(cells)]

    def cell_masks(self) -> np.ndarray:
        """(cells * cells, size, size) boolean masks, row by row."""
        out = np.zeros((self.cells**2, self.size, self.size), dtype=bool)
        for r, y in enumerate(self.starts):
            for c, x in enumerate(self.starts):
                out[r * self.cells + c, y : y + self.window, x : x + self.window] = True
        return out


def image_channels(in_chans_per_view: int, views: int) -> list[int]:
    """The gray-image channel of each view in the pixels a model is fed (:func:`~liverus.data.model_pixels`): the
    lesion-mask channel that follows a view's image (lesion-channel models) is not an image and is never hidden."""
    return [v * in_chans_per_view for v in range(views)]


def hidden_images(images: torch.Tensor, window: int) -> torch.Tensor:
    """``images`` (N, V, S, S), float in [0, 1], each blurred with a Gaussian of sigma ``window / 2``: what a hidden
    patch shows (OpenCV's Gaussian blur, borders reflected)."""
    sigma = window / 2
    out = np.stack(
        [[cv2.GaussianBlur(plane, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT) for plane in img]
         for img in images.detach().cpu().float().numpy()]
    )  # fmt: skip
    return torch.from_numpy(out).to(images.device)


def malignancy_log_odds(model: torch.nn.Module, card) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of model pixels (N, C, S, S), float in [0, 1], giving the model's log-odds of malignancy (N,).

    ``model`` returns class logits or (ensembles) log-probabilities; for two classes their difference is the
    log-odds either way. With more classes (normal / benign / malignant) it is the log-odds of the last class,
    malignant, against all the others.
    """

    def score(pixels: torch.Tensor) -> torch.Tensor:
        out = model(model_input(pixels, card)).float()
        if out.shape[1] == 2:
            return out[:, 1] - out[:, 0]
        log_p = torch.log_softmax(out, dim=1)
        return log_p[:, -1] - torch.logsumexp(log_p[:, :-1], dim=1)

    return score


@torch.inference_mode()
def occlusion_maps(
    score: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    channels: list[int],
    *,
    cells: int = 8,
    per_eval: int = 16,
) -> np.ndarray:
    """Occlusion maps of each view's image: the drop in log-odds of malignancy when a grid cell is blurred.

    Args:
        score: :func:`malignancy_log_odds` of the model.
        pixels: (N, C, S, S) model pixels, float in [0, 1] (lesion-mask channels included).
        channels: which channels are images (:func:`image_channels`), one map each.
        cells: grid cells per side (8 on a 224-pixel view: 28-pixel windows, 64 model calls per view).
        per_eval: hidden copies scored per model call (captum's ``perturbations_per_eval``).

    Returns:
        (N, len(channels), S, S) float32 maps in log-odds: positive where the region's content raised the
        probability of malignancy, negative where it lowered it.
    """
    from captum.attr import Occlusion

    pixels = pixels.float()
    grid = OcclusionGrid(pixels.shape[-1], cells)
    images = pixels[:, channels]

    def forward(views: torch.Tensor) -> torch.Tensor:
        full = pixels.repeat(views.shape[0] // pixels.shape[0], 1, 1, 1)
        full[:, channels] = views
        return score(full)

    occlusion = Occlusion(forward)
    maps = occlusion.attribute(
        images,
        sliding_window_shapes=(1, grid.window, grid.window),
        strides=(1, grid.stride, grid.stride),
        baselines=hidden_images(images, grid.window),
        perturbations_per_eval=per_eval,
    )
    return maps.float().cpu().numpy()


def cell_order(heat: np.ndarray, grid: OcclusionGrid, rng: np.random.Generator | None = None) -> np.ndarray:
    """The grid cells from the most to the least important by the mean of ``heat`` (S, S) inside each; a random
    order when ``heat`` is None and ``rng`` is given (the random map every method is compared with)."""
    if heat is None:
        return rng.permutation(grid.cells**2)
    masks = grid.cell_masks()
    means = np.array([heat[m].mean() for m in masks])
    return np.argsort(-means, kind="stable")


@torch.inference_mode()
def deletion_insertion(
    score: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    channel: int,
    orders: np.ndarray,
    *,
    cells: int = 8,
    steps: int = 8,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Deletion and insertion curves of one image for several cell orders of one view.

    Args:
        score: :func:`malignancy_log_odds` of the model.
        pixels: (1, C, S, S) model pixels, float in [0, 1].
        channel: the view's image channel.
        orders: (M, cells * cells) cell orders, most important first (:func:`cell_order`).
        steps: points of each curve after the first (cells hidden or revealed in ``steps`` equal parts).

    Returns:
        ``(deletion (M,), insertion (M,), p)``: the area under each curve of the probability of the class predicted
        for the unchanged image (fraction of cells on the x axis, so both areas are in [0, 1]), and that
        probability. Lower deletion and higher insertion mean a more faithful order.
    """
    pixels = pixels.float()
    grid = OcclusionGrid(pixels.shape[-1], cells)
    masks = torch.from_numpy(grid.cell_masks())
    image = pixels[0, channel]
    hidden = hidden_images(pixels[:, [channel]], grid.window)[0, 0]
    unchanged = float(score(pixels)[0])
    sign = 1.0 if unchanged >= 0 else -1.0  # the predicted class's log-odds
    counts = np.linspace(0, grid.cells**2, steps + 1).round().astype(int)
    batch = []
    for order in orders:
        for deleting in (True, False):
            for k in counts:
                shown = torch.zeros(image.shape, dtype=torch.bool)
                if k:
                    shown = masks[torch.as_tensor(order[:k])].any(0)
                keep = ~shown if deleting else shown
                one = pixels.clone()
                one[0, channel] = torch.where(keep, image, hidden)
                batch.append(one)
    logits = torch.cat([score(torch.cat(batch[i : i + 16])) for i in range(0, len(batch), 16)])
    p = torch.sigmoid(sign * logits).double().numpy().reshape(len(orders), 2, len(counts))
    x = counts / counts[-1]
    area = np.trapezoid(p, x, axis=-1)
    return area[:, 0], area[:, 1], float(1.0 / (1.0 + math.exp(-abs(unchanged))))
