"""Every model is built by name: ``build_model("custom_resnet50", num_classes=2, weights="imagenet")``.

Names are ``{variant}_{backbone}``; ``custom`` and ``baseline`` are short for the ResNet-50 versions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from liverus.models.backbones import (
    BACKBONES,
    TIMM_PREFIX,
    WeightsInfo,
    build_backbone,
    is_backbone_name,
    load_state_dict_file,
)
from liverus.models.card import DEFAULT_CLASSES, ModelCard, check_removed_modes
from liverus.models.classifier import BaselineModel, CustomModel, LesionClassifier
from liverus.models.ensemble import EnsembleClassifier
from liverus.models.features import FEATURE_CLASSIFIERS, LesionFeatureModel
from liverus.models.scan_features import ScanFeatureModel

__all__ = [
    "ModelEntry",
    "MODELS",
    "build_model",
    "list_models",
    "register_model",
    "save_model",
    "load_model",
    "load_card",
    "default_card",
    "count_parameters",
    "count_flops",
    "load_state_dict_file",
    "is_feature_model",
    "is_scan_model",
    "is_fitted_model",
    "has_frozen_backbone",
    "canonical_model_name",
    "is_known_model",
]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    builder: Callable[..., LesionClassifier]


MODELS: dict[str, ModelEntry] = {}
ALIASES = {"custom": "custom_resnet50", "baseline": "baseline_resnet50"}

# Ablations of the parallel-attention head, each a change of one ParallelAttentionHead argument.
VARIANTS: dict[str, tuple[str, dict]] = {
    "custom": ("parallel attention: compress -> (SE->CA) || (CA->SE) -> spatial attention", {}),
    "branch_a": ("ablation: branch A only (SE -> CA)", {"branches": "a"}),
    "branch_b": ("ablation: branch B only (CA -> SE)", {"branches": "b"}),
    "no_spatial": ("ablation: both branches, no spatial attention", {"spatial": False}),
    "no_compress": ("ablation: no 3x3 compression conv (branches on the backbone map)", {"compress": False}),
}


def register_model(name: str, description: str) -> Callable:
    """Decorator adding a builder ``fn(*, num_classes, weights, in_chans, **kwargs)`` to the registry."""

    def deco(fn: Callable[..., LesionClassifier]) -> Callable[..., LesionClassifier]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelEntry(name, description, fn)
        return fn

    return deco


def _make_custom_builder(backbone: str, fixed: dict) -> Callable[..., LesionClassifier]:
    def build(
        *, num_classes: int = 2, weights=None, in_chans: int = 1, drop_path_rate: float | None = None, **kwargs
    ) -> LesionClassifier:
        clash = set(fixed) & set(kwargs)
        if clash:
            raise ValueError(f"arguments {sorted(clash)} are fixed by this ablation and cannot be overridden")
        bb = build_backbone(backbone, weights=weights, in_chans=in_chans, drop_path_rate=drop_path_rate)
        return CustomModel(bb, num_classes, **fixed, **kwargs)

    return build


def _make_baseline_builder(backbone: str) -> Callable[..., LesionClassifier]:
    def build(*, num_classes: int = 2, weights=None, in_chans: int = 1, drop_rate: float = 0.0) -> LesionClassifier:
        return BaselineModel(
            build_backbone(backbone, weights=weights, in_chans=in_chans), num_classes, drop_rate=drop_rate
        )

    return build


def _make_feature_builder(classifier: str, backbone: str | None) -> Callable[..., LesionFeatureModel]:
    def build(
        *, num_classes: int = 2, weights=None, in_chans: int = 2, views: int = 1, n_support: int = 1, **options
    ) -> LesionFeatureModel:
        """``options``: :data:`~liverus.models.features.FEATURE_MODEL_OPTIONS`, passed to the model, which checks
        them."""
        if backbone is None and weights not in (None, "imagenet"):
            raise ValueError("a radiomics-only model has no backbone to load weights into")
        bb = build_backbone(backbone, weights=weights, in_chans=1) if backbone else None
        return LesionFeatureModel(
            classifier, bb, num_classes=num_classes, in_chans=in_chans, views=views, n_support=n_support, **options
        )

    return build


def _make_scan_builder(backbone: str) -> Callable[..., ScanFeatureModel]:
    def build(*, num_classes: int = 3, weights=None, in_chans: int = 1, n_support: int = 1, **options):
        """``options``: ``pca_dim``, ``pooling`` (:class:`~liverus.models.scan_features.ScanFeatureModel` checks
        them)."""
        bb = build_backbone(backbone, weights=weights, in_chans=1)
        return ScanFeatureModel(bb, num_classes=num_classes, in_chans=in_chans, n_support=n_support, **options)

    return build


_CLASSIFIER_NAMES = {"logistic": "logistic regression", "svm": "RBF SVM"}
SCAN_FAMILY = "scan_svm"
# Every family that runs on a backbone: the seed's head and its ablations, the baseline, the frozen-feature models.
FAMILIES = (*VARIANTS, "baseline", *(f"radiomics_{clf}" for clf in FEATURE_CLASSIFIERS), SCAN_FAMILY)


def _family_entry(family: str, backbone: str) -> ModelEntry | None:
    """The model ``{family}_{backbone}``: its name, description and builder; None for an unknown family. One table
    for the built-in backbones (registered below) and timm's (made on demand by :func:`_model_entry`)."""
    name = f"{family}_{backbone}"
    if family in VARIANTS:
        desc, fixed = VARIANTS[family]
        return ModelEntry(name, f"{backbone}: {desc}", _make_custom_builder(backbone, fixed))
    if family == "baseline":
        desc = f"{backbone}: baseline, plain backbone + new linear classifier"
        return ModelEntry(name, desc, _make_baseline_builder(backbone))
    clf = family.removeprefix("radiomics_")
    if family.startswith("radiomics_") and clf in FEATURE_CLASSIFIERS:
        desc = (
            f"lesion radiomics + frozen {backbone} features of the crop -> {_CLASSIFIER_NAMES[clf]} "
            "(needs data.lesion_channel)"
        )
        return ModelEntry(name, desc, _make_feature_builder(clf, backbone))
    if family == SCAN_FAMILY:
        desc = f"frozen {backbone} features of the whole scan -> one RBF SVM per class (no lesion input)"
        return ModelEntry(name, desc, _make_scan_builder(backbone))
    return None


