"""ONNX export (liverus.export) and the predictor on it."""

from __future__ import annotations

import numpy as np
import pytest

from liverus.data import read_image
from liverus.engine.predictor import Predictor


def test_onnx_matches_pytorch_and_carries_metadata(run, images, onnx_file):
    pt = Predictor.from_path(run / "model.pt")
    ox = Predictor.from_path(onnx_file)
    assert ox.backend == "onnxruntime" and ox.threshold == pt.threshold and ox.preprocess_cfg == pt.preprocess_cfg
    assert ox.card == pt.card  # the whole model card travels in the ONNX metadata
    pre = [pt.prepare(read_image(f)) for f in images]
    assert np.abs(pt.probabilities(pre) - ox.probabilities(pre)).max() < 1e-4
    from liverus.export import export_onnx

    with pytest.raises(ValueError, match="already exists"):
        export_onnx(run / "model.pt", onnx_file)
