"""The trainer: :func:`train`, behind ``liverus train``, ``cv``, ``compare`` and ``demo``.

``train`` only orchestrates; each job has its own module: :mod:`~liverus.training.runtime` (device, precision,
rank), :mod:`~liverus.training.run_folder` (what is written where), :mod:`~liverus.training.datasets` (cases, split,
loaders), :mod:`~liverus.training.loop` (one epoch, one evaluation pass), :mod:`~liverus.training.state`
(checkpoints and resume), :mod:`~liverus.training.handlers` (logging, early stopping) and
:mod:`~liverus.training.finalize` (threshold, predictions, ``model.pt``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from torch import nn

from liverus import __version__
from liverus.data import Case
from liverus.models import (
    LesionClassifier,
    LesionFeatureModel,
    ModelCard,
    ScanFeatureModel,
    build_model,
    is_feature_model,
    is_fitted_model,
    is_scan_model,
)
from liverus.models.features import FEATURE_MODEL_OPTIONS, feature_store
from liverus.models.segmentation import SEGMENTERS
from liverus.training.config import ConfigError, TrainConfig, config_to_dict
from liverus.training.datasets import RunData, cache_dir, prepare_run_data
from liverus.training.distributed import barrier, broadcast_object, gather_objects
from liverus.training.ensemble import train_ensemble
from liverus.training.feature_fit import fit_feature_model
from liverus.training.finalize import finalize, threshold_source
from liverus.training.handlers import EarlyStopping, MetricsLogger
from liverus.training.loop import EpochStats, evaluate_loader, score, selection_score, train_one_epoch
from liverus.training.losses import (
    AttentionSupervision,
    AuxiliaryLosses,
    AuxiliarySegmentation,
    Debiasing,
    build_loss,
    sum_totals,
)
from liverus.training.optim import build_optimizer, build_scheduler, set_train_mode
from liverus.training.run_folder import RunExistsError, RunFolder, TrainResult
from liverus.training.runtime import Runtime
from liverus.training.scan_fit import fit_scan_feature_model
from liverus.training.state import CheckpointSaver, TrainObjects, TrainState
from liverus.utils import atomic_write_json, seed_everything

__all__ = ["train", "TrainResult", "RunExistsError", "build_run_model"]

log = logging.getLogger("liverus.training")


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cases: list[Case] | None = None,
    split: dict[str, list[str]] | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train one model as ``cfg`` says and write the run folder.

    Args:
        cfg: validated configuration.
        run_dir: the run folder (must be new or empty unless ``resume`` or ``overwrite``).
        resume: continue from ``checkpoints/last.pt`` (a finished run returns its stored result).
        overwrite: move an existing run folder aside and start again.
        cases: the cases to use (default: from ``cfg.data``).
        split: ``{"train": paths, "val": paths[, "test": paths]}`` (default: ``cfg.data.splits`` or a new group-aware
            split, saved as ``splits.json``).
        max_steps: stop after this many optimiser steps in total (for tests and benchmarks).

    Returns:
        The result (on every rank), also written as ``result.json``.

    Raises:
        RunExistsError: if the folder holds a run and neither ``resume`` nor ``overwrite`` is set.
        DataError: for bad data (see :mod:`liverus.data`).
    """
    cfg.validate()
    if cfg.model.name in SEGMENTERS:
        raise ConfigError(f"model.name: {cfg.model.name} is a lesion segmenter; train it with `liverus segment train`")
    # A feature model's features are kept beside the decoded images, for its members, folds and a resumed run.
    with feature_store(cache_dir(cfg, run_dir) if is_fitted_model(cfg.model.name) else None):
        if cfg.model.ensemble:
            return train_ensemble(
                cfg, run_dir, resume=resume, overwrite=overwrite, cases=cases, split=split, train_member=train
            )
        return _train_one(cfg, run_dir, resume=resume, overwrite=overwrite, cases=cases, split=split,
                          max_steps=max_steps)  # fmt: skip


