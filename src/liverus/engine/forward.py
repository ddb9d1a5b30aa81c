"""The one numerical path from preprocessed pixels to class probabilities.

Training's validation, test scoring, ``evaluate``, ``predict``, ``serve``, ``explain`` and the ONNX graph of
``export`` all go through :func:`normalize_images` (and, except ONNX, :func:`probabilities`), so a model is scored
the same way everywhere it is used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from liverus.engine.averaging import average_probabilities  # its home before engine.averaging; still importable
from liverus.models.card import ModelCard
from liverus.utils import STAGES

__all__ = [
    "normalize_images",
    "model_input",
    "probabilities",
    "predict_probs",
    "average_probabilities",
    "eval_batch_size",
    "merge_shards",
]


def normalize_images(
    x: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, in_chans: int, views: int = 1
) -> torch.Tensor:
    """Gray images (N, 1, H, W), or image plus lesion mask (N, 2, H, W), ``uint8`` or float in [0, 1] -> the
    network's input: the image normalised (and repeated to 3 channels for RGB stems), the mask kept in {0, 1}.
    With ``views`` > 1 the views follow each other along the channels and each is treated alike.
    Out of place for float input (so callers' tensors are never modified) and traceable for ONNX export."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
    if views > 1:
        n, c, h, w = x.shape
        if c % views:
            raise ValueError(f"{views}-view input needs a multiple of {views} channels, got {tuple(x.shape)}")
        per_view = normalize_images(x.reshape(n * views, c // views, h, w), mean, std, in_chans)
        return per_view.reshape(n, -1, h, w)
    if in_chans in (1, 3):
        x = (x - mean) / std
        return x.expand(-1, 3, -1, -1) if in_chans == 3 and x.shape[1] == 1 else x
    if x.shape[1] != 2:
        raise ValueError(f"a model with a lesion-mask channel needs (N, 2, H, W) input, got {tuple(x.shape)}")
    image = (x[:, :1] - mean) / std
    if in_chans == 4:
        image = image.expand(-1, 3, -1, -1)
    return torch.cat([image, x[:, 1:2]], dim=1)


def model_input(x: torch.Tensor, card: ModelCard, *, channels_last: bool = False) -> torch.Tensor:
    """:func:`normalize_images` with the card's statistics and channels, in the requested memory format."""
    x = normalize_images(x, *card.normalization, card.in_chans, card.views)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def probabilities(
    model: nn.Module,
    x: torch.Tensor,
    card: ModelCard,
    *,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Class probabilities (N, k), fp32, of preprocessed gray images ``x`` (N, 1, S, S) on the model's device.

    The caller decides about gradients and train/eval mode (Grad-CAM needs gradients; scoring does not).
    """
    inp = model_input(x, card, channels_last=channels_last)
    with torch.autocast(inp.device.type, dtype=amp, enabled=amp is not None):
        logits = model(inp)
    return F.softmax(logits.float(), dim=1)


@STAGES.timed("scoring (validation, test)")
@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    loader: DataLoader,
    card: ModelCard,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every batch ``(images, targets)`` of ``loader`` in eval mode.

    Returns:
        ``(probabilities (n, k), targets (n,))`` in loader order.
    """
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        p = probabilities(model, x.to(device, non_blocking=True), card, amp=amp, channels_last=channels_last)
        probs.append(p.cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def eval_batch_size(world: int) -> int:
    """Evaluation batch size: 64 images, a multiple of the number of ranks."""
    return max(world, 64 // world * world)


def merge_shards(shards: list, n: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Undo the round-robin split of ``ShardedBatchSampler`` (batch b, rank r) back to dataset order.

    Args:
        shards: each rank's ``(probabilities, targets)`` for its share of the batches of :func:`eval_batch_size`.
        n: number of cases.
        world: number of ranks.
    """
    if world == 1:
        return shards[0]
    bs = eval_batch_size(world)
    pieces: list[list[int]] = [[] for _ in range(world)]
    for start in range(0, n, bs):
        batch = list(range(start, min(start + bs, n)))
        for r in range(world):
            pieces[r].extend(batch[r::world])
    probs = np.zeros((n, shards[0][0].shape[1]), dtype=np.float32)
    tg = np.zeros(n, dtype=np.int64)
    for r, (p, t) in enumerate(shards):
        probs[pieces[r]] = p
        tg[pieces[r]] = t
    return probs, tg
