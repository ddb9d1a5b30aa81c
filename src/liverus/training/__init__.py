"""Training: config, losses, DDP plumbing, the trainer and the cross-validation / comparison experiments."""

from liverus.training.config import ConfigError, TrainConfig, apply_overrides, load_config
from liverus.training.losses import FocalLoss, build_loss, class_weights
from liverus.training.run_folder import RunExistsError, TrainResult
from liverus.training.trainer import train

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
