"""Models: attention blocks, the parallel-attention ``CustomModel``, the baseline and the registry."""

from liverus.models.backbones import BACKBONES, WeightsInfo, adapt_input_conv, build_backbone
from liverus.models.blocks import ChannelAttention, SEBlock, SpatialAttention
from liverus.models.card import ModelCard
from liverus.models.classifier import BaselineModel, CustomModel, LesionClassifier, LinearHead
from liverus.models.ensemble import EnsembleClassifier
from liverus.models.features import LesionFeatureModel
from liverus.models.heads import ParallelAttentionHead
from liverus.models.registry import (
    MODELS,
    build_model,
    canonical_model_name,
    count_flops,
    count_parameters,
    default_card,
    has_frozen_backbone,
    is_feature_model,
    is_fitted_model,
    is_known_model,
    is_scan_model,
    list_models,
    load_card,
    load_model,
    register_model,
    save_model,
)
from liverus.models.scan_features import ScanFeatureModel

__all__ = [
    "BACKBONES",
    "MODELS",
    "BaselineModel",
    "ChannelAttention",
    "CustomModel",
    "EnsembleClassifier",
    "LesionClassifier",
    "LesionFeatureModel",
    "LinearHead",
    "ModelCard",
    "ParallelAttentionHead",
    "ScanFeatureModel",
    "SEBlock",
    "SpatialAttention",
    "WeightsInfo",
    "adapt_input_conv",
    "build_backbone",
    "build_model",
    "canonical_model_name",
    "is_known_model",
    "count_flops",
    "count_parameters",
    "default_card",
    "has_frozen_backbone",
    "is_feature_model",
    "is_fitted_model",
    "is_scan_model",
    "list_models",
    "load_card",
    "load_model",
    "register_model",
    "save_model",
]
