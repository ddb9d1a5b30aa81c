"""Losses: class-weighted cross-entropy and softmax focal loss for imbalanced lesion classes; the auxiliary losses
that train beside them (attention supervision, an auxiliary segmentation head, adversarial debiasing)."""

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
    "dice_bce_loss",
    "AuxiliarySegmentation",
    "Debiasing",
    "AuxiliaryLosses",
    "sum_totals",
    "reverse_gradient",
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


class _MeanLossTracker:
    """Keeps an auxiliary loss's epoch mean for the metrics row: summed as tensors and read once per epoch (a float()
    per step would wait for the GPU at every step); the totals are additive, so DDP ranks can be summed."""

    metric = ""  # the metrics-row name; totals are f"{metric}_sum" and f"{metric}_batches"

    def __init__(self) -> None:
        self._loss_sum: torch.Tensor | float = 0.0
        self._batches = 0

    def _track(self, loss: torch.Tensor) -> None:
        self._loss_sum, self._batches = self._loss_sum + loss.detach(), self._batches + 1

    def epoch_totals(self) -> dict[str, list[float]]:
        """The epoch's additive counts (summed over DDP ranks by the trainer); starts the next epoch's."""
        totals = {f"{self.metric}_sum": [float(self._loss_sum)], f"{self.metric}_batches": [float(self._batches)]}
        self._loss_sum, self._batches = 0.0, 0
        return totals

    @classmethod
    def epoch_metrics(cls, totals: dict[str, list[float]]) -> dict[str, float]:
        """The mean unweighted loss of the epoch's training batches, under the name ``metric``."""
        if f"{cls.metric}_batches" not in totals:
            return {}
        return {cls.metric: totals[f"{cls.metric}_sum"][0] / max(1.0, totals[f"{cls.metric}_batches"][0])}


