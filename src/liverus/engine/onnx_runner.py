"""An ONNX export (``liverus export``) on ONNX Runtime: the model half of a
:class:`~liverus.engine.predictor.Predictor` when it reads an ``.onnx`` file.

Nothing here imports PyTorch: with preprocessing (OpenCV, numpy) and, for a feature model, the radiomics of the lesion
crop (numpy, scikit-image, computed beside the graph with the same code as training), it is what an install without
PyTorch deploys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from liverus.data.radiomics import feature_matrix
from liverus.models.card import ModelCard

__all__ = ["OnnxRunner", "ONNX_METADATA_KEY"]

# The metadata entry of an export that holds its model card (and, for a feature model, its radiomics settings).
ONNX_METADATA_KEY = "liverus"


class OnnxRunner:
    """Class probabilities from an ONNX Runtime session.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the graph (input ``image``, and ``radiomics`` for a feature
            model; output ``probabilities``).
        radiomics: the metadata's ``radiomics`` entry of an exported feature model (its radiomics are computed here,
            outside the graph); None for a CNN.
    """

    backend = "onnxruntime"

    def __init__(self, session: Any, radiomics: dict | None = None) -> None:
        self.session = session
        self.radiomics = radiomics

    @classmethod
    def load(cls, path: str | Path) -> tuple[OnnxRunner, ModelCard]:
        """The export at ``path`` on ONNX Runtime's CPU provider, and the model card it carries.

        Raises:
            ValueError: if the file is missing, ONNX Runtime cannot load it, or it carries no liverus metadata.
        """
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"ONNX file {path} does not exist")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ValueError(f"{path} could not be loaded by ONNX Runtime: {exc}") from exc
        props = session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in props:
            raise ValueError(f"{path} has no liverus metadata; export it with `liverus export`")
        meta = json.loads(props[ONNX_METADATA_KEY])
        return cls(session, meta.get("radiomics")), ModelCard.from_dict(meta, source=path)

    def class_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for uint8 model pixels (N, C, S, S)."""
        return self.session.run(["probabilities"], self.session_inputs(pixels))[0]

    def session_inputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """An ONNX export's inputs for uint8 model pixels: the image in [0, 1], and for an exported feature model the
        radiomics of the lesion crop (its gray pixels and mask, channels 0 and 1), which the graph does not hold."""
        inputs = {"image": pixels.astype(np.float32) / 255.0}
        if self.radiomics is not None:
            rad = feature_matrix(pixels[:, 0], pixels[:, 1] > 127, run_length=bool(self.radiomics["run_length"]))
            inputs["radiomics"] = rad.astype(np.float32)
        return inputs
