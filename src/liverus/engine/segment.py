"""Using a lesion segmenter: predicted masks in the original image's pixels, and the lesion box they propose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from liverus.data.cases import Case
from liverus.data.preprocess import PreprocessConfig, preprocess
from liverus.engine.forward import normalize_images
from liverus.engine.heatmaps import heatmap_on_original

if TYPE_CHECKING:  # the decoded-image cache pulls in augmentation, which predicting one image does not need
    from liverus.data.dataset import CaseCache
from liverus.models.card import ModelCard

__all__ = ["LesionProposal", "segment_preprocessed", "propose_lesion", "largest_region", "segment_cases"]


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a binary mask (empty stays empty)."""
    labels, n = ndimage.label(mask.astype(bool), structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = ndimage.sum_labels(np.ones(mask.shape), labels, index=np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


@dataclass
class LesionProposal:
    """A predicted lesion: ``mask`` (H, W) {0, 1} in the original image, its ``box`` ``(x0, y0, x1, y1)`` and the
    mean lesion probability inside it (``None`` when nothing was found); ``crop_probability`` (S, S) is the lesion
    probability on the preprocessed image, where segmentation is scored."""

    mask: np.ndarray
    box: tuple[float, float, float, float] | None
    confidence: float | None
    crop_probability: np.ndarray | None = None


@torch.inference_mode()
def segment_preprocessed(model: torch.nn.Module, card: ModelCard, images_u8: np.ndarray) -> np.ndarray:
    """Lesion probabilities (N, S, S) for preprocessed gray images ``(N, S, S)`` ``uint8``."""
    model.eval()
    x = normalize_images(torch.from_numpy(np.ascontiguousarray(images_u8))[:, None], *card.normalization, 1)
    return torch.sigmoid(model(x).float())[:, 0].numpy()


def propose_lesion(
    model: torch.nn.Module, card: ModelCard, image: np.ndarray, threshold: float = 0.5
) -> LesionProposal:
    """Segment a gray float image (H, W) and keep its largest predicted lesion.

    Returns:
        The lesion in the original image's pixels (an empty mask and ``box=None`` when none is found).
    """
    cfg: PreprocessConfig = card.require_preprocess("the segmenter")
    pre = preprocess(image, cfg)
    prob = segment_preprocessed(model, card, pre.image[None])[0]
    full = heatmap_on_original(prob, pre.box, image.shape[:2], letterbox=cfg.letterbox)
    mask = largest_region(full >= threshold)
    if not mask.any():
        return LesionProposal(mask.astype(np.uint8), None, None, prob)
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return LesionProposal(mask.astype(np.uint8), box, float(full[mask].mean()), prob)


def segment_cases(
    model: torch.nn.Module, card: ModelCard, cases: list[Case], cache: CaseCache, threshold: float = 0.5
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predicted and expert masks (on the preprocessed images) of ``cases``. Returns: ``(preds, trues)``."""
    preds, trues = [], []
    for start in range(0, len(cases), 32):
        arrs = np.stack([cache.get(c) for c in cases[start : start + 32]])
        prob = segment_preprocessed(model, card, arrs[:, 0])
        preds.extend(prob >= threshold)
        trues.extend(arrs[:, 2] > 0)
    return preds, trues