class AttentionSupervision(_MeanLossTracker):
    """Collects the spatial-attention map of every forward pass of ``model`` (a hook, so the model is unchanged) and
    turns it into :func:`attention_supervision_loss` against the batch's lesion masks.

    Args:
        model: a classifier with a ``SpatialAttention`` (``CustomModel``; not the baseline or ``no_spatial``).
        weight: the loss weight.

    Raises:
        ValueError: for a model without spatial attention, or a weight that is not positive.
    """

    metric = "attention_loss"

    def __init__(self, model: nn.Module, weight: float) -> None:
        spatial = getattr(getattr(model, "head", None), "spatial", None)
        if spatial is None:
            raise ValueError(
                f"loss.attention_weight needs a model with spatial attention ({getattr(model, 'model_name', '')} has "
                "none); use a custom_* model or set loss.attention_weight: 0"
            )
        if weight <= 0:
            raise ValueError(f"loss.attention_weight must be positive, got {weight}")
        super().__init__()
        self.weight = weight
        self._maps: list[torch.Tensor] = []

        def keep(mod: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
            if mod.training:  # training passes only; validation needs no map
                self._maps.append(mod.attention_map(inputs[0]))

        self._handle = spatial.register_forward_hook(keep)

    def close(self) -> None:
        """Remove the hook (the model is as it was)."""
        self._handle.remove()

    def loss(self, extras: dict) -> torch.Tensor:
        """The weighted loss for the last forward pass, against ``extras["lesion"]`` (N, 1, H, W)."""
        attention = self._maps.pop()
        self._maps.clear()
        loss = attention_supervision_loss(attention, extras["lesion"].to(attention.device))
        self._track(loss)
        return self.weight * loss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss (per image, then averaged), for lesion logits (N, 1, H, W) against
    masks or soft (area-fraction) masks of the same size."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    prob = torch.sigmoid(logits.float())
    inter = (prob * target).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + (1 - soft_dice).mean()


class AuxiliarySegmentation(_MeanLossTracker):
    """An auxiliary segmentation head (multi-task learning): a small convolutional head reads the feature map the
    classifier's head pools and predicts the lesion mask at that map's resolution (the mask area-downsampled to it),
    so the backbone must keep where the lesion is and where its border runs. Unlike attention supervision it needs no
    spatial attention, so the baseline can have it too.

    The head is attached to the model as ``seg_head`` for the training (so the optimiser, checkpoints and resume include
    it) and removed by :meth:`close` before the model is saved, so ``model.pt`` is an ordinary classifier. Images
    without a lesion mask do not count.

    Args:
        model: a :class:`~liverus.models.LesionClassifier` (any ``custom_*`` or ``baseline_*`` model).
        weight: the loss weight.

    Raises:
        ValueError: for a model without a backbone feature map, or a weight that is not positive.
    """

    metric = "segmentation_loss"

    def __init__(self, model: nn.Module, weight: float) -> None:
        spec = getattr(getattr(model, "backbone", None), "spec", None)
        head = getattr(model, "head", None)
        if spec is None or head is None:
            raise ValueError(
                "loss.segmentation_weight needs a CNN classifier (a backbone and a head); set it to 0 for "
                f"{getattr(model, 'model_name', type(model).__name__)}"
            )
        if weight <= 0:
            raise ValueError(f"loss.segmentation_weight must be positive, got {weight}")
        super().__init__()
        self.model, self.weight = model, weight
        device = next(head.parameters()).device
        model.seg_head = nn.Sequential(
            nn.Conv2d(spec.out_channels, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1)
        ).to(device)
        self._maps: list[torch.Tensor] = []

        def keep(mod: nn.Module, inputs: tuple) -> None:
            if mod.training:  # the head's input: the backbone's feature map
                self._maps.append(inputs[0])

        self._handle = head.register_forward_pre_hook(keep)

    def loss(self, extras: dict) -> torch.Tensor:
        """The weighted :func:`dice_bce_loss` of the head on the last forward pass, against ``extras["lesion"]``."""
        feats = self._maps.pop()
        self._maps.clear()
        # The forward pass may have run under autocast (bf16/fp16 features); the head and its loss run in fp32.
        logits = self.model.seg_head(feats.float())
        lesion = extras["lesion"].to(logits.device)
        has = lesion.flatten(1).amax(dim=1) > 0
        if not bool(has.any()):
            return logits.sum() * 0.0
        target = F.adaptive_avg_pool2d(lesion.float(), logits.shape[-2:])
        loss = dice_bce_loss(logits[has], target[has])
        self._track(loss)
        return self.weight * loss

    def close(self) -> None:
        """Remove the hook and the head: the model is an ordinary classifier again."""
        self._handle.remove()
        if hasattr(self.model, "seg_head"):
            del self.model.seg_head


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward (Ganin & Lempitsky's gradient reversal)."""
    return _ReverseGradient.apply(x, scale)


class Debiasing:
    """Adversarial debiasing (Ganin & Lempitsky, 2015): a small head predicts the acquisition group from the
    classifier's pooled features through a gradient-reversal layer, so the backbone is pushed to features from which
    the scanner cannot be told, while the head itself learns to tell it.

    The head is attached to the model as ``debias_head`` for the training (so the optimiser, checkpoints and resume
    include it) and removed by :meth:`close` before the model is saved, so ``model.pt`` is an ordinary classifier.

    Args:
        model: a classifier whose head ends in a linear ``fc`` (every ``custom_*`` and ``baseline_*`` model).
        n_groups: number of acquisition groups.
        weight: weight of the group loss (also the reversal's scale).

    Raises:
        ValueError: for fewer than two groups, a weight that is not positive, or a model without ``head.fc``.
    """

    def __init__(self, model: nn.Module, n_groups: int, weight: float) -> None:
        fc = getattr(getattr(model, "head", None), "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ValueError("loss.debias_weight needs a classifier whose head ends in a linear layer")
        if n_groups < 2:
            raise ValueError(f"debiasing needs at least two acquisition groups in the training part, got {n_groups}")
        if weight <= 0:
            raise ValueError(f"loss.debias_weight must be positive, got {weight}")
        self.model, self.weight = model, weight
        model.debias_head = nn.Sequential(nn.Linear(fc.in_features, 64), nn.ReLU(), nn.Linear(64, n_groups)).to(
            fc.weight.device
        )
        self._features: list[torch.Tensor] = []
        # Counted on the device and read once per epoch (no wait for the GPU at every step).
        self._correct = torch.zeros((), dtype=torch.long, device=fc.weight.device)
        self._counts = torch.zeros(n_groups, dtype=torch.long, device=fc.weight.device)

        def keep(mod: nn.Module, inputs: tuple) -> None:
            if mod.training:
                self._features.append(inputs[0])

        self._handle = fc.register_forward_pre_hook(keep)

    def loss(self, extras: dict) -> torch.Tensor:
        """Cross-entropy of the group head on the last forward pass's features, through the reversal."""
        feats = self._features.pop()
        self._features.clear()
        logits = self.model.debias_head(reverse_gradient(feats.float(), self.weight))
        group = extras["group"].to(logits.device)
        with torch.no_grad():
            self._correct += (logits.argmax(1) == group).sum()
            self._counts += torch.bincount(group, minlength=len(self._counts))
        return self.weight * F.cross_entropy(logits, group)

    def epoch_totals(self) -> dict[str, list[float]]:
        """The epoch's additive counts (summed over DDP ranks by the trainer); starts the next epoch's."""
        totals = {"debias_correct": [float(self._correct)], "debias_group_counts": self._counts.double().tolist()}
        self._correct, self._counts = torch.zeros_like(self._correct), torch.zeros_like(self._counts)
        return totals

    @staticmethod
    def epoch_metrics(totals: dict[str, list[float]]) -> dict[str, float]:
        """How well the adversary told the acquisition group on the epoch's training batches
        (``debias_group_accuracy``) against always guessing the commonest group (``debias_group_chance``): debiasing
        works when the first falls to the second while the classifier's validation AUC holds."""
        counts = totals.get("debias_group_counts")
        if not counts or sum(counts) == 0:
            return {}
        n = sum(counts)
        return {"debias_group_accuracy": totals["debias_correct"][0] / n, "debias_group_chance": max(counts) / n}

    def close(self) -> None:
        """Remove the hook and the head: the model is an ordinary classifier again."""
        self._handle.remove()
        if hasattr(self.model, "debias_head"):
            del self.model.debias_head


class AuxiliaryLosses:
    """Several auxiliary losses summed (each gets the batch's extras)."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def loss(self, extras: dict) -> torch.Tensor:
        return sum(p.loss(extras) for p in self.parts)

    def epoch_totals(self) -> dict[str, list[float]]:
        """Every part's additive counts of the epoch (see :func:`sum_totals` for DDP ranks)."""
        return {k: v for p in self.parts for k, v in p.epoch_totals().items()}

    def epoch_metrics(self, totals: dict[str, list[float]]) -> dict[str, float]:
        """Every part's epoch metrics from the (rank-summed) totals."""
        return {k: v for p in self.parts for k, v in p.epoch_metrics(totals).items()}

    def close(self) -> None:
        for p in self.parts:
            p.close()


def sum_totals(per_rank: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Element-wise sum of the ranks' epoch totals (one dict per rank, the same keys and lengths)."""
    return {k: [sum(vals) for vals in zip(*(t[k] for t in per_rank), strict=True)] for k in per_rank[0]}
