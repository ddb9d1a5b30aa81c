"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

from liverus.data import PreprocessConfig
from liverus.models import build_model, default_card, save_model


def untrained_model_file(path: Path, name: str = "custom_resnet50", image_size: int = 224) -> Path:
    """A model.pt with random weights and the metadata a training run stores (speed does not depend on weights)."""
    model = build_model(name)
    card = default_card(model).replace(preprocess=PreprocessConfig(image_size=image_size), version="bench")
    save_model(model, path, card)
    return path
