"""Models: attention blocks, the parallel-attention ``CustomModel``, the baseline and the registry."""

# The card is light (dataclasses); it is what an ONNX export carries, read without PyTorch.
from liverus.models.card import ModelCard
from liverus.utils import lazy_exports

# The networks import torch: loaded when first used (see lazy_exports), so that `predict` and `serve` of an ONNX
# export, which read only the card, run in an install without PyTorch.
_EXPORTS = {
    "backbones": ("BACKBONES", "WeightsInfo", "adapt_input_conv", "build_backbone"),
    "blocks": ("ChannelAttention", "SEBlock", "SpatialAttention"),
    "classifier": ("BaselineModel", "CustomModel", "LesionClassifier", "LinearHead"),
    "ensemble": ("EnsembleClassifier",),
    "features": ("LesionFeatureModel",),
    "heads": ("ParallelAttentionHead",),
    "scan_features": ("ScanFeatureModel",),
    "registry": (
        "MODELS",
        "build_model",
        "canonical_model_name",
        "count_flops",
        "count_parameters",
        "default_card",
        "has_frozen_backbone",
        "is_feature_model",
        "is_fitted_model",
        "is_known_model",
        "is_scan_model",
        "list_models",
        "load_card",
        "load_model",
        "register_model",
        "save_model",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["ModelCard", *(name for names in _EXPORTS.values() for name in names)]
