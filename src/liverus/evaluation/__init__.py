"""Evaluation: clinical metrics with intervals, paired comparison, calibration, plots and reports."""

from liverus.evaluation.metrics import (
    EvaluationError,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    multiclass_metrics,
)

__all__ = ["EvaluationError", "binary_metrics", "bootstrap_ci", "choose_threshold", "multiclass_metrics"]
