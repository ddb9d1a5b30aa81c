"""Training: config, losses, DDP plumbing, the trainer and the cross-validation / comparison experiments."""

from liverus.utils import lazy_exports

# Loaded when first used (see lazy_exports): a command imports only the submodules it needs.
_EXPORTS = {
    "config": (
        "ConfigError",
        "TrainConfig",
        "apply_overrides",
        "load_config",
    ),
    "losses": (
        "FocalLoss",
        "build_loss",
        "class_weights",
    ),
    "run_folder": (
        "RunExistsError",
        "TrainResult",
    ),
    "trainer": ("train",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ConfigError",
    "FocalLoss",
    "RunExistsError",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "build_loss",
    "class_weights",
    "load_config",
    "train",
]
