"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

from liverus.data import PreprocessConfig
from liverus.models import build_model, default_card, save_model


def untrained_model_file(path: Path, name: str = "custom_resnet50", image_size: int = 224, crop: str = "fan") -> Path:
    """A model.pt with random weights and the metadata a training run stores (speed does not depend on weights)."""
    model = build_model(name)
    card = default_card(model).replace(preprocess=PreprocessConfig(image_size=image_size, crop=crop), version="bench")
    save_model(model, path, card)
    return path


def cpu_name() -> str:
    """The CPU model (benchmarks print which CPU they ran on)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
