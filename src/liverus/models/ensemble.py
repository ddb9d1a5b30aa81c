"""An ensemble of classifiers of one architecture (the fold models of a cross-validation), used as one model.

``forward`` returns the log of the members' mean probability (each member's logits divided by its fitted
temperature first), so anything that applies a softmax to a model's output (training's scoring, ``predict``,
``evaluate``, ``serve``, the ONNX graph) gets the averaged, calibrated probability without knowing it is an ensemble.
Grad-CAM looks at every member's target layer (pytorch-grad-cam averages them) and the attention map is the members'
mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from liverus.models.classifier import LesionClassifier

__all__ = ["EnsembleClassifier"]


class EnsembleClassifier(nn.Module):
    """The mean of ``members``' (temperature-scaled) class probabilities.

    Args:
        members: two or more classifiers built alike (same registry name and arguments).
        temperatures: one temperature per member (1 = unchanged); T > 1 softens an over-confident member.

    Raises:
        ValueError: for fewer than two members, members of different architectures, or bad temperatures.
    """

    def __init__(self, members: Sequence[LesionClassifier], temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        names = {(m.model_name, repr(sorted(m.build_kwargs.items()))) for m in members}
        if len(names) != 1:
            raise ValueError(f"ensemble members must share one architecture, got {sorted(n for n, _ in names)}")
        temps = torch.ones(len(members)) if temperatures is None else torch.as_tensor(temperatures, dtype=torch.float32)
        if temps.shape != (len(members),) or not bool((temps > 0).all()):
            raise ValueError(f"need one positive temperature per member, got {temperatures}")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", temps)

    # What consumers read from a single model, answered for the ensemble.
    model_name = property(lambda self: self.members[0].model_name)
    build_kwargs = property(lambda self: self.members[0].build_kwargs)
    weights_info = property(lambda self: self.members[0].weights_info)
    num_classes = property(lambda self: self.members[0].num_classes)
    in_chans = property(lambda self: self.members[0].in_chans)
    normalization = property(lambda self: self.members[0].normalization)
    has_spatial_attention = property(lambda self: self.members[0].has_spatial_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack(
            [torch.softmax(m(x).float() / self.temperature[i], dim=1) for i, m in enumerate(self.members)]
        ).mean(0)
        return torch.log(probs.clamp_min(1e-12))

    def gradcam_layers(self) -> list[nn.Module]:
        """Every member's Grad-CAM layer (their maps are averaged)."""
        return [m.backbone.gradcam_layer() for m in self.members]

    @torch.no_grad()
    def spatial_attention_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' mean spatial-attention map, or None for architectures without one."""
        maps = [m.spatial_attention_map(x) for m in self.members]
        return None if maps[0] is None else torch.stack(maps).mean(0)
