"""The trainer: one function, :func:`train`, behind ``liverus train``, ``cv``, ``compare`` and ``demo``.

A run folder holds everything needed to reproduce and to resume a run:

``config.yaml`` (effective config), ``provenance.json`` (seed, package versions, git commit), ``splits.json``,
``metrics.csv`` and ``tb/`` (per-epoch metrics), ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (atomic),
``model.pt`` (best weights + threshold + preprocessing, what ``predict``/``serve``/``export`` load),
``predictions_val.csv`` (and ``predictions_test.csv``) and finally ``result.json``, whose presence marks a finished run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from liverus.data import (
    Case,
    CaseCache,
    DataError,
    PreprocessConfig,
    UltrasoundDataset,
    build_train_transform,
    check_disjoint,
    default_cache_dir,
    load_cases,
    load_splits,
    make_phantom_dataset,
    prepare_cases,
    save_splits,
    select_task,
    train_val_test_split,
)
from liverus.evaluation.metrics import binary_metrics, choose_threshold, multiclass_metrics
from liverus.models import build_model, save_model
from liverus.training.config import TrainConfig, config_to_dict
from liverus.training.distributed import (
    DistInfo,
    ShardedBatchSampler,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
)
from liverus.training.losses import build_loss
from liverus.utils import atomic_torch_save, atomic_write_json, atomic_write_text, provenance, seed_everything

__all__ = [
    "train",
    "TrainResult",
    "RunExistsError",
    "resolve_device",
    "resolve_precision",
    "normalize_batch",
    "predict_probs",
    "resolve_cases",
]


class RunExistsError(FileExistsError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


@dataclass
class TrainResult:
    run_dir: str
    model_path: str
    best_epoch: int
    val_auc: float
    threshold: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    val_metrics: dict = field(default_factory=dict)
    test_metrics: dict | None = None
    wall_time_s: float = 0.0


# ---------------------------------------------------------------- devices and precision


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto``: the local GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info is not None and info.enabled:
        return torch.device("cuda", info.local_rank)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device asks for CUDA but no GPU is available")
    return dev


def _cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for fp32.

    ``auto`` picks bf16 on a CPU with native bf16 (AVX-512 BF16 / AMX) and on GPUs that support it, fp16 on older
    GPUs, and fp32 elsewhere. Weights, optimiser state and the loss stay fp32 in every case.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_bf16_supported() else None


def resolve_channels_last(setting: str, device: torch.device, amp: torch.dtype | None) -> bool:
    """``auto``: channels-last on CUDA and with CPU bf16 (oneDNN's fast path); on an fp32-only CPU the NCHW
    kernels were measured faster (benchmarks/train_throughput.py)."""
    if setting in ("true", "false"):
        return setting == "true"
    return device.type == "cuda" or amp is not None


def normalize_batch(x: torch.Tensor, mean: float, std: float, channels_last: bool, in_chans: int = 1) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> normalised float, on the device the tensor is on."""
    x = x.float().div_(255.0).sub_(mean).div_(std)
    if in_chans == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------- data


def resolve_cases(cfg: TrainConfig, run_dir: Path, info: DistInfo) -> list[Case]:
    """The task's cases: from ``data.source``, or a phantom written once into the run folder."""
    if cfg.data.source:
        cases = load_cases(cfg.data.source)
    else:
        phantom_dir = run_dir / "phantom"
        if info.is_main and not (phantom_dir / "manifest.csv").is_file():
            make_phantom_dataset(
                phantom_dir,
                n_patients=cfg.data.phantom_patients,
                size=cfg.data.phantom_size,
                seed=cfg.runtime.seed,
                include_normal=cfg.data.task == "three_class",
            )
        barrier(info)
        cases = load_cases(phantom_dir / "manifest.csv")
    cases, _ = select_task(cases, cfg.data.task)
    return cases


def preprocess_config(cfg: TrainConfig) -> PreprocessConfig:
    return PreprocessConfig(
        image_size=cfg.data.image_size,
        crop=cfg.data.crop,
        roi_margin=cfg.data.roi_margin,
        letterbox=cfg.data.letterbox,
    )


# ---------------------------------------------------------------- the run folder


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> bool:
    """Returns: whether an earlier run is resumed. Raises: RunExistsError, ValueError."""
    cfg_text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    existing = run_dir.exists() and any(run_dir.iterdir())
    if existing and overwrite:
        backup = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(backup)
        print(f"moved the existing run folder to {backup}", file=sys.stderr)
        existing = False
    if existing and not resume:
        raise RunExistsError(
            f"run folder {run_dir} already exists and is not empty; pass --resume to continue it or "
            "--overwrite to move it aside and start again (nothing is overwritten silently)"
        )
    if existing:
        saved = run_dir / "config.yaml"
        if saved.is_file() and yaml.safe_load(saved.read_text()) != yaml.safe_load(cfg_text):
            raise ValueError(f"cannot resume {run_dir}: its config.yaml differs from the requested config")
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg_text)
    atomic_write_json(run_dir / "provenance.json", {"seed": cfg.runtime.seed, **provenance()})
    return False


