"""Attention blocks: squeeze-and-excitation and CBAM channel / spatial attention.

Each block takes the activation and gate layers as arguments (as timm's ``layers`` do), so variants can be built
without copying the block. All blocks keep the input shape.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SEBlock", "ChannelAttention", "SpatialAttention"]


def _reduced_channels(channels: int, reduction: int) -> int:
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    if reduction <= 0:
        raise ValueError(f"reduction must be positive, got {reduction}")
    if channels % reduction != 0:
        raise ValueError(
            f"channels ({channels}) must be divisible by reduction ({reduction}); "
            f"choose a reduction that divides {channels}"
        )
    return channels // reduction


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018).

    Global average pooling, ``Linear(C, C/r)``, activation, ``Linear(C/r, C)``, gate, then channel-wise rescaling.

    Args:
        channels: number of input (and output) channels.
        reduction: bottleneck ratio ``r``; must divide ``channels``.
        act_layer: activation between the two fully connected layers.
        gate_layer: gating non-linearity producing weights in [0, 1].

    Raises:
        ValueError: if ``channels`` is not divisible by ``reduction`` or either is not positive.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        hidden = _reduced_channels(channels, reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x of shape (N, C, H, W). Returns: a tensor of the same shape."""
        w = self.pool(x).flatten(1)
        w = self.gate(self.fc2(self.act(self.fc1(w))))
        return x * w[:, :, None, None]


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al., 2018).

    Average- and max-pooled channel descriptors pass one shared MLP (``C -> C/r -> C``, no bias, as in CBAM's
    reference implementation), are summed, gated and used to rescale the channels.

    Args:
        channels: number of input (and output) channels.
        reduction: bottleneck ratio ``r``; must divide ``channels``.
        act_layer: activation inside the shared MLP.
        gate_layer: gating non-linearity producing weights in [0, 1].

    Raises:
        ValueError: if ``channels`` is not divisible by ``reduction`` or either is not positive.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        hidden = _reduced_channels(channels, reduction)
        # 1x1 convolutions rather than Linear so the MLP runs on (N, C, 1, 1) without reshapes; same parameters.
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            act_layer(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x of shape (N, C, H, W). Returns: a tensor of the same shape."""
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        w = self.gate(self.mlp(avg) + self.mlp(mx))
        return x * w


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al., 2018).

    Channel-wise mean and max maps are stacked, convolved with a ``k x k`` kernel and gated; the resulting
    ``(N, 1, H, W)`` map rescales every channel. Explanation code reads the map with a forward hook (see
    :meth:`~liverus.models.LesionClassifier.spatial_attention_map`), so the module keeps no state between calls.

    Args:
        kernel_size: odd convolution kernel size (CBAM uses 7).
        gate_layer: gating non-linearity producing weights in [0, 1].

    Raises:
        ValueError: if ``kernel_size`` is not a positive odd integer.
    """

    def __init__(self, kernel_size: int = 7, gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.gate = gate_layer()

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x of shape (N, C, H, W). Returns: the attention map, shape (N, 1, H, W), values in [0, 1]."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return self.gate(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x of shape (N, C, H, W). Returns: a tensor of the same shape."""
        return x * self.attention_map(x)