def _train_one(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    cases: list[Case] | None,
    split: dict[str, list[str]] | None,
    max_steps: int | None,
) -> TrainResult:
    """:func:`train` of one model (not an ensemble), after the config's checks."""
    t_start = time.time()
    rt = Runtime.from_config(cfg.runtime)
    if is_fitted_model(cfg.model.name):
        # A feature model's classifier is fitted on fp32 features, so it is scored on fp32 features too: scoring in
        # bf16 would feed it numbers it was not fitted on (and would cost a second, fp32 scoring to measure the gap).
        rt = replace(rt, amp=None, channels_last=False)
    folder = RunFolder(run_dir)
    resumed = rt.is_main and folder.prepare(config_to_dict(cfg), cfg.runtime.seed, resume=resume, overwrite=overwrite)
    resumed = broadcast_object(resumed, rt.dist)
    if resumed and (stored := folder.finished_result()):
        return TrainResult(**stored)
    seed_everything(cfg.runtime.seed)

    data = prepare_run_data(cfg, folder, rt.dist, cases=cases, split=split, pin_memory=rt.device.type == "cuda")
    model = build_run_model(cfg, len(data.classes)).to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    card = ModelCard(
        model_name=model.model_name,
        classes=data.classes,
        in_chans=model.in_chans,
        views=getattr(model, "views", 1),
        normalization=model.normalization,
        preprocess=cfg.data.preprocess(),
        task=cfg.data.task,
        precision=rt.precision,
        version=__version__,
    )
    inner = None
    if isinstance(model, LesionFeatureModel):
        inner = _fit_features(cfg, model, data, card, rt, folder)
        state = TrainState()
    elif isinstance(model, ScanFeatureModel):
        info = fit_scan_feature_model(model, data.train, data.classes, data.cache, card, seed=cfg.runtime.seed)
        if rt.is_main:
            atomic_write_json(folder / "feature_fit.json", info)
        state = TrainState()
    else:
        state = _train_epochs(cfg, model, data, card, rt, folder, resumed=resumed, max_steps=max_steps)
    provenance = json.loads((folder / "provenance.json").read_text()) if rt.is_main else {}
    final = finalize(
        model,
        data,
        card.replace(best_epoch=state.best_epoch, provenance=provenance),
        rt,
        folder,
        fixed_threshold=cfg.model.threshold,
        inner=inner,
    )
    result = None
    if rt.is_main:
        result = TrainResult(
            run_dir=str(folder.path),
            model_path=str(folder.model_file),
            best_epoch=state.best_epoch,
            val_auc=float(final.val_metrics["auc"]),
            threshold=final.card.threshold,
            epochs_run=len(state.history),
            history=state.history,
            val_metrics=final.val_metrics,
            test_metrics=final.test_metrics,
            wall_time_s=round(time.time() - t_start, 2),
        )
        folder.write_result(asdict(result))
    return broadcast_object(result, rt.dist)


def _fit_features(
    cfg: TrainConfig, model: LesionFeatureModel, data: RunData, card: ModelCard, rt: Runtime, folder: RunFolder
) -> tuple[np.ndarray, np.ndarray] | None:
    """A feature model's training: nothing to descend, the classifier is fitted on the training part's features in
    one go. Returns: the inner cross-validation's (probabilities, targets) when the threshold comes from them."""
    fitted = fit_feature_model(
        model,
        data.train,
        data.classes,
        data.cache,
        card,
        seed=cfg.runtime.seed,
        sample_weight=data.train_weights,
        inner_probabilities=threshold_source(data, cfg.model.threshold) == "inner",
        copies=data.train_box_caches or (),
    )
    if rt.is_main:
        atomic_write_json(folder / "feature_fit.json", fitted.info)
    return None if fitted.inner_probabilities is None else (fitted.inner_probabilities, fitted.targets)


def _train_epochs(
    cfg: TrainConfig,
    model: nn.Module,
    data: RunData,
    card: ModelCard,
    rt: Runtime,
    folder: RunFolder,
    *,
    resumed: bool,
    max_steps: int | None,
) -> TrainState:
    """The epoch loop with its handlers (checkpoints, metrics, early stopping); resumes from ``last.pt``. Leaves the
    best epoch's weights in ``model``."""
    criterion = build_loss(
        cfg.loss.name,
        data.train_targets,
        len(data.classes),
        focal_gamma=cfg.loss.focal_gamma,
        label_smoothing=cfg.loss.label_smoothing,
    ).to(rt.device)
    steps_per_epoch = max(1, len(data.train_sampler) // cfg.optim.accum_steps)
    # Auxiliary losses beside the classification loss; the segmentation and debiasing heads must exist before the
    # optimiser is built.
    parts = []
    if cfg.loss.attention_weight > 0:
        parts.append(AttentionSupervision(model, cfg.loss.attention_weight))
    if cfg.loss.segmentation_weight > 0:
        parts.append(AuxiliarySegmentation(model, cfg.loss.segmentation_weight))
    if cfg.loss.debias_by:
        parts.append(Debiasing(model, data.n_groups, cfg.loss.debias_weight))
    supervision = AuxiliaryLosses(parts) if parts else None
    optimizer = build_optimizer(model, cfg.optim)
    objs = TrainObjects(
        model,
        optimizer,
        build_scheduler(optimizer, cfg.optim, steps_per_epoch),
        torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16),
    )
    saver = CheckpointSaver(folder.checkpoints, config_to_dict(cfg))
    state = (saver.restore(objs) if resumed else None) or TrainState()
    if state.epoch and rt.is_main:
        log.info("resuming %s after epoch %d", folder.path, state.epoch)
        folder.rewrite_metrics(state.history)
    objs.model = _wrap(model, cfg, rt)

    logger = MetricsLogger(folder, cfg.optim.epochs, tensorboard=cfg.runtime.tensorboard, start_epoch=state.epoch)
    stopper = EarlyStopping(cfg.optim.early_stopping_patience)
    steps_done = state.epoch * steps_per_epoch
    for epoch in range(state.epoch, cfg.optim.epochs):
        data.train_sampler.set_epoch(epoch)
        set_train_mode(objs.model, cfg.optim, epoch)
        stats = train_one_epoch(
            objs,
            data.train_loader,
            criterion,
            card,
            rt,
            accum_steps=cfg.optim.accum_steps,
            grad_clip=cfg.optim.grad_clip,
            max_steps=None if max_steps is None else max_steps - steps_done,
            progress=rt.is_main and cfg.runtime.progress,
            desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            aux=supervision,
        )
        steps_done += stats.steps
        row = broadcast_object(_epoch_row(epoch, stats, objs, data, card, rt, supervision), rt.dist)
        improved = state.record(row, selection_score(row, bool(data.val)))
        if rt.is_main:
            logger.epoch_end(row, improved, bool(data.val))
            saver.save(objs, state, improved=improved)
        barrier(rt.dist)
        if (max_steps is not None and steps_done >= max_steps) or stopper.should_stop(state):
            break
    logger.close()
    saver.load_best(model)  # with the debiasing head still attached: best.pt holds it
    if supervision is not None:
        supervision.close()
    return state