# ---------------------------------------------------------------- optimisation


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    decay, no_decay = {"backbone": [], "head": []}, {"backbone": [], "head": []}
    for name, p in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "head"
        (no_decay if p.ndim <= 1 else decay)[part].append(p)
    groups = []
    for part, mult in (("backbone", cfg.optim.backbone_lr_mult), ("head", 1.0)):
        for params, wd in ((decay[part], cfg.optim.weight_decay), (no_decay[part], 0.0)):
            if params:
                groups.append({"params": params, "lr": cfg.optim.lr * mult, "weight_decay": wd, "part": part})
    return groups


def _build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def _lr_lambdas(cfg: TrainConfig, steps_per_epoch: int, groups: list[dict]):
    total = cfg.optim.epochs * steps_per_epoch
    warm = int(cfg.optim.warmup_epochs * steps_per_epoch)
    frozen = cfg.optim.freeze_backbone_epochs * steps_per_epoch

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def backbone(step: int) -> float:
        # A frozen backbone gets lr 0 (rather than requires_grad=False, which DDP cannot change mid-run).
        return 0.0 if step < frozen else schedule(step)

    return [backbone if g["part"] == "backbone" else schedule for g in groups]


def _set_train_mode(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    model.train()
    frozen_backbone = epoch < cfg.optim.freeze_backbone_epochs
    if cfg.optim.freeze_bn or frozen_backbone:
        target = model if cfg.optim.freeze_bn else model.backbone
        for m in target.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ---------------------------------------------------------------- evaluation during training


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: torch.dtype | None,
    mean: float,
    std: float,
    channels_last: bool,
    in_chans: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns: ``(probabilities (n, k), targets (n,))`` in loader order."""
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        x = normalize_batch(x.to(device, non_blocking=True), mean, std, channels_last, in_chans)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        probs.append(F.softmax(logits.float(), dim=1).cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def _score(probs: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], threshold: float = 0.5) -> dict:
    if len(classes) == 2:
        return binary_metrics(targets, probs[:, 1], threshold)
    m = multiclass_metrics(targets, probs, classes)
    m["auc"] = m["macro"]["auc"]
    return m


def _write_predictions(
    path: Path,
    cases: list[Case],
    probs: np.ndarray,
    targets: np.ndarray,
    classes: tuple[str, ...],
    threshold: float,
) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    meta_cols = sorted({k for c in cases for k in c.meta})
    w.writerow(["path", "label", "target", *[f"p_{c}" for c in classes], "predicted", "group", *meta_cols])
    for c, p, t in zip(cases, probs, targets, strict=True):
        # Binary: the stored threshold decides; more classes: the most probable one.
        pred = classes[int(p[1] >= threshold)] if len(classes) == 2 else classes[int(p.argmax())]
        w.writerow(
            [
                c.path,
                c.label,
                int(t),
                *[f"{v:.6f}" for v in p],
                pred,
                c.group,
                *[c.meta.get(k, "") for k in meta_cols],
            ]
        )
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------- the loop


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
        The result, also written as ``result.json``.

    Raises:
        RunExistsError: if the folder holds a run and neither ``resume`` nor ``overwrite`` is set.
        DataError: for bad data (see :mod:`liverus.data`).
    """
    t_start = time.time()
    run_dir = Path(run_dir)
    cfg.validate()
    device_type = (
        "cuda"
        if cfg.runtime.device.startswith("cuda") or (cfg.runtime.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    info = init_distributed(device_type)
    device = resolve_device(cfg.runtime.device, info)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)

    resumed = False
    if info.is_main:
        resumed = _prepare_run_dir(run_dir, cfg, resume, overwrite)
    resumed = broadcast_object(resumed, info)
    if resumed and (run_dir / "result.json").is_file():
        stored = json.loads((run_dir / "result.json").read_text())
        return TrainResult(**stored)
    seed_everything(cfg.runtime.seed)

    # ---- data
    if cases is None:
        cases = resolve_cases(cfg, run_dir, info)
    classes = ("benign", "malignant") if cfg.data.task == "binary" else ("normal", "benign", "malignant")
    cache = CaseCache(preprocess_config(cfg), cfg.data.cache_dir or default_cache_dir())
    if info.is_main:
        cases, skipped = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
        if skipped:
            atomic_write_json(run_dir / "skipped.json", [{"path": p, "problem": q} for p, q in skipped])
            print(f"skipped {len(skipped)} bad file(s) (listed in {run_dir / 'skipped.json'}):", file=sys.stderr)
            for p, q in skipped:
                print(f"  {p}: {q}", file=sys.stderr)
    barrier(info)
    if not info.is_main:
        cases, _ = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
    if split is None:
        if (run_dir / "splits.json").is_file():
            split = load_splits(run_dir / "splits.json", cases)["folds"][0]
        elif cfg.data.splits:
            folds = load_splits(cfg.data.splits, cases)["folds"]
            if cfg.data.fold >= len(folds):
                raise DataError(cfg.data.splits, f"has {len(folds)} folds; data.fold={cfg.data.fold} does not exist")
            split = folds[cfg.data.fold]
        elif cfg.data.val_fraction == 0:
            split = {"train": [c.path for c in cases], "val": []}  # final model: every case, fixed epochs
        else:
            split = train_val_test_split(cases, cfg.data.val_fraction, 0.0, seed=cfg.runtime.seed)
    by_path = {c.path: c for c in cases}
    parts = {k: [by_path[p] for p in v if p in by_path] for k, v in split.items()}
    check_disjoint(cases, {k: [c.path for c in v] for k, v in parts.items()})
    if info.is_main and not (run_dir / "splits.json").is_file():
        save_splits(run_dir / "splits.json", {"folds": [{k: [c.path for c in v] for k, v in parts.items()}]})
    train_cases, val_cases = parts["train"], parts["val"]
    test_cases = parts.get("test", [])
    if not val_cases and cfg.model.threshold is None:
        raise DataError(None, "no validation cases: set model.threshold to train without validation")
    if not train_cases:
        raise DataError(None, f"empty split: {len(train_cases)} training and {len(val_cases)} validation cases")

    train_ds = UltrasoundDataset(
        train_cases, classes, cache, build_train_transform(cfg.data.augment), seed=cfg.runtime.seed
    )
    targets = train_ds.targets
    sample_weights = None
    if cfg.loss.balanced_sampler:
        counts = np.bincount(targets, minlength=len(classes))
        sample_weights = [1.0 / counts[t] for t in targets]
    gbs = cfg.optim.batch_size
    if len(train_ds) < gbs:
        gbs = max(info.world_size, (len(train_ds) // info.world_size) * info.world_size)
    train_sampler = ShardedBatchSampler(
        len(train_ds),
        gbs,
        seed=cfg.runtime.seed,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=True,
        drop_last=True,
        weights=sample_weights,
    )
    loader_kw = {
        "num_workers": cfg.data.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.data.num_workers > 0,
    }
    train_loader = DataLoader(train_ds, batch_sampler=train_sampler, **loader_kw)

    def eval_loader(cs: list[Case]) -> DataLoader:
        ds = UltrasoundDataset(cs, classes, cache, None)
        sampler = ShardedBatchSampler(
            len(ds),
            _eval_batch(info.world_size),
            rank=info.rank,
            world_size=info.world_size,
            shuffle=False,
            drop_last=False,
        )
        return DataLoader(
            ds, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=loader_kw["pin_memory"]
        )

    val_loader = eval_loader(val_cases) if val_cases else None

    # ---- model, loss, optimiser
    head_kwargs = {"drop_rate": cfg.model.drop_rate}
    if cfg.model.drop_path_rate is not None:
        head_kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    if not cfg.model.name.startswith("baseline"):
        head_kwargs.update(
            se_reduction=cfg.model.se_reduction,
            ca_reduction=cfg.model.ca_reduction,
            spatial_kernel=cfg.model.spatial_kernel,
        )
    model = build_model(
        cfg.model.name,
        num_classes=len(classes),
        weights=cfg.model.weights,
        in_chans=cfg.model.in_chans,
        **head_kwargs,
    )
    mean, std = model.normalization
    in_chans = model.in_chans
    amp = resolve_precision(cfg.runtime.precision, device)
    channels_last = resolve_channels_last(cfg.runtime.channels_last, device, amp)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    core = model
    criterion = build_loss(
        cfg.loss.name,
        targets,
        len(classes),
        focal_gamma=cfg.loss.focal_gamma,
        label_smoothing=cfg.loss.label_smoothing,
    ).to(device)
    optimizer = _build_optimizer(core, cfg)
    steps_per_epoch = max(1, len(train_sampler) // cfg.optim.accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambdas(cfg, steps_per_epoch, optimizer.param_groups))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_epoch, best_auc, best_epoch, bad_epochs, history = 0, -math.inf, -1, 0, []
    last_ckpt = run_dir / "checkpoints" / "last.pt"
    if resumed and last_ckpt.is_file():
        state = torch.load(last_ckpt, map_location="cpu", weights_only=True)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_auc, best_epoch = state["epoch"], state["best_auc"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], state["history"]
        _set_rng_state(state["rng"])
        if info.is_main:
            print(f"resuming {run_dir} after epoch {start_epoch}", file=sys.stderr)
            # Rows written after the last checkpoint (a kill between the two writes) are dropped.
            (run_dir / "metrics.csv").unlink(missing_ok=True)
            for row in history:
                _append_csv(run_dir / "metrics.csv", row)

    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
        # Same initial weights on every rank (seeded alike; DDP also broadcasts rank 0's), but independent dropout and
        # stochastic-depth streams per rank from here on.
        torch.manual_seed(cfg.runtime.seed + 1_000_003 * info.rank)
    if cfg.runtime.compile:
        model = torch.compile(model)

    writer = None
    if info.is_main and cfg.runtime.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch)
    metrics_csv = run_dir / "metrics.csv"

    # ---- epochs
    global_step = start_epoch * steps_per_epoch
    epoch = start_epoch
    stopped_early = False
    for epoch in range(start_epoch, cfg.optim.epochs):
        train_sampler.set_epoch(epoch)
        _set_train_mode(model, cfg, epoch)
        t0 = time.time()
        seen, loss_sum, n_batches = 0, 0.0, 0
        bar = None
        if info.is_main and cfg.runtime.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(train_sampler),
                desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,  # no bar when stderr is not a terminal (logs, CI)
            )
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(train_loader):
            x = normalize_batch(x.to(device, non_blocking=True), mean, std, channels_last, in_chans)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            last_micro = (i + 1) % cfg.optim.accum_steps == 0
            # Skip DDP's gradient all-reduce on accumulation micro-batches; only the last one synchronises.
            ctx = model.no_sync() if (info.enabled and not last_micro) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model(x)
                loss = criterion(logits.float(), y) / cfg.optim.accum_steps
                scaler.scale(loss).backward()
            if last_micro:
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
            seen += len(y)
            loss_sum += loss.item() * cfg.optim.accum_steps
            n_batches += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum / n_batches:.4f}",
                    img_s=f"{seen * info.world_size / (time.time() - t0):.1f}",
                )
            if max_steps is not None and global_step >= max_steps:
                break
        if bar is not None:
            bar.close()
        train_time = time.time() - t0
        train_loss = sum(gather_objects(loss_sum / max(1, n_batches), info)) / info.world_size

        # ---- validation (each rank scores a shard; rank 0 gathers)
        if val_cases:
            probs, tg = predict_probs(model, val_loader, device, amp, mean, std, channels_last, in_chans)
            shards = gather_objects((probs, tg), info)
        row = None
        if info.is_main:
            if val_cases:
                probs, tg = _merge_shards(shards, len(val_cases), info.world_size)
                val = _score(probs, tg, classes)
                val_loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(tg)))
            else:  # no validation split: the last epoch is the model
                val, val_loss = {"auc": math.nan, "accuracy": math.nan}, math.nan
            lr_head = optimizer.param_groups[-1]["lr"]
            row = {
                "epoch": epoch + 1,
                "train_loss": round(train_loss, 6),
                "val_loss": round(val_loss, 6),
                "val_auc": round(val["auc"], 6) if not math.isnan(val["auc"]) else float("nan"),
                "val_accuracy": round(val["accuracy"], 6),
                "lr": lr_head,
                "train_images_per_s": round(seen * info.world_size / max(train_time, 1e-9), 2),
                "epoch_time_s": round(time.time() - t0, 2),
            }
        row = broadcast_object(row, info)
        history.append(row)
        auc = _selection_score(row, bool(val_cases), epoch)
        improved = auc > best_auc
        if improved:
            best_auc, best_epoch, bad_epochs = auc, epoch + 1, 0
        else:
            bad_epochs += 1
        if info.is_main:
            _append_csv(metrics_csv, row)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            print(
                f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}"
                f"  val_auc {row['val_auc']:.4f}  {row['train_images_per_s']:.1f} img/s"
                + ("  *best*" if improved else ""),
                file=sys.stderr,
            )
            state = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "history": history,
                "rng": _rng_state(),
                "config": config_to_dict(cfg),
            }
            if improved:
                atomic_torch_save({"model": state["model"], "epoch": epoch + 1}, run_dir / "checkpoints" / "best.pt")
            atomic_torch_save(state, last_ckpt)
        barrier(info)
        if max_steps is not None and global_step >= max_steps:
            break
        if cfg.optim.early_stopping_patience and bad_epochs >= cfg.optim.early_stopping_patience:
            stopped_early = True
            if info.is_main:
                print(f"early stopping: no validation AUC gain for {bad_epochs} epochs", file=sys.stderr)
            break
    if writer is not None:
        writer.close()

    # ---- final model: best weights, threshold chosen on validation, test predictions
    best = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    core.load_state_dict(best["model"])
    eval_model = core
    shards = None
    if val_cases:
        probs, tg = predict_probs(eval_model, val_loader, device, amp, mean, std, channels_last, in_chans)
        shards = gather_objects((probs, tg), info)
    test_payload = None
    if test_cases:
        tprobs, ttg = predict_probs(
            eval_model, eval_loader(test_cases), device, amp, mean, std, channels_last, in_chans
        )
        test_payload = gather_objects((tprobs, ttg), info)
    result = None
    if info.is_main:
        if shards is not None:
            probs, tg = _merge_shards(shards, len(val_cases), info.world_size)
            threshold = choose_threshold(tg, probs[:, 1]) if len(classes) == 2 else 0.5
            val_metrics = _score(probs, tg, classes, threshold)
            _write_predictions(run_dir / "predictions_val.csv", val_cases, probs, tg, classes, threshold)
            method = "youden (validation)"
        else:
            threshold, val_metrics, method = float(cfg.model.threshold), {"auc": math.nan}, "model.threshold (config)"
        test_metrics = None
        if test_payload is not None:
            tprobs, ttg = _merge_shards(test_payload, len(test_cases), info.world_size)
            test_metrics = _score(tprobs, ttg, classes, threshold)
            _write_predictions(run_dir / "predictions_test.csv", test_cases, tprobs, ttg, classes, threshold)
        extra = {
            "threshold": threshold,
            "threshold_method": method,
            "classes": list(classes),
            "preprocess": asdict(preprocess_config(cfg)),
            "normalization": [mean, std],
            "val_auc": val_metrics["auc"],
            "best_epoch": best_epoch,
            "task": cfg.data.task,
            "version": _package_version(),
        }
        cpu_model = core.to("cpu").to(memory_format=torch.contiguous_format)
        save_model(cpu_model, run_dir / "model.pt", extra=extra)
        result = TrainResult(
            run_dir=str(run_dir),
            model_path=str(run_dir / "model.pt"),
            best_epoch=best_epoch,
            val_auc=float(val_metrics["auc"]),
            threshold=float(threshold),
            epochs_run=len(history),
            history=history,
            val_metrics=_jsonable(val_metrics),
            test_metrics=_jsonable(test_metrics) if test_metrics else None,
            wall_time_s=round(time.time() - t_start, 2),
        )
        atomic_write_json(run_dir / "result.json", asdict(result))
        if stopped_early:
            print(f"stopped early after epoch {len(history)}", file=sys.stderr)
    result = broadcast_object(result, info)
    return result


