"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from liverus.data import PreprocessConfig
from liverus.models import build_model, save_model


def untrained_model_file(path: Path, name: str = "custom_resnet50", image_size: int = 224) -> Path:
    """A model.pt with random weights and the metadata a training run stores (speed does not depend on weights)."""
    model = build_model(name)
    mean, std = model.normalization
    save_model(
        model,
        path,
        extra={
            "threshold": 0.5,
            "classes": ["benign", "malignant"],
            "preprocess": asdict(PreprocessConfig(image_size=image_size)),
            "normalization": [mean, std],
            "version": "bench",
        },
    )
    return path
