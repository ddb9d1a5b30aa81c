"""Optimiser, learning-rate schedule and train-mode policy (frozen backbone, frozen BatchNorm)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from liverus.models.backbones import has_mask_channel
from liverus.training.distributed import unwrap_model

if TYPE_CHECKING:
    from liverus.training.config import OptimConfig

__all__ = ["OPTIMIZERS", "param_groups", "build_optimizer", "build_scheduler", "set_train_mode"]

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Backbone and head groups (the backbone at ``lr * backbone_lr_mult``), each split into weights that decay and
    biases / norm parameters that do not.

    A stem adapted to a lesion-mask channel learns at the head's rate: its mask kernel starts at zero, and Adam moves
    each weight by about the learning rate per step whatever its gradient, so at the backbone's rate (1e-4 on AUL) the
    mask kernel stayed near zero after 10 epochs (mean |w| 0.0006 against 0.96 for the image kernel) and the network
    learnt nothing from the mask. The kernel is one tensor, so its image part moves at the head's rate too.
    """
    new_input = _new_input_kernels(model)
    decay, no_decay = {"backbone": [], "head": []}, {"backbone": [], "head": []}
    for name, p in model.named_parameters():
        part = "backbone" if name.startswith("backbone.") and id(p) not in new_input else "head"
        (no_decay if p.ndim <= 1 else decay)[part].append(p)
    groups = []
    for part, mult in (("backbone", optim.backbone_lr_mult), ("head", 1.0)):
        for params, wd in ((decay[part], optim.weight_decay), (no_decay[part], 0.0)):
            if params:
                groups.append({"params": params, "lr": optim.lr * mult, "weight_decay": wd, "part": part})
    return groups


def _new_input_kernels(model: nn.Module) -> set[int]:
    """ids of stem kernels with input channels the pretrained weights did not have (the lesion mask)."""
    backbone = getattr(model, "backbone", None)
    if not has_mask_channel(getattr(model, "in_chans", 1)) or backbone is None or not hasattr(backbone, "stem"):
        return set()
    return {id(backbone.stem().weight)}


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD over :func:`param_groups`."""
    groups = param_groups(model, optim)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=optim.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay, stepped once per optimiser step; a frozen backbone gets lr 0 (rather than
    ``requires_grad=False``, which DDP cannot change mid-run) for ``freeze_backbone_epochs``."""
    total = optim.epochs * steps_per_epoch
    warm = int(optim.warmup_epochs * steps_per_epoch)
    frozen = optim.freeze_backbone_epochs * steps_per_epoch

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def backbone(step: int) -> float:
        return 0.0 if step < frozen else schedule(step)

    lambdas = [backbone if g["part"] == "backbone" else schedule for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def set_train_mode(model: nn.Module, optim: OptimConfig, epoch: int) -> None:
    """Train mode, except BatchNorm layers that ``freeze_bn`` or a frozen backbone keep in eval mode."""
    model.train()
    frozen_backbone = epoch < optim.freeze_backbone_epochs
    if optim.freeze_bn or frozen_backbone:
        target = model if optim.freeze_bn else unwrap_model(model).backbone
        for m in target.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