def _selection_score(row: dict, has_val: bool, epoch: int) -> float:
    """What model selection maximises: validation AUC (minus the loss when AUC is undefined); the epoch itself
    without validation, so that the last epoch is kept."""
    if not has_val:
        return float(epoch)
    return row["val_auc"] if not math.isnan(row["val_auc"]) else -row["val_loss"]


def _eval_batch(world: int) -> int:
    return max(world, 64 // world * world)


def _merge_shards(shards: list, n: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Undo the round-robin split of :class:`ShardedBatchSampler` (batch b, rank r) back to dataset order."""
    if world == 1:
        return shards[0]
    order = list(range(n))
    bs = _eval_batch(world)
    pieces: list[list[int]] = [[] for _ in range(world)]
    for start in range(0, n, bs):
        batch = order[start : start + bs]
        for r in range(world):
            pieces[r].extend(batch[r::world])
    probs = np.zeros((n, shards[0][0].shape[1]), dtype=np.float32)
    tg = np.zeros(n, dtype=np.int64)
    for r, (p, t) in enumerate(shards):
        probs[pieces[r]] = p
        tg[pieces[r]] = t
    return probs, tg


def _append_csv(path: Path, row: dict) -> None:
    new = not path.is_file()
    text = path.read_text() if not new else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(row))
    if new:
        w.writeheader()
    w.writerow(row)
    atomic_write_text(path, text + buf.getvalue())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _package_version() -> str:
    from liverus import __version__

    return __version__
