"""A trained ``model.pt`` on PyTorch: the model half of a :class:`~liverus.engine.predictor.Predictor` when it reads
one. Everything that needs the network's weights is here: probabilities in the precision the card validated, an
ensemble's members, a feature model's contributions, occlusion, Grad-CAM and attention maps. Inputs are the uint8
model pixels the predictor prepares; outputs are numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from liverus.engine.attribution import image_channels, malignancy_log_odds, occlusion_maps
from liverus.engine.contributions import Contributions, feature_contributions, has_feature_groups
from liverus.engine.forward import model_input, probabilities
from liverus.engine.heatmaps import attention_heatmap, gradcam_heatmap, has_gradcam_layers
from liverus.engine.runtime import inference_amp
from liverus.models import ModelCard, load_model

__all__ = ["TorchRunner"]


class TorchRunner:
    """A PyTorch model and its card.

    Args:
        model: the network (any liverus model, ensembles included).
        card: its model card.
    """

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, card: ModelCard) -> None:
        self.model = model
        self.card = card
        # The precision the card validated (bf16 only where it moved no validation probability by 0.005).
        self.amp = inference_amp(card.precision, torch.device("cpu"))

    @classmethod
    def load(cls, path: str | Path) -> tuple[TorchRunner, ModelCard]:
        """The ``model.pt`` at ``path`` and its card.

        Raises:
            ValueError: if the file is not a liverus model.
        """
        model, card = load_model(path)
        return cls(model, card), card

    def _input(self, pixels: np.ndarray) -> torch.Tensor:
        return model_input(torch.from_numpy(pixels), self.card)

    def class_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for uint8 model pixels (N, C, S, S)."""
        with torch.inference_mode():
            return probabilities(self.model, torch.from_numpy(pixels), self.card, amp=self.amp).numpy()

    @property
    def has_gradcam(self) -> bool:
        """Whether the model has a convolutional layer for Grad-CAM to look at (not a radiomics-only model)."""
        return has_gradcam_layers(self.model)

    @property
    def has_feature_groups(self) -> bool:
        """Whether the decision splits into lesion-feature groups (a feature model)."""
        return has_feature_groups(self.model)

    @property
    def has_spatial_attention(self) -> bool:
        return bool(getattr(self.model, "has_spatial_attention", False))

    def member_probabilities(self, pixels: np.ndarray) -> np.ndarray | None:
        """Each ensemble member's class probabilities (M, N, classes); None for a single model."""
        if not hasattr(self.model, "member_probabilities"):
            return None
        with torch.inference_mode():
            return self.model.member_probabilities(self._input(pixels)).numpy()

    def contributions(self, pixels: np.ndarray) -> Contributions:
        """Each feature group's Shapley contribution to the log-odds of malignancy, per input
        (:func:`~liverus.engine.contributions.feature_contributions`)."""
        return feature_contributions(self.model, self._input(pixels))

    def occlusion(self, pixels: np.ndarray, *, views: int | None, cells: int) -> np.ndarray:
        """Occlusion maps (:func:`~liverus.engine.attribution.occlusion_maps`) of the first ``views`` views (None:
        every view). Returns: (N, views, S, S) in log-odds of malignancy."""
        per_view = 2 if self.card.require_preprocess().lesion_channel else 1
        self.model.eval()
        scaled = torch.from_numpy(pixels).float() / 255.0
        channels = image_channels(per_view, self.card.views)[:views]
        return occlusion_maps(malignancy_log_odds(self.model, self.card), scaled, channels, cells=cells)

    def heatmaps(self, pixels: np.ndarray, method: str) -> np.ndarray:
        """Grad-CAM for the malignant class (the last), or (``attention``) the model's own spatial-attention map.
        Returns: (N, S, S) in [0, 1]."""
        x = self._input(pixels)
        if method == "attention":
            return attention_heatmap(self.model, x)
        return gradcam_heatmap(self.model, x)