for _clf in FEATURE_CLASSIFIERS:
    _desc = f"lesion radiomics -> {_CLASSIFIER_NAMES[_clf]} (needs data.lesion_channel)"
    register_model(f"radiomics_{_clf}", _desc)(_make_feature_builder(_clf, None))
for _bb in BACKBONES:
    for _family in FAMILIES:
        _entry = _family_entry(_family, _bb)
        register_model(_entry.name, _entry.description)(_entry.builder)


def canonical_model_name(name: str) -> str:
    """The registry's spelling of a model name: aliases resolved (``custom`` -> ``custom_resnet50``) and the
    ``family:backbone`` form written as ``family_backbone`` (``custom:timm/convnext_tiny`` ->
    ``custom_timm_convnext_tiny``, a name that is also a valid folder name)."""
    name = ALIASES.get(name, name)
    if ":" in name:
        family, backbone = name.split(":", 1)
        name = f"{family}_{backbone.replace('timm/', TIMM_PREFIX, 1)}"
    return name


def _model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a family with a timm backbone (``custom_timm_convnext_tiny``) is made on
    demand, since timm has more models than a registry should list.

    Raises:
        ValueError: for an unknown name, family or timm model.
    """
    key = canonical_model_name(name)
    if key in MODELS:
        return MODELS[key]
    family, sep, arch = key.partition("_" + TIMM_PREFIX)
    if sep and family in FAMILIES:
        if not is_backbone_name(TIMM_PREFIX + arch):
            raise ValueError(f"unknown model {name!r}: timm has no model {arch!r} (see timm.list_models())")
        return _family_entry(family, TIMM_PREFIX + arch)
    raise ValueError(
        f"unknown model {name!r}; available: {', '.join(list_models())}, or FAMILY_timm_<timm model> with FAMILY "
        f"one of {', '.join(sorted(FAMILIES))} (e.g. custom_timm_convnext_tiny)"
    )


def is_known_model(name: str) -> bool:
    """Whether :func:`build_model` can build ``name`` (registered, an alias, or a family on a timm backbone)."""
    try:
        _model_entry(name)
    except ValueError:
        return False
    return True


def is_feature_model(name: str) -> bool:
    """Whether the model ``name`` is a fitted feature model (no gradient training)."""
    return canonical_model_name(name).startswith("radiomics_")


def is_scan_model(name: str) -> bool:
    """Whether the model ``name`` is a whole-scan feature model (``scan_svm_<backbone>``: fitted, image only)."""
    return canonical_model_name(name).startswith(SCAN_FAMILY + "_")


def is_fitted_model(name: str) -> bool:
    """Whether the model ``name`` is fitted on frozen features rather than trained by gradient descent."""
    return is_feature_model(name) or is_scan_model(name)


def has_frozen_backbone(name: str) -> bool:
    """Whether the model ``name`` is a feature model with frozen deep features
    (``radiomics_<classifier>_<backbone>``, not ``radiomics_<classifier>``)."""
    return is_feature_model(name) and canonical_model_name(name).removeprefix("radiomics_") not in FEATURE_CLASSIFIERS


def list_models() -> list[str]:
    """Returns: every registered model name, sorted."""
    return sorted(MODELS)


def build_model(
    name: str,
    *,
    num_classes: int = 2,
    weights: str | os.PathLike | None = None,
    in_chans: int = 1,
    **kwargs,
) -> LesionClassifier:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` (or the aliases ``custom``, ``baseline``), or a family on a timm
            backbone: ``custom_timm_convnext_tiny`` (also written ``custom:timm/convnext_tiny``),
            ``baseline_timm_resnet50.a1_in1k``, ``radiomics_svm_timm_efficientnet_b3``.
        num_classes: 2 (benign / malignant) or 3 (normal / benign / malignant).
        weights: ``None`` (random init), ``"imagenet"`` (timm: its pretrained weights, downloaded) or a path to a
            backbone state dict (timm: ``.safetensors`` or ``.pth`` with timm's key names).
        in_chans: 1 for grayscale ultrasound, or 3; 2 or 4 with a lesion-mask channel (feature models: 2).
            Per view: a feature model with ``views=2`` takes ``2 * in_chans`` channels.
        **kwargs: head arguments, e.g. ``se_reduction``, ``ca_reduction``, ``spatial_kernel``, ``drop_rate``; for a
            feature model with a backbone its options and ``views`` (2: the lesion crop and the whole scan).

    Returns:
        The model, with ``model_name``, ``build_kwargs`` and ``weights_info`` set.

    Raises:
        ValueError: for an unknown name or bad arguments.
    """
    entry = _model_entry(name)
    key = entry.name
    try:
        model = entry.builder(num_classes=num_classes, weights=weights, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for model {key!r}: {exc}") from exc
    model.model_name = key
    model.build_kwargs = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    return model


def default_card(model: LesionClassifier | EnsembleClassifier) -> ModelCard:
    """The card of freshly built weights: default class names, the backbone's normalisation, no preprocessing."""
    classes = DEFAULT_CLASSES.get(model.num_classes, tuple(f"class{i}" for i in range(model.num_classes)))
    return ModelCard(
        model_name=model.model_name,
        classes=classes,
        in_chans=model.in_chans,
        views=getattr(model, "views", 1),
        normalization=model.normalization,
        task="binary" if model.num_classes == 2 else "three_class",
        members=len(model.members) if isinstance(model, EnsembleClassifier) else 1,
    )


def save_model(
    model: LesionClassifier | EnsembleClassifier, path: str | os.PathLike, card: ModelCard | None = None
) -> None:
    """Write a model or ensemble (weights, how to rebuild it and its :class:`ModelCard`) atomically to ``path``.

    Only tensors and plain Python values are stored, so :func:`load_model` can read it with ``weights_only=True``.
    """
    from liverus.utils import atomic_torch_save

    card = card or default_card(model)
    if card.model_name != model.model_name:
        raise ValueError(f"the card describes {card.model_name!r} but the weights are {model.model_name!r}")
    payload = {
        "model": _share_equal_tensors(model.state_dict()),
        "model_name": model.model_name,
        "build_kwargs": model.build_kwargs,
        "weights_info": vars(model.weights_info).copy(),
        "card": card.to_dict(),
    }
    if isinstance(model, EnsembleClassifier):
        payload["ensemble_members"] = len(model.members)
    atomic_torch_save(payload, Path(path))


def _share_equal_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor equal to an earlier one (dtype, shape and bytes) replaced by that earlier tensor.

    ``torch.save`` writes a storage once however many entries point at it, so an ensemble whose members hold the same
    frozen backbone (the ImageNet weights every feature member starts from and keeps) stores it once: the
    recommended five-member model's file shrinks about five-fold. Loading needs nothing new: each entry is read back
    as a tensor of the shared storage and copied into its own parameter.
    """
    import hashlib

    first: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if tensor.numel() < 256:  # small tensors cost less than their hashing
            out[key] = tensor
            continue
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        ident = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(raw).digest())
        out[key] = first.setdefault(ident, tensor)
    return out


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[LesionClassifier, ModelCard]:
    """Rebuild a model saved by :func:`save_model` or by the trainer.

    Returns:
        ``(model, card)`` with the model in eval mode and its :class:`ModelCard`.

    Raises:
        ValueError: if the file is not a liverus model file, its weights do not match or its card is malformed.
    """
    p = Path(path)
    obj = _read_model_file(p, map_location)
    # Files of liverus 0.1 carry an untyped "extra" dict instead of a card; defaults come from the weights.
    stored = obj.get("card") or obj.get("extra") or {}
    check_removed_modes(stored, source=p)  # before the rebuild, which would fail on the removed mode's arguments
    n_members = int(obj.get("ensemble_members", 0) or 0)
    members = [
        build_model(obj["model_name"], weights=None, **obj.get("build_kwargs", {})) for _ in range(n_members or 1)
    ]
    model = EnsembleClassifier(members) if n_members else members[0]
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {p} do not match model {obj['model_name']!r}: {exc}") from exc
    wi = obj.get("weights_info") or {}
    for m in members:
        if wi and m.backbone is not None:
            m.backbone.weights_info = WeightsInfo(**wi)
            _check_backbone_stats(m.backbone, wi.get("pretrained_cfg") or {}, p)
    model.eval()
    card = ModelCard.from_dict({**default_card(model).to_dict(), **stored}, source=p)
    return model, card


def _check_backbone_stats(backbone, stored: dict, path: Path) -> None:
    """A timm backbone is rebuilt from the installed timm's config of its name; the normalisation the model was
    trained with is stored in the file. They must agree (a timm release could change a name's default pretrained
    tag, and with it the statistics a feature model undoes before its radiomics).

    Raises:
        ValueError: naming the file, both statistics and the timm version the model was trained with.
    """
    if not stored.get("mean") or not stored.get("std"):
        return
    spec = backbone.spec
    if not (np.allclose(stored["mean"], spec.mean) and np.allclose(stored["std"], spec.std)):
        raise ValueError(
            f"model file {path}: its backbone {stored.get('architecture', spec.name)} was trained with mean "
            f"{stored['mean']} / std {stored['std']}, but the installed timm builds it with {list(spec.mean)} / "
            f"{list(spec.std)}; install the timm version it was trained with ({stored.get('timm_version', '?')}) "
            "or name the pretrained tag explicitly (e.g. _timm_resnet50.a1_in1k)"
        )


def _read_model_file(p: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    if not p.is_file():
        raise ValueError(f"model file {p} does not exist")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise ValueError(f"model file {p} could not be read: {exc}") from exc
    if not isinstance(obj, dict) or "model_name" not in obj or "model" not in obj:
        raise ValueError(f"{p} is not a liverus model file (no 'model_name'/'model' entries)")
    return obj


def load_card(path: str | os.PathLike) -> ModelCard:
    """The :class:`ModelCard` of a model file without building the model (the weights are memory-mapped, not read).

    Raises:
        ValueError: as :func:`load_model`.
    """
    p = Path(path)
    obj = _read_model_file(p, mmap=True)
    if "card" in obj:
        return ModelCard.from_dict(obj["card"], source=p)
    return load_model(p)[1]  # liverus 0.1 files: the card's defaults come from the weights


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Returns: the number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: torch.nn.Module, image_size: int = 224) -> float:
    """Multiply-accumulate count of one forward pass at ``image_size`` px, in G (torchvision's "GFLOPS" convention).

    Uses ``torch.utils.flop_counter`` (which counts 2 FLOPs per multiply-add) and halves it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    chans = model.stem().in_channels if hasattr(model, "stem") else getattr(model, "in_chans", 3)
    x = torch.zeros(1, chans, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
