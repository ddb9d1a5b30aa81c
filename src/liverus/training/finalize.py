"""After the last epoch: the best weights, the operating threshold, the prediction files and ``model.pt``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from liverus.engine.predictions import write_predictions
from liverus.evaluation.metrics import choose_threshold
from liverus.models import ModelCard, save_model
from liverus.training.datasets import RunData
from liverus.training.distributed import unwrap_model
from liverus.training.loop import evaluate_loader, score
from liverus.training.run_folder import RunFolder
from liverus.training.runtime import Runtime

__all__ = ["FinalModel", "finalize"]


@dataclass
class FinalModel:
    card: ModelCard
    val_metrics: dict
    test_metrics: dict | None


def finalize(
    model: torch.nn.Module,
    data: RunData,
    card: ModelCard,
    rt: Runtime,
    folder: RunFolder,
    *,
    fixed_threshold: float | None,
) -> FinalModel | None:
    """Score the best weights (already loaded into ``model``) on validation and test, choose the threshold and write
    ``predictions_*.csv`` and ``model.pt``.

    The threshold is Youden's on the validation predictions (binary), or ``fixed_threshold`` when the run has no
    validation split. Every rank scores its shard; rank 0 writes and returns the result (None elsewhere).
    """
    val = evaluate_loader(model, data.eval_loader(data.val), len(data.val), card, rt) if data.val else None
    test = evaluate_loader(model, data.eval_loader(data.test), len(data.test), card, rt) if data.test else None
    if not rt.is_main:
        return None
    classes = data.classes
    if val is not None:
        threshold = choose_threshold(val[1], val[0][:, 1]) if len(classes) == 2 else 0.5
        val_metrics = score(*val, classes, threshold)
        write_predictions(folder / "predictions_val.csv", data.val, *val, classes, threshold)
        method = "youden (validation)"
    else:
        threshold, val_metrics, method = float(fixed_threshold), {"auc": math.nan}, "model.threshold (config)"
    test_metrics = None
    if test is not None:
        test_metrics = score(*test, classes, threshold)
        write_predictions(folder / "predictions_test.csv", data.test, *test, classes, threshold)
    card = card.replace(threshold=float(threshold), threshold_method=method, val_auc=float(val_metrics["auc"]))
    core = unwrap_model(model).to("cpu").to(memory_format=torch.contiguous_format)
    save_model(core, folder.model_file, card)
    return FinalModel(card, _jsonable(val_metrics), _jsonable(test_metrics) if test_metrics else None)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
