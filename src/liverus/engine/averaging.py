"""One case's probabilities from several inputs of it (the boxes of ``box_average``, an ensemble's test passes).

NumPy only: the ONNX predictor, which runs without PyTorch, averages a case's boxes with the same function as
training and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["average_probabilities"]


def average_probabilities(probs: Sequence[np.ndarray]) -> np.ndarray:
    """One case's probabilities from several inputs of it (the boxes of ``box_average``): the softmax of the mean
    log-probability, which for two classes is the mean log-odds. Averaging log-odds rather than probabilities keeps
    a feature model's contributions exact (they are additive in log-odds).

    Args:
        probs: K arrays (N, C) of the same N cases.

    Returns:
        (N, C) float32; ``probs[0]`` itself when K is 1.
    """
    if len(probs) == 1:
        return probs[0]
    log_p = np.log(np.clip(np.stack(probs).astype(np.float64), 1e-12, None)).mean(0)
    log_p -= log_p.max(1, keepdims=True)
    p = np.exp(log_p)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)
