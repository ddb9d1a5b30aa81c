"""Losses for imbalanced lesion classes: class-weighted cross-entropy and softmax focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "class_weights",
    "FocalLoss",
    "build_loss",
    "attention_supervision_loss",
    "AttentionSupervision",
]


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (k * n_c)`` (scikit-learn's "balanced"), so a balanced set gets all ones.

    Raises:
        ValueError: if a class has no examples.
    """
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=num_classes).double()
    if (counts == 0).any():
        missing = [i for i, c in enumerate(counts.tolist()) if c == 0]
        raise ValueError(f"class index(es) {missing} have no training examples")
    return (counts.sum() / (num_classes * counts)).float()


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al., 2017): ``-alpha_y (1 - p_y)^gamma log p_y``, averaged over the batch.

    Written here because torchvision only ships the sigmoid (binary, one-logit) form, while liverus models emit
    one logit per class. With ``gamma=0`` and no ``alpha`` it equals cross-entropy.

    Args:
        gamma: focusing parameter (>= 0).
        alpha: optional per-class weights.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("alpha", alpha if alpha is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        ce = F.nll_loss(logp, target, reduction="none")
        if self.label_smoothing > 0:
            ce = (1 - self.label_smoothing) * ce - self.label_smoothing * logp.mean(dim=1)
        p_t = logp.gather(1, target[:, None]).squeeze(1).exp()
        loss = (1 - p_t).pow(self.gamma) * ce
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


LOSSES = ("ce", "weighted_ce", "focal")


def build_loss(
    name: str,
    targets: Sequence[int],
    num_classes: int,
    *,
    focal_gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Build ``ce``, ``weighted_ce`` (inverse-frequency weights) or ``focal`` (with the same weights as alpha).

    Raises:
        ValueError: for an unknown name.
    """
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    weights = class_weights(targets, num_classes)
    if name == "weighted_ce":
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(focal_gamma, weights, label_smoothing)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def attention_supervision_loss(attention: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between a spatial-attention map and the lesion mask at the map's resolution.

    The mask is area-downsampled to the map's size (the fraction of each cell inside the lesion) and only images that
    have a lesion count. This teaches ``SpatialAttention`` to weight the lesion, the way attention-supervised
    networks in medical imaging are guided by annotations.

    Args:
        attention: (N, 1, h, w) in [0, 1].
        lesion: (N, 1, H, W) lesion masks (any dtype; non-zero inside).

    Returns:
        The mean loss over images with a lesion (0 when none has one).
    """
    target = F.adaptive_avg_pool2d(lesion.float(), attention.shape[-2:])
    has = lesion.flatten(1).amax(dim=1) > 0
    if not bool(has.any()):
        return attention.sum() * 0.0
    a = attention.float().clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(a[has], target[has].to(a.device))


class AttentionSupervision:
    """Collects the spatial-attention map of every forward pass of ``model`` (a hook, so the model is unchanged) and
    turns it into :func:`attention_supervision_loss` against the batch's lesion masks.

    Args:
        model: a classifier with a ``SpatialAttention`` (``CustomModel``; not the baseline or ``no_spatial``).
        weight: the loss weight.

    Raises:
        ValueError: for a model without spatial attention, or a weight that is not positive.
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        spatial = getattr(getattr(model, "head", None), "spatial", None)
        if spatial is None:
            raise ValueError(
                f"loss.attention_weight needs a model with spatial attention ({getattr(model, 'model_name', '')} has "
                "none); use a custom_* model or set loss.attention_weight: 0"
            )
        if weight <= 0:
            raise ValueError(f"loss.attention_weight must be positive, got {weight}")
        self.weight = weight
        self._maps: list[torch.Tensor] = []

        def keep(mod: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
            if mod.training:  # training passes only; validation needs no map
                self._maps.append(mod.attention_map(inputs[0]))

        self._handle = spatial.register_forward_hook(keep)

    def close(self) -> None:
        """Remove the hook (the model is as it was)."""
        self._handle.remove()

    def loss(self, lesion: torch.Tensor) -> torch.Tensor:
        """The weighted loss for the last forward pass."""
        attention = self._maps.pop()
        self._maps.clear()
        return self.weight * attention_supervision_loss(attention, lesion)
