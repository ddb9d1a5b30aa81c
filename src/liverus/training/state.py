"""Everything a run needs to continue bit-exactly after an interruption, saving and restoring itself.

:class:`TrainState` holds the counters (epoch, best score, patience, history) and :class:`CheckpointSaver` writes
``checkpoints/last.pt`` (model, optimiser, scheduler, scaler, counters, every RNG) and ``checkpoints/best.pt``
atomically, as timm's ``CheckpointSaver`` does, so a kill at any moment leaves a consistent run folder.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from liverus.training.distributed import unwrap_model
from liverus.utils import atomic_torch_save

__all__ = ["TrainState", "TrainObjects", "CheckpointSaver", "rng_state", "set_rng_state"]


@dataclass
class TrainState:
    """The counters of a run. ``best_score`` is what model selection maximises (see :func:`selection_score`)."""

    epoch: int = 0  # epochs finished
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def record(self, row: dict, score: float) -> bool:
        """Add an epoch's metrics row. Returns: whether it improved on the best score."""
        self.history.append(row)
        self.epoch = row["epoch"]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved


@dataclass
class TrainObjects:
    """The stateful objects of a run: model (possibly wrapped), optimiser, schedule and gradient scaler."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def rng_state() -> dict:
    """Torch, NumPy and Python RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


class CheckpointSaver:
    """``last.pt`` after every epoch and ``best.pt`` when the selection score improves, both atomic.

    Args:
        directory: the run's ``checkpoints`` folder.
        config: the run's config as a dict (stored in ``last.pt`` for inspection).
    """

    def __init__(self, directory: Path, config: dict) -> None:
        self.directory = Path(directory)
        self.config = config

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best(self) -> Path:
        return self.directory / "best.pt"

    def save(self, objs: TrainObjects, state: TrainState, *, improved: bool) -> None:
        weights = unwrap_model(objs.model).state_dict()
        if improved:
            atomic_torch_save({"model": weights, "epoch": state.epoch}, self.best)
        atomic_torch_save(
            {
                "model": weights,
                "optimizer": objs.optimizer.state_dict(),
                "scheduler": objs.scheduler.state_dict(),
                "scaler": objs.scaler.state_dict(),
                "epoch": state.epoch,
                "best_auc": state.best_score,
                "best_epoch": state.best_epoch,
                "bad_epochs": state.bad_epochs,
                "history": state.history,
                "rng": rng_state(),
                "config": self.config,
            },
            self.last,
        )

    def restore(self, objs: TrainObjects) -> TrainState | None:
        """Load ``last.pt`` into ``objs`` (the unwrapped model) and the RNGs. Returns: its state, or None."""
        if not self.last.is_file():
            return None
        ckpt = torch.load(self.last, map_location="cpu", weights_only=True)
        unwrap_model(objs.model).load_state_dict(ckpt["model"])
        objs.optimizer.load_state_dict(ckpt["optimizer"])
        objs.scheduler.load_state_dict(ckpt["scheduler"])
        objs.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        return TrainState(ckpt["epoch"], ckpt["best_auc"], ckpt["best_epoch"], ckpt["bad_epochs"], ckpt["history"])

    def load_best(self, model: torch.nn.Module) -> int:
        """Load ``best.pt`` into ``model``. Returns: its epoch."""
        best = torch.load(self.best, map_location="cpu", weights_only=True)
        unwrap_model(model).load_state_dict(best["model"])
        return int(best["epoch"])
