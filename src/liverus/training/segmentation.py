"""``liverus segment train``: a lesion segmenter trained on the lesion masks, with the classification runs' data layer
(cases, cache, grouped split, skipped-file listing), run folder (config, provenance, refusal to overwrite), resumable
checkpoints and precision.

One epoch is :func:`train_segmentation_epoch` (Dice + binary cross-entropy on the lesion logits, with the classifiers'
gradient accumulation and clipping); model selection maximises the validation Dice; the finished run holds
``model.pt`` (weights + card), ``metrics.json`` (validation Dice, IoU, HD95 and detection per class with intervals)
and ``result.json``. A config key the segmenter does not use (the loss section, sampling, split, box and
classifier-head keys) is an error when it is set, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from liverus import __version__
from liverus.data import Case, CaseCache, SegmentationDataset, build_train_transform, prepare_cases, save_splits
from liverus.data.io import write_png
from liverus.data.splits import check_disjoint, train_val_test_split
from liverus.engine.runtime import precision_name
from liverus.engine.segment import segment_cases
from liverus.evaluation.segmentation import dice, segmentation_summary
from liverus.models.card import ModelCard
from liverus.models.segmentation import SEGMENTERS, build_segmenter, save_segmenter
from liverus.training.config import ConfigError, LossConfig, TrainConfig, config_to_dict
from liverus.training.datasets import cache_dir, log_skipped, resolve_cases
from liverus.training.distributed import DistInfo
from liverus.training.loop import train_one_epoch
from liverus.training.losses import dice_bce_loss
from liverus.training.optim import build_optimizer, build_scheduler, set_train_mode
from liverus.training.run_folder import RunFolder
from liverus.training.runtime import Runtime
from liverus.training.state import CheckpointSaver, TrainObjects, TrainState
from liverus.utils import atomic_write_json, seed_everything

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["train_segmenter", "train_segmentation_epoch", "dice_bce_loss", "segment_cross_validation"]

log = logging.getLogger("liverus.training")


def train_segmentation_epoch(
    objs: TrainObjects,
    loader: DataLoader,
    card: ModelCard,
    rt: Runtime,
    *,
    accum_steps: int = 1,
    grad_clip: float = 0.0,
    progress: bool = False,
    desc: str = "",
) -> float:
    """One pass over ``loader``'s ``(images, masks)`` with the Dice + binary cross-entropy loss: the classifiers'
    training step (:func:`~liverus.training.loop.train_one_epoch`: ``accum_steps`` micro-batches per optimiser step,
    gradients clipped to the norm ``grad_clip`` when it is > 0; the loss in fp32 on the logits, outside autocast).
    The caller sets the train mode (:func:`~liverus.training.optim.set_train_mode`). Returns: the mean loss."""
    stats = train_one_epoch(
        objs, loader, dice_bce_loss, card, rt,
        accum_steps=accum_steps, grad_clip=grad_clip, progress=progress, desc=desc,
    )  # fmt: skip
    return stats.loss


def _with_masks(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.mask or c.polygon]


# Config keys that the classifiers' trainer reads and the segmenter does not, with why. `segment train` and
# `segment cv` refuse a config that sets one to anything but its default (or a value in _ALSO_ACCEPTED, which the
# segmenter does anyway), so that no setting is silently ignored. The feature models' own options (data.box_copies,
# data.scan_view, model.run_length, ...) need no entry: TrainConfig.validate refuses them for any other model.
_LOSS = "its loss is binary cross-entropy + soft Dice on the lesion mask"
_BOXES = "it learns from the expert masks, never from boxes"
_HEAD = "an option of the classifiers' heads; the U-Net's architecture is fixed"
_UNWEIGHTED = "it draws every training image once per epoch, unweighted"
_SPLIT = "it makes its own group-aware split, splits.json in the run folder, and `segment cv` its own folds"
_NOT_USED: dict[str, str] = {
    **{f"loss.{f.name}": _LOSS for f in dataclasses.fields(LossConfig)},
    "loss.balanced_sampler": _UNWEIGHTED,
    "data.balance_by": _UNWEIGHTED,
    "data.splits": _SPLIT,
    "data.fold": _SPLIT,
    "data.lesion_channel": "its input is the image alone; the lesion mask is what it learns",
    "data.lesion_from": _BOXES,
    "data.test_lesion_from": "it has no held-out test part",
    **{
        f"data.{k}": _BOXES
        for k in ("box_loosen", "box_jitter", "box_mask", "box_average", "box_shift", "box_copy_jitter")
    },
    "model.ensemble": "it trains one segmenter; `segment cv` trains one per fold",
    "model.threshold": "its masks are its probabilities thresholded at 0.5",
    "model.in_chans": "its encoder reads the gray image, one channel",
    **{f"model.{k}": _HEAD for k in ("drop_rate", "drop_path_rate", "se_reduction", "ca_reduction", "spatial_kernel")},
    "model.pca_dim": "an option of the radiomics_* feature models",
    "runtime.compile": "it trains the model uncompiled",
    "runtime.channels_last": "it trains in the default memory format",
}
_ALSO_ACCEPTED: dict[str, tuple] = {"runtime.channels_last": ("false",)}


def _check_config(cfg: TrainConfig) -> None:
    """Validate ``cfg`` and check that it is a segmenter's: a segmenter's name, and no key it would ignore.

    Raises:
        ConfigError: naming the key.
    """
    cfg.validate()
    if cfg.model.name not in SEGMENTERS:
        raise ConfigError(f"model.name: {cfg.model.name!r} is not a segmenter; use one of {sorted(SEGMENTERS)}")
    defaults = TrainConfig()
    for dotted, why in _NOT_USED.items():
        sec, key = dotted.split(".")
        value, default = getattr(getattr(cfg, sec), key), getattr(getattr(defaults, sec), key)
        if value != default and value not in _ALSO_ACCEPTED.get(dotted, ()):
            raise ConfigError(
                f"{dotted}: set to {json.dumps(value)}, but the segmenter does not use it ({why}); remove it from "
                f"the config or set it to {json.dumps(default)}"
            )


def train_segmenter(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cases: list[Case] | None = None,
    split: dict[str, list[str]] | None = None,
) -> dict:
    """Train a segmenter as ``cfg`` says (``model.name`` is the segmenter; the data, optimiser and runtime sections
    are read as for classification, gradient clipping and accumulation, early stopping, frozen BatchNorm, loader
    workers, progress bar and TensorBoard included) and write the run folder.

    Args:
        cfg, run_dir, resume, overwrite: as :func:`~liverus.training.train`.
        cases: the cases (default: from ``cfg.data``); those without a lesion mask are left out.
        split: ``{"train": paths, "val": paths}`` (default: a new group-aware split, saved as ``splits.json``).

    Returns:
        The result (also ``result.json``).

    Raises:
        ConfigError: for a model that is not a segmenter, or a key the segmenter does not use (loss, sampling,
            split, box and classifier-head keys, ``runtime.compile``, ``runtime.channels_last: true``) set to
            another value than its default.
        RunExistsError: if the folder holds a run and neither ``resume`` nor ``overwrite`` is set.
        DataError: for bad data, or no images with lesion masks.
    """
    t0 = time.time()
    _check_config(cfg)
    rt = Runtime.from_config(cfg.runtime)
    folder = RunFolder(run_dir)
    resumed = folder.prepare(config_to_dict(cfg), cfg.runtime.seed, resume=resume, overwrite=overwrite)
    if resumed and (stored := folder.finished_result()):
        return stored
    seed_everything(cfg.runtime.seed)
    parts, cache = _segmentation_parts(cfg, folder, cases, split)
    model = build_segmenter(cfg.model.name, weights=cfg.model.weights).to(rt.device)
    card = ModelCard(
        model_name=model.model_name, classes=("background", "lesion"), in_chans=1, normalization=model.normalization,
        preprocess=cache.cfg, task="segmentation", precision=precision_name(rt.amp), version=__version__,
    )  # fmt: skip
    state = _train_epochs(cfg, model, card, parts, cache, rt, folder, resumed=resumed)
    metrics = {}
    if parts["val"]:
        preds, trues = segment_cases(model, card, parts["val"], cache)
        metrics = segmentation_summary(preds, trues, [c.label for c in parts["val"]])
    atomic_write_json(folder / "metrics.json", {"validation": metrics})
    save_segmenter(model.to("cpu"), folder.model_file, card.replace(best_epoch=state.best_epoch))
    result = {
        "run_dir": str(folder.path),
        "model_path": str(folder.model_file),
        "best_epoch": state.best_epoch,
        "val_dice": metrics.get("all", {}).get("dice", {}).get("mean", math.nan),
        "epochs_run": len(state.history),
        "history": state.history,
        "wall_time_s": round(time.time() - t0, 2),
    }
    folder.write_result(result)
    return result


def _segmentation_parts(
    cfg: TrainConfig, folder: RunFolder, cases: list[Case] | None, split: dict[str, list[str]] | None
) -> tuple[dict[str, list[Case]], CaseCache]:
    """The cases with a lesion mask, decoded into the cache (skipped files listed), and their ``train`` and ``val``
    parts: the run folder's ``splits.json`` when it has one (a resumed run), else ``split``, else a new group-aware
    split; saved as ``splits.json``.

    Returns:
        ``(parts, the cache)``.

    Raises:
        DataError: for bad data, no images with lesion masks, or a leaking split.
    """
    from liverus.data import DataError

    cases = _with_masks(cases if cases is not None else resolve_cases(cfg, folder.path))
    if not cases:
        raise DataError(cfg.data.source or None, "no image has a lesion mask; segmentation needs masks to learn from")
    pre = dataclasses.replace(cfg.data.preprocess(), lesion_channel=False, lesion_from="mask")
    cache = CaseCache(pre, cache_dir(cfg, folder.path))
    cases, skipped = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
    if skipped:
        log_skipped(skipped, folder.write_skipped(skipped))
    if folder.splits_file.is_file():
        split = json.loads(folder.splits_file.read_text())["folds"][0]
    elif split is not None:
        save_splits(folder.splits_file, {"folds": [split]})
    else:
        split = train_val_test_split(cases, cfg.data.val_fraction, 0.0, seed=cfg.runtime.seed)
        save_splits(folder.splits_file, {"folds": [split]})
    by_path = {c.path: c for c in cases}
    parts = {k: [by_path[p] for p in v if p in by_path] for k, v in split.items()}
    check_disjoint(cases, {k: [c.path for c in v] for k, v in parts.items()})
    return parts, cache


def _train_epochs(
    cfg: TrainConfig,
    model: torch.nn.Module,
    card: ModelCard,
    parts: dict[str, list[Case]],
    cache: CaseCache,
    rt: Runtime,
    folder: RunFolder,
    *,
    resumed: bool,
) -> TrainState:
    """The epoch loop: train, score the validation Dice, checkpoint, log (``metrics.csv``, TensorBoard) and stop
    early when ``optim.early_stopping_patience`` epochs bring no validation Dice gain; resumes from ``last.pt``.
    Leaves the best epoch's weights in ``model``."""
    ds = SegmentationDataset(parts["train"], cache, build_train_transform(cfg.data.augment), seed=cfg.runtime.seed)
    gen = torch.Generator().manual_seed(cfg.runtime.seed)
    # Workers are started afresh each epoch (not persistent), so they see the dataset's epoch, which seeds the
    # augmentation; the order comes from the generator in this process, so workers change no result.
    loader = DataLoader(ds, batch_size=min(cfg.optim.batch_size, len(ds)), shuffle=True, drop_last=True, generator=gen,
                        num_workers=cfg.data.num_workers)  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim)
    objs = TrainObjects(
        model, optimizer, build_scheduler(optimizer, cfg.optim, max(1, len(loader) // cfg.optim.accum_steps)),
        torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16),
    )  # fmt: skip
    saver = CheckpointSaver(folder.checkpoints, config_to_dict(cfg))
    state = (saver.restore(objs) if resumed else None) or TrainState()
    writer = _tensorboard_writer(folder, state.epoch) if cfg.runtime.tensorboard else None
    # One process in the default memory format: the segmenter is neither DDP-wrapped nor converted to channels-last.
    one_process = dataclasses.replace(rt, channels_last=False, dist=DistInfo())
    patience = cfg.optim.early_stopping_patience
    for epoch in range(state.epoch, cfg.optim.epochs):
        ds.set_epoch(epoch)
        gen.manual_seed(cfg.runtime.seed * 1000 + epoch)  # the epoch's order, independent of where a run resumed
        set_train_mode(objs.model, cfg.optim, epoch)
        started = time.time()
        loss = train_segmentation_epoch(
            objs, loader, card, one_process, accum_steps=cfg.optim.accum_steps, grad_clip=cfg.optim.grad_clip,
            progress=cfg.runtime.progress, desc=f"segment epoch {epoch + 1}/{cfg.optim.epochs}",
        )  # fmt: skip
        val_dice = math.nan
        if parts["val"]:
            preds, trues = segment_cases(objs.model, card, parts["val"], cache)
            val_dice = float(np.mean([dice(p, t) for p, t in zip(preds, trues, strict=True)]))
        row = {"epoch": epoch + 1, "train_loss": round(loss, 6), "val_dice": round(val_dice, 6),
               "epoch_time_s": round(time.time() - started, 2)}  # fmt: skip
        improved = state.record(row, val_dice if parts["val"] else float(epoch))
        log.info("segment epoch %d/%d: loss %.4f, val Dice %.3f", epoch + 1, cfg.optim.epochs, loss, val_dice)
        folder.rewrite_metrics(state.history)
        _write_scalars(writer, row)
        saver.save(objs, state, improved=improved)
        if patience and state.bad_epochs >= patience:  # without validation every epoch improves: never stops
            log.info("early stopping: no validation Dice gain for %d epochs", state.bad_epochs)
            break
    if writer is not None:
        writer.close()
    saver.load_best(model)
    return state


def _tensorboard_writer(folder: RunFolder, start_epoch: int) -> SummaryWriter:
    """A TensorBoard writer of ``tb/`` in the run folder; a resumed run's later events are purged."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder.path / "tb"), purge_step=start_epoch)


def _write_scalars(writer: SummaryWriter | None, row: dict) -> None:
    """An epoch's metrics row as TensorBoard scalars at that epoch (nothing without a writer)."""
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def segment_cross_validation(
    cfg: TrainConfig, out: str | Path, *, folds: int = 2, resume: bool = False, overwrite: bool = False
) -> dict:
    """Out-of-fold predicted lesion masks for every image with an expert mask: ``folds`` segmenters, each trained on
    the other folds (group-disjoint), segment the images they never saw. Writes ``OUT/fold{i}/`` (segment runs),
    ``OUT/masks/`` (predicted masks as PNG), ``OUT/manifest.csv`` (the cases with their predicted masks, for
    ``cv``/``compare``/``evaluate``: classification on predicted lesions) and ``OUT/metrics.json`` (out-of-fold
    Dice, IoU, HD95 and detection per class).

    Returns:
        ``{"manifest", "metrics", "not_detected"}``.

    Raises:
        ConfigError: as :func:`train_segmenter`, before anything is written.
    """

    from liverus.data import DataError, kfold_splits, write_manifest
    from liverus.data.io import read_image
    from liverus.engine.segment import propose_lesion
    from liverus.evaluation.segmentation import segmentation_summary
    from liverus.models.segmentation import load_segmenter

    _check_config(cfg)  # before the study folder is made, not when its first fold starts training
    out = Path(out)
    folder = RunFolder(out)
    folder.prepare(config_to_dict(cfg), cfg.runtime.seed, resume=resume, overwrite=overwrite)
    cases = _with_masks(resolve_cases(cfg, out))
    pre = dataclasses.replace(cfg.data.preprocess(), lesion_channel=False, lesion_from="mask")
    cache = CaseCache(pre, cache_dir(cfg, out))
    cases, skipped = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
    by_path = {c.path: c for c in cases}
    predicted, preds, trues, labels, missing = [], [], [], [], []
    (out / "masks").mkdir(exist_ok=True)
    for i, fold in enumerate(kfold_splits(cases, folds, seed=cfg.runtime.seed)):
        held = [by_path[p] for p in fold["val"]]
        train_part = [by_path[p] for p in fold["train"]]
        try:
            inner = train_val_test_split(train_part, cfg.data.val_fraction, 0.0, seed=cfg.runtime.seed)
        except DataError as exc:  # too few groups to hold some out: train on all, keep the last epoch
            log.warning("fold %d: no validation split (%s); the last epoch is kept", i, exc.problem)
            inner = {"train": [c.path for c in train_part], "val": []}
        log.info("== segmenter fold %d/%d: %d training, %d held-out images", i + 1, folds, len(train_part), len(held))
        run = out / f"fold{i}"
        train_segmenter(cfg, run, resume=run.exists(), cases=train_part, split=inner)
        model, card = load_segmenter(run / "model.pt")
        for c in held:
            image = read_image(c.path, frame=pre.frame)
            proposal = propose_lesion(model, card, image)
            # Scored on the preprocessed grid, as segment evaluate scores (the proposal's own crop prediction: the
            # segmenter's preprocessing is this cache's).
            preds.append(proposal.crop_probability >= 0.5)
            trues.append(cache.get(c)[2] > 0)
            labels.append(c.label)
            mask_path = None
            if proposal.box is not None:
                mask_path = out / "masks" / f"{len(predicted):05d}_{Path(c.path).stem}.png"
                write_png(mask_path, proposal.mask.astype(np.uint8) * 255)
            else:
                missing.append(c.path)
            predicted.append(dataclasses.replace(c, mask=str(mask_path) if mask_path else None,
                                                 extra_masks=(), polygon=None))  # fmt: skip
    write_manifest(predicted, out / "manifest.csv")
    summary = segmentation_summary(preds, trues, labels)
    atomic_write_json(out / "metrics.json", {"out_of_fold": summary, "not_detected": missing, "skipped": skipped})
    log.info("out-of-fold Dice %.3f; no lesion found in %d of %d images", summary["all"]["dice"]["mean"],
             len(missing), len(predicted))  # fmt: skip
    return {"manifest": str(out / "manifest.csv"), "metrics": summary, "not_detected": missing}
