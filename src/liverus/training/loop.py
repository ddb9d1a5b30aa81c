"""One training epoch and one evaluation pass: the steps a reader should see in one screen each.

Checkpointing, early stopping and logging live beside these (:mod:`~liverus.training.state`,
:mod:`~liverus.training.handlers`), not inside them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from liverus.engine.forward import merge_shards, model_input, predict_probs
from liverus.evaluation.metrics import binary_metrics, multiclass_metrics
from liverus.models import ModelCard
from liverus.training.distributed import gather_objects
from liverus.training.runtime import Runtime
from liverus.training.state import TrainObjects
from liverus.utils import STAGES

__all__ = ["EpochStats", "train_one_epoch", "evaluate_loader", "score", "selection_score"]


@dataclass
class EpochStats:
    loss: float  # mean over this rank's batches
    images: int  # seen by this rank
    seconds: float
    steps: int  # optimiser steps taken
    started: float  # time.time() at the start of the epoch


@STAGES.timed("training steps")
def train_one_epoch(
    objs: TrainObjects,
    loader: DataLoader,
    criterion: nn.Module,
    card: ModelCard,
    rt: Runtime,
    *,
    accum_steps: int = 1,
    grad_clip: float = 0.0,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "",
    aux=None,
) -> EpochStats:
    """Forward, backward and optimiser step over one epoch of ``loader``.

    Args:
        objs: model (DDP-wrapped under torchrun), optimiser, per-step schedule and gradient scaler.
        loader: batches of ``(uint8 images, targets)``.
        criterion: the loss, computed in fp32 on the logits.
        card: normalisation and input channels of the model.
        rt: device, precision and memory format.
        accum_steps: micro-batches per optimiser step.
        grad_clip: maximum gradient norm (0: no clipping).
        max_steps: stop after this many optimiser steps (tests and benchmarks).
        progress: show a progress bar on a terminal.
        desc: the progress bar's label.
        aux: auxiliary losses on the batch's extras (:class:`~liverus.training.losses.AuxiliaryLosses` of attention
            supervision and debiasing), for loaders that yield ``(images, targets, extras)``.
    """
    model, optimizer = objs.model, objs.optimizer
    t0, seen, loss_sum, n_batches, steps = time.time(), 0, 0.0, 0, 0
    bar = _progress_bar(len(loader), progress, desc)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        x, y, extras = batch[0], batch[1], (batch[2] if len(batch) > 2 else None)
        x = model_input(x.to(rt.device, non_blocking=True), card, channels_last=rt.channels_last)
        y = torch.as_tensor(y).to(rt.device, non_blocking=True)
        last_micro = (i + 1) % accum_steps == 0
        # Skip DDP's gradient all-reduce on accumulation micro-batches; only the last one synchronises.
        sync = contextlib.nullcontext() if (last_micro or not rt.dist.enabled) else model.no_sync()
        with sync:
            with rt.autocast():
                logits = model(x)
            loss = criterion(logits.float(), y)
            if aux is not None and extras is not None:
                loss = loss + aux.loss(extras)
            loss = loss / accum_steps
            objs.scaler.scale(loss).backward()
        if last_micro:
            if grad_clip > 0:
                objs.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            objs.scaler.step(optimizer)
            objs.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            objs.scheduler.step()
            steps += 1
        seen, loss_sum, n_batches = seen + len(y), loss_sum + loss.item() * accum_steps, n_batches + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", img_s=f"{seen / (time.time() - t0):.1f}")
        if max_steps is not None and steps >= max_steps:
            break
    if bar is not None:
        bar.close()
    return EpochStats(loss_sum / max(1, n_batches), seen, time.time() - t0, steps, t0)


@STAGES.timed("scoring (validation, test)")
def evaluate_loader(
    model: nn.Module, loader: DataLoader, n_cases: int, card: ModelCard, rt: Runtime
) -> tuple[np.ndarray, np.ndarray] | None:
    """Score a loader sharded over the ranks. Returns: ``(probabilities, targets)`` in case order on rank 0, None
    on the others."""
    probs, targets = predict_probs(model, loader, card, device=rt.device, amp=rt.amp, channels_last=rt.channels_last)
    shards = gather_objects((probs, targets), rt.dist)
    return merge_shards(shards, n_cases, rt.dist.world_size) if rt.is_main else None


def score(probs: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], threshold: float = 0.5) -> dict:
    """Binary metrics at ``threshold`` or multi-class metrics (``auc`` = macro AUC), plus ``loss`` (NLL)."""
    if len(classes) == 2:
        m = binary_metrics(targets, probs[:, 1], threshold)
    else:
        m = multiclass_metrics(targets, probs, classes)
        m["auc"] = m["macro"]["auc"]
    log_p = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    m["loss"] = float(F.nll_loss(log_p, torch.from_numpy(targets)))
    return m


def selection_score(row: dict, has_val: bool) -> float:
    """What model selection maximises, read from an epoch's metrics row: validation AUC (minus the loss when AUC is
    undefined); the epoch itself without validation, so that the last epoch is kept."""
    if not has_val:
        return float(row["epoch"])
    return row["val_auc"] if not math.isnan(row["val_auc"]) else -row["val_loss"]


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr, disable=None)
