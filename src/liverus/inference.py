"""One predictor for ``predict``, ``serve`` and ``explain``: a trained model (``model.pt``) or its ONNX export, with the
preprocessing and threshold stored beside the weights, so deployment applies exactly what training validated."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from liverus.data.preprocess import PreprocessConfig, Preprocessed, preprocess

__all__ = ["Predictor", "Prediction"]


@dataclass
class Prediction:
    probability: float  # of malignancy
    label: str
    threshold: float
    preprocessed: Preprocessed


class Predictor:
    """Loads a model once and predicts the probability of malignancy for gray images.

    Use :meth:`from_path` with a ``model.pt`` written by the trainer or an ``.onnx`` file written by
    ``liverus export``. Calls are serialised with a lock, so one predictor can serve concurrent requests.
    """

    def __init__(self, *, model=None, session=None, meta: dict) -> None:
        self.model = model
        self.session = session
        self.meta = meta
        self.preprocess_cfg = PreprocessConfig(**meta["preprocess"])
        self.threshold = float(meta.get("threshold", 0.5))
        self.classes = tuple(meta.get("classes", ("benign", "malignant")))
        self.mean, self.std = meta.get("normalization", (0.449, 0.226))
        self.name = meta.get("model_name", "model")
        self.version = meta.get("version", "")
        self._lock = threading.Lock()
        if len(self.classes) != 2:
            raise ValueError("prediction supports binary (benign / malignant) models")

    @classmethod
    def from_path(cls, path: str | Path) -> Predictor:
        """Load ``model.pt`` or an exported ``.onnx``.

        Raises:
            ValueError: if the file is not a liverus model or ONNX export.
        """
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            import onnxruntime as ort

            if not path.is_file():
                raise ValueError(f"ONNX file {path} does not exist")
            try:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise ValueError(f"{path} could not be loaded by ONNX Runtime: {exc}") from exc
            props = session.get_modelmeta().custom_metadata_map
            if "liverus" not in props:
                raise ValueError(f"{path} has no liverus metadata; export it with `liverus export`")
            return cls(session=session, meta=json.loads(props["liverus"]))
        from liverus.models import load_model

        model, extra = load_model(path)
        if "preprocess" not in extra:
            raise ValueError(f"{path} holds no preprocessing settings; use the model.pt of a training run")
        return cls(model=model, meta={**extra, "model_name": model.model_name})

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.session is not None else "pytorch"

    def prepare(
        self, image: np.ndarray, *, lesion: np.ndarray | None = None, box: tuple[float, ...] | None = None
    ) -> Preprocessed:
        """Preprocess a gray float image as the model was trained (raises ValueError for ROI models without a box)."""
        return preprocess(image, self.preprocess_cfg, lesion=lesion, box=box)

    def _batch(self, pre: list[Preprocessed]) -> np.ndarray:
        return np.stack([p.image for p in pre])[:, None].astype(np.float32) / 255.0

    def probabilities(self, pre: list[Preprocessed]) -> np.ndarray:
        """Returns: malignancy probabilities for preprocessed images."""
        x = self._batch(pre)
        with self._lock:
            if self.session is not None:
                return self.session.run(["probabilities"], {"image": x})[0][:, 1]
            t = (torch.from_numpy(x) - self.mean) / self.std
            if self.model.in_chans == 3:
                t = t.expand(-1, 3, -1, -1)
            with torch.no_grad():
                return torch.softmax(self.model(t).float(), 1)[:, 1].numpy()

    def predict(self, images: list[np.ndarray], *, lesions=None, boxes=None) -> list[Prediction]:
        pre = [
            self.prepare(img, lesion=(lesions or [None] * len(images))[i], box=(boxes or [None] * len(images))[i])
            for i, img in enumerate(images)
        ]
        probs = self.probabilities(pre)
        return [
            Prediction(float(p), self.classes[int(p >= self.threshold)], self.threshold, pp)
            for p, pp in zip(probs, pre, strict=True)
        ]

    def heatmap(self, pre: Preprocessed, method: str = "gradcam") -> np.ndarray:
        """A [0, 1] heatmap (S, S) on the preprocessed image: Grad-CAM for the malignant class, or the model's own
        spatial-attention map. PyTorch models only.

        Raises:
            ValueError: for ONNX models, or ``attention`` on a model without spatial attention.
        """
        if self.model is None:
            raise ValueError("heatmaps need the PyTorch model (model.pt), not the ONNX export")
        from liverus.explain import attention_heatmap, gradcam_heatmap

        x = self._batch([pre])
        t = (torch.from_numpy(x) - self.mean) / self.std
        with self._lock:
            if method == "attention":
                return attention_heatmap(self.model, t)[0]
            return gradcam_heatmap(self.model, t)[0]
