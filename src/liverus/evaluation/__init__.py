"""Evaluation: clinical metrics with intervals, paired comparison, calibration, plots and reports."""

from liverus.utils import lazy_exports

# Loaded when first used (see lazy_exports): a command imports only the submodules it needs.
_EXPORTS = {
    "metrics": (
        "EvaluationError",
        "binary_metrics",
        "bootstrap_ci",
        "choose_threshold",
        "multiclass_metrics",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "EvaluationError",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "multiclass_metrics",
]
