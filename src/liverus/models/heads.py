"""The parallel-attention head of :class:`~liverus.models.CustomModel`.

The head is independent of the backbone: it takes the backbone's output channel count and adapts to it.
"""

from __future__ import annotations

import torch
from torch import nn

from liverus.models.blocks import ChannelAttention, SEBlock, SpatialAttention

__all__ = ["ParallelAttentionHead", "BRANCH_MODES"]

BRANCH_MODES = ("both", "a", "b")


class ParallelAttentionHead(nn.Module):
    """Compression conv -> two parallel attention branches -> concat -> spatial attention -> pool -> classifier.

    Branch A is ``SEBlock -> ChannelAttention``; branch B is ``ChannelAttention -> SEBlock``. Both receive the same
    compressed map, and their outputs are concatenated back to ``2 * compressed`` channels (2048 for ResNet-50).

    Args:
        in_channels: channels of the backbone feature map.
        num_classes: number of output logits (2 for benign / malignant, 3 with normal).
        compress: if true, a 3x3 conv + BatchNorm + ReLU halves the channels before the branches; if false the
            branches work on the backbone map directly (the "no compression" ablation).
        branches: ``"both"`` (the full model), ``"a"`` or ``"b"`` (single-branch ablations). A single branch keeps its
            input width, so the pooled feature has half the channels of the parallel version.
        spatial: whether to apply :class:`SpatialAttention` after the branches.
        se_reduction: reduction ratio of every :class:`SEBlock`.
        ca_reduction: reduction ratio of every :class:`ChannelAttention`.
        spatial_kernel: kernel size of :class:`SpatialAttention`.
        drop_rate: dropout probability before the classifier.
        act_layer: activation for the compression conv and the attention MLPs.
        norm_layer: normalisation after the compression conv.

    Raises:
        ValueError: on a bad branch mode, class count, dropout, or channel count not divisible by a reduction.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 2,
        *,
        compress: bool = True,
        branches: str = "both",
        spatial: bool = True,
        se_reduction: int = 16,
        ca_reduction: int = 16,
        spatial_kernel: int = 7,
        drop_rate: float = 0.5,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if branches not in BRANCH_MODES:
            raise ValueError(f"branches must be one of {BRANCH_MODES}, got {branches!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if compress and in_channels % 2 != 0:
            raise ValueError(f"the compression conv halves the channels; in_channels={in_channels} is odd")
        width = in_channels // 2 if compress else in_channels
        if compress:
            self.compress = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                norm_layer(width),
                act_layer(inplace=True),
            )
        else:
            self.compress = nn.Identity()

        def _branch(first: str) -> nn.Sequential:
            se = SEBlock(width, se_reduction, act_layer=act_layer)
            ca = ChannelAttention(width, ca_reduction, act_layer=act_layer)
            return nn.Sequential(se, ca) if first == "se" else nn.Sequential(ca, se)

        self.branch_a = _branch("se") if branches in ("both", "a") else None
        self.branch_b = _branch("ca") if branches in ("both", "b") else None
        self.out_channels = width * (2 if branches == "both" else 1)
        self.spatial = SpatialAttention(spatial_kernel) if spatial else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.out_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x, backbone features (N, C, H, W). Returns: attended features (N, out_channels, H, W)."""
        x = self.compress(x)
        outs = [branch(x) for branch in (self.branch_a, self.branch_b) if branch is not None]
        x = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        if self.spatial is not None:
            x = self.spatial(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x, backbone features (N, C, H, W). Returns: logits (N, num_classes)."""
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(self.drop(x))
