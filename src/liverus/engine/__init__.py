"""The engine: what every consumer of a model shares, below training, evaluation and the applications.

* :mod:`~liverus.engine.runtime`: device, autocast dtype and memory format from ``auto`` settings;
* :mod:`~liverus.engine.forward`: pixels -> normalised input -> probabilities, over a batch or a loader;
* :mod:`~liverus.engine.predictions`: the per-case predictions CSV (writer and reader);
* :mod:`~liverus.engine.heatmaps`: Grad-CAM, attention maps and overlays;
* :mod:`~liverus.engine.contributions`: a feature model's decision split between its feature groups (Shapley);
* :mod:`~liverus.engine.predictor`: :class:`Predictor`, a loaded model (or ONNX export) with its card.
"""

from liverus.engine.forward import (
    eval_batch_size,
    merge_shards,
    model_input,
    normalize_images,
    predict_probs,
    probabilities,
)
from liverus.engine.predictions import Predictions, read_predictions, write_predictions
from liverus.engine.runtime import (
    cpu_bf16_supported,
    precision_name,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)

__all__ = [
    "Predictions",
    "cpu_bf16_supported",
    "eval_batch_size",
    "merge_shards",
    "model_input",
    "normalize_images",
    "precision_name",
    "predict_probs",
    "probabilities",
    "read_predictions",
    "resolve_channels_last",
    "resolve_device",
    "resolve_precision",
    "write_predictions",
]
