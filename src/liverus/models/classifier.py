"""Classifiers: a backbone followed by a head. ``CustomModel`` (parallel attention) and ``BaselineModel``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from liverus.models.backbones import Backbone
from liverus.models.heads import ParallelAttentionHead

__all__ = ["LesionClassifier", "CustomModel", "BaselineModel", "LinearHead"]


class LinearHead(nn.Module):
    """Global average pooling -> dropout -> Linear: the classifier of a plain ResNet-50.

    Args:
        in_channels: channels of the backbone feature map.
        num_classes: number of output logits.
        drop_rate: dropout probability before the linear layer.

    Raises:
        ValueError: for fewer than two classes or a dropout outside [0, 1).
    """

    def __init__(self, in_channels: int, num_classes: int = 2, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_channels, num_classes)
        self.spatial = None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))


class LesionClassifier(nn.Module):
    """A backbone and a head; ``forward`` maps (N, in_chans, H, W) images to (N, num_classes) logits.

    Attributes:
        model_name: the registry name it was built under.
        build_kwargs: the keyword arguments of :func:`~liverus.models.build_model` (for rebuilding from a file).
        weights_info: which pretrained weights the backbone got.
    """

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.model_name = ""
        self.build_kwargs: dict = {}

    @property
    def weights_info(self):
        return self.backbone.weights_info

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    @property
    def in_chans(self) -> int:
        return self.backbone.stem().in_channels

    @property
    def has_spatial_attention(self) -> bool:
        return getattr(self.head, "spatial", None) is not None

    def gradcam_layers(self) -> list[nn.Module]:
        """The layers Grad-CAM looks at: the backbone's last convolutional stage."""
        return [self.backbone.gradcam_layer()]

    def gradcam_context(self) -> AbstractContextManager[None]:
        """What Grad-CAM runs the model in (see :meth:`LesionFeatureModel.gradcam_context`): nothing to change for a
        network, whose target layer runs once per image."""
        return nullcontext()

    @property
    def normalization(self) -> tuple[float, float]:
        """Mean and std for single-channel input: the average of the backbone's RGB statistics.

        Averaging matches the summed stem kernel: a gray value g normalised with the mean statistics and convolved
        with the summed kernel approximates the RGB network fed (g, g, g) with per-channel statistics.
        """
        spec = self.backbone.spec
        return float(sum(spec.mean) / 3), float(sum(spec.std) / 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns: the feature map the classifier pools (after attention for :class:`CustomModel`)."""
        return self.head.forward_features(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def spatial_attention_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """Args: images (N, C, H, W). Returns: the spatial attention map (N, 1, h, w) in [0, 1], or ``None``."""
        spatial = getattr(self.head, "spatial", None)
        if spatial is None:
            return None
        maps: list[torch.Tensor] = []
        # The hook recomputes the (cheap) map from the block's input, so the block itself keeps no state.
        handle = spatial.register_forward_hook(lambda mod, inputs, _out: maps.append(mod.attention_map(inputs[0])))
        try:
            self.forward(x)
        finally:
            handle.remove()
        return maps[0]


class CustomModel(LesionClassifier):
    """The parallel-attention model: backbone -> :class:`~liverus.models.heads.ParallelAttentionHead`.

    Use :func:`~liverus.models.build_model` (``"custom_resnet50"`` and its ablations) rather than this constructor.
    """

    def __init__(self, backbone: Backbone, num_classes: int = 2, **head_kwargs) -> None:
        super().__init__(backbone, ParallelAttentionHead(backbone.spec.out_channels, num_classes, **head_kwargs))


class BaselineModel(LesionClassifier):
    """A plain backbone with a new linear classifier (the ResNet-50 baseline)."""

    def __init__(self, backbone: Backbone, num_classes: int = 2, *, drop_rate: float = 0.0) -> None:
        super().__init__(backbone, LinearHead(backbone.spec.out_channels, num_classes, drop_rate=drop_rate))
