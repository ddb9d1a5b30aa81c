"""After the last epoch: the best weights, the inference precision, the operating points, the prediction files and
``model.pt``."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from liverus.data import DataError
from liverus.engine.averaging import average_probabilities
from liverus.engine.predictions import write_predictions
from liverus.engine.runtime import precision_name
from liverus.evaluation.metrics import operating_points
from liverus.models import ModelCard, save_model
from liverus.training.datasets import RunData
from liverus.training.distributed import broadcast_object, unwrap_model
from liverus.training.loop import evaluate_loader, score
from liverus.training.run_folder import RunFolder
from liverus.training.runtime import Runtime
from liverus.utils import to_plain

__all__ = ["FinalModel", "finalize", "PRECISION_TOLERANCE"]

log = logging.getLogger("liverus.training")

# Inference keeps the training run's reduced precision only where it moves no validation probability by this much.
PRECISION_TOLERANCE = 0.005


@dataclass
class FinalModel:
    card: ModelCard
    val_metrics: dict
    test_metrics: dict | None


@dataclass
class ChosenPoints:
    """The operating threshold, the named points with their expected rates, the metrics on the predictions they were
    chosen on, and how they were chosen (the model card's ``threshold_method``)."""

    threshold: float
    points: dict[str, float]
    rates: dict[str, dict]
    val_metrics: dict
    method: str


def chosen_points(targets: np.ndarray, probabilities: np.ndarray) -> tuple[dict[str, float], dict[str, dict]]:
    """The binary operating points (Youden, rule-out, rule-in) on these probabilities: their thresholds, and the
    rates each is expected to give on new cases with their intervals (the model card's ``operating_point_rates``)."""
    points = operating_points(targets, probabilities)

    def plain(v):  # a rate a validation split of one class leaves undefined is null, not NaN (JSON has no NaN)
        if isinstance(v, list):
            return [plain(x) for x in v]
        return None if isinstance(v, float) and math.isnan(v) else v

    rates = {k: {m: plain(v) for m, v in p.items() if m != "threshold"} for k, p in points.items()}
    return {k: v["threshold"] for k, v in points.items()}, rates


def threshold_source(data: RunData, fixed_threshold: float | None) -> str:
    """Where :func:`finalize` takes the operating points from, in this order: the ``validation`` predictions, the
    config's ``fixed`` threshold, or else a feature model's ``inner`` cross-validation (which the fit then has to
    provide). One definition, so that the fit computes the inner predictions exactly when they will be used."""
    if data.val:
        return "validation"
    return "fixed" if fixed_threshold is not None else "inner"


def finalize(
    model: torch.nn.Module,
    data: RunData,
    card: ModelCard,
    rt: Runtime,
    folder: RunFolder,
    *,
    fixed_threshold: float | None,
    inner: tuple[np.ndarray, np.ndarray] | None = None,
) -> FinalModel | None:
    """Score the best weights (already loaded into ``model``) on validation and test, choose the precision and the
    operating points, and write ``predictions_*.csv`` and ``model.pt``.

    Precision: under bf16/fp16 autocast the validation cases are scored in fp32 too; the reduced precision is kept for
    everything that follows (thresholds, stored predictions, and later ``predict``, ``evaluate`` and ``serve``) only
    when the largest difference is below :data:`PRECISION_TOLERANCE`, so that the numbers a run validates are the
    numbers deployment delivers. Operating points (binary): Youden, rule-out (sensitivity >= 0.95) and rule-in
    (specificity >= 0.90) on the validation predictions. Without validation, ``fixed_threshold`` (the config's), or
    else the same points on ``inner``: a feature model's ``(out-of-fold probabilities, targets)`` of its training
    cases from its inner cross-validation. Every rank scores its shard; rank 0 writes and returns the result (None
    elsewhere).
    """
    rt, val, gap = _validation_precision(model, data, card, rt)
    test = None
    if data.test:  # one pass per box the probabilities are averaged over (data.box_average), else one
        scored = [evaluate_loader(model, loader, len(data.test), card, rt) for loader in data.test_loaders]
        test = (average_probabilities([p for p, _ in scored]), scored[0][1]) if rt.is_main else None
    if not rt.is_main:
        return None
    classes = data.classes
    source = threshold_source(data, fixed_threshold)
    chosen = _operating_points(data, source, val, fixed_threshold, inner)
    if source == "validation":
        write_predictions(folder / "predictions_val.csv", data.val, *val, classes, chosen.threshold)
    test_metrics = None
    if test is not None:
        test_metrics = score(*test, classes, chosen.threshold)
        write_predictions(folder / "predictions_test.csv", data.test, *test, classes, chosen.threshold)
    card = card.replace(
        threshold=float(chosen.threshold),
        threshold_method=chosen.method,
        operating_points=chosen.points,
        operating_point_rates=chosen.rates,
        val_auc=float(chosen.val_metrics["auc"]),
        precision=precision_name(rt.amp),
        precision_gap=gap,
    )
    core = unwrap_model(model).to("cpu").to(memory_format=torch.contiguous_format)
    save_model(core, folder.model_file, card)
    return FinalModel(card, to_plain(chosen.val_metrics), to_plain(test_metrics) if test_metrics else None)


def _validation_precision(
    model: torch.nn.Module, data: RunData, card: ModelCard, rt: Runtime
) -> tuple[Runtime, tuple[np.ndarray, np.ndarray] | None, float | None]:
    """Score the validation cases and decide the inference precision (see :func:`finalize`).

    Returns:
        ``(the runtime to score the rest with, its validation (probabilities, targets) or None, the largest
        probability difference to fp32 or None)``.
    """
    val = evaluate_loader(model, data.eval_loader(data.val), len(data.val), card, rt) if data.val else None
    gap = None
    if val is not None and rt.amp is not None:
        fp32 = dataclasses.replace(rt, amp=None)
        val32 = evaluate_loader(model, data.eval_loader(data.val), len(data.val), card, fp32)
        keep = None
        if rt.is_main:
            gap = float(np.abs(val[0] - val32[0]).max())
            keep = gap < PRECISION_TOLERANCE
            log.info(
                "%s vs fp32 on the validation cases: largest probability difference %.4f -> inference in %s",
                rt.precision,
                gap,
                rt.precision if keep else "fp32",
            )
        if not broadcast_object(keep, rt.dist):  # every rank takes the same decision, rank 0's
            rt, val = fp32, val32
    return rt, val, gap


def _operating_points(
    data: RunData,
    source: str,
    val: tuple[np.ndarray, np.ndarray] | None,
    fixed_threshold: float | None,
    inner: tuple[np.ndarray, np.ndarray] | None,
) -> ChosenPoints:
    """The operating points from ``source`` (:func:`threshold_source`): the validation predictions ``val``, the
    fixed threshold, or a feature model's ``inner`` out-of-fold predictions.

    Raises:
        DataError: when none of the three can give a threshold.
    """
    classes = data.classes
    points, rates = {}, {}
    if source == "validation":
        if len(classes) == 2:
            points, rates = chosen_points(val[1], val[0][:, 1])
        threshold = points.get("youden", 0.5)
        return ChosenPoints(threshold, points, rates, score(*val, classes, threshold), "youden (validation)")
    if source == "fixed":
        return ChosenPoints(float(fixed_threshold), points, rates, {"auc": math.nan}, "model.threshold (config)")
    if inner is not None and len(classes) == 2:
        p_inner, y_inner = inner
        points, rates = chosen_points(y_inner, p_inner)
        method = f"youden (inner cross-validation: out-of-fold probabilities of the {len(y_inner)} training cases)"
        return ChosenPoints(points["youden"], points, rates, {"auc": math.nan}, method)
    if len(classes) > 2:  # a three-class model's label is its most probable class: no threshold to choose
        return ChosenPoints(0.5, points, rates, {"auc": math.nan}, "none (three classes: the most probable class)")
    raise DataError(
        None,
        "no validation cases and no threshold: set model.threshold, keep a validation split "
        "(data.val_fraction > 0), or give the inner cross-validation at least two groups per class",
    )
