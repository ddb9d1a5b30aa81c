"""The engine: what every consumer of a model shares, below training, evaluation and the applications.

* :mod:`~liverus.engine.runtime`: device, autocast dtype and memory format from ``auto`` settings;
* :mod:`~liverus.engine.forward`: pixels -> normalised input -> probabilities, over a batch or a loader;
* :mod:`~liverus.engine.averaging`: one case's probabilities from several inputs of it (numpy only);
* :mod:`~liverus.engine.predictions`: the per-case predictions CSV (writer and reader);
* :mod:`~liverus.engine.heatmaps`: Grad-CAM, attention maps and overlays;
* :mod:`~liverus.engine.contributions`: a feature model's decision split between its feature groups (Shapley);
* :mod:`~liverus.engine.predictor`: :class:`Predictor`, a loaded model (or ONNX export) with its card, which runs
  it through :mod:`~liverus.engine.torch_runner` (``model.pt``) or :mod:`~liverus.engine.onnx_runner` (an ONNX
  export; no PyTorch imported).
"""

from liverus.utils import lazy_exports

# Loaded when first used (see lazy_exports): a command imports only the submodules it needs.
_EXPORTS = {
    "forward": (
        "eval_batch_size",
        "merge_shards",
        "model_input",
        "normalize_images",
        "predict_probs",
        "probabilities",
    ),
    "predictions": (
        "Predictions",
        "read_predictions",
        "write_predictions",
    ),
    "runtime": (
        "cpu_bf16_supported",
        "precision_name",
        "resolve_channels_last",
        "resolve_device",
        "resolve_precision",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