def build_run_model(cfg: TrainConfig, num_classes: int) -> LesionClassifier | LesionFeatureModel | ScanFeatureModel:
    """The model the config names, with its head options (and the lesion-mask channel when the data gives one)."""
    in_chans = cfg.model.in_chans + int(cfg.data.lesion_channel)
    if is_scan_model(cfg.model.name):
        return build_model(cfg.model.name, num_classes=num_classes, weights=cfg.model.weights, in_chans=in_chans,
                           pca_dim=cfg.model.pca_dim)  # fmt: skip
    if is_feature_model(cfg.model.name):
        options = {k: getattr(cfg.model, k) for k, default in FEATURE_MODEL_OPTIONS.items()
                   if getattr(cfg.model, k) != default}  # fmt: skip
        return build_model(cfg.model.name, num_classes=num_classes, weights=cfg.model.weights, in_chans=in_chans,
                           views=2 if cfg.data.scan_view else 1, **options)  # fmt: skip
    head_kwargs = {"drop_rate": cfg.model.drop_rate}
    if cfg.model.drop_path_rate is not None:
        head_kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    if not cfg.model.name.startswith("baseline"):
        head_kwargs.update(
            se_reduction=cfg.model.se_reduction,
            ca_reduction=cfg.model.ca_reduction,
            spatial_kernel=cfg.model.spatial_kernel,
        )
    return build_model(
        cfg.model.name, num_classes=num_classes, weights=cfg.model.weights, in_chans=in_chans, **head_kwargs
    )


def _wrap(model: nn.Module, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """DDP under torchrun, then ``torch.compile`` when asked for."""
    if rt.dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.dist.local_rank] if rt.device.type == "cuda" else None
        )
        # Same initial weights on every rank (seeded alike; DDP also broadcasts rank 0's), but independent dropout
        # and stochastic-depth streams per rank from here on.
        torch.manual_seed(cfg.runtime.seed + 1_000_003 * rt.dist.rank)
    return torch.compile(model) if cfg.runtime.compile else model


def _epoch_row(
    epoch: int,
    stats: EpochStats,
    objs: TrainObjects,
    data: RunData,
    card: ModelCard,
    rt: Runtime,
    supervision: AuxiliaryLosses | None,
) -> dict | None:
    """The epoch's metrics row (rank 0; None elsewhere), with the auxiliary losses' epoch metrics (over all ranks'
    batches). Every rank takes part in the gathers."""
    train_loss = sum(gather_objects(stats.loss, rt.dist)) / rt.dist.world_size
    aux = sum_totals(gather_objects(supervision.epoch_totals(), rt.dist)) if supervision is not None else {}
    val = None
    if data.val:
        val = evaluate_loader(objs.model, data.eval_loader(data.val), len(data.val), card, rt)
    if not rt.is_main:
        return None
    m = score(*val, data.classes) if val is not None else {"auc": math.nan, "accuracy": math.nan, "loss": math.nan}
    return {
        "epoch": epoch + 1,
        "train_loss": round(train_loss, 6),
        "val_loss": round(m["loss"], 6),
        "val_auc": round(m["auc"], 6) if not math.isnan(m["auc"]) else float("nan"),
        "val_accuracy": round(m["accuracy"], 6),
        "lr": objs.optimizer.param_groups[-1]["lr"],
        "train_images_per_s": round(stats.images * rt.dist.world_size / max(stats.seconds, 1e-9), 2),
        "epoch_time_s": round(time.time() - stats.started, 2),
        **{k: round(v, 6) for k, v in (supervision.epoch_metrics(aux) if aux else {}).items()},
    }
