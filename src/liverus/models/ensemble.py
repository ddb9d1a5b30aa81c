"""An ensemble of classifiers of one architecture (the fold models of a cross-validation), used as one model.

``forward`` returns the log of the members' mean probability (each member's logits divided by its fitted
temperature first), so anything that applies a softmax to a model's output (training's scoring, ``predict``,
``evaluate``, ``serve``, the ONNX graph) gets the averaged, calibrated probability without knowing it is an ensemble.
Grad-CAM looks at every member's target layer (pytorch-grad-cam averages them) and the attention map is the members'
mean.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from liverus.models.classifier import LesionClassifier
from liverus.models.features import LesionFeatureModel

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
    views = property(lambda self: getattr(self.members[0], "views", 1))
    normalization = property(lambda self: self.members[0].normalization)
    has_spatial_attention = property(lambda self: self.members[0].has_spatial_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack(
            [torch.softmax(logits.float() / self.temperature[i], dim=1) for i, logits in enumerate(self._logits(x))]
        ).mean(0)
        return torch.log(probs.clamp_min(1e-12))

    @torch.no_grad()
    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's (temperature-scaled) class probabilities: (members, N, classes)."""
        return torch.stack(
            [torch.softmax(logits.float() / self.temperature[i], dim=1) for i, logits in enumerate(self._logits(x))]
        )

    def _logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's logits. Feature-model members share their inputs: the lesion radiomics are the same for all
        of them, and so are the deep features when their frozen backbones hold the same weights (the ImageNet ones),
        so those are computed once rather than once per member."""
        if not self._feature_members():
            return [m(x) for m in self.members]
        return [m.classify(*features) for m, features in zip(self.members, self._member_features(x), strict=True)]

    def _member_features(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each feature member's raw features: the first member's radiomics for all, and its deep features for all
        members whose backbones share its weights."""
        rad, deep = self.members[0].raw_features(x)
        shared = self._shared_backbone()
        return [(rad, deep if shared or i == 0 else m.deep_features(x)) for i, m in enumerate(self.members)]

    def feature_groups(self) -> dict[str, list[int]]:
        """The feature members' :meth:`LesionFeatureModel.feature_groups` (members are built alike).

        Raises:
            ValueError: for members that are not feature models.
        """
        if not self._feature_members():
            raise ValueError("feature groups exist for ensembles of feature models (radiomics_*) only")
        return self.members[0].feature_groups()

    def coalition_logits(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The ensemble's log-odds of malignancy with only the ``keep`` (K, G) feature groups present in every member
        (see :meth:`LesionFeatureModel.coalition_logits`; each member's absent groups take its own reference
        lesions' values): the log-odds of the probability averaged over members and reference lesions.
        Returns: (K, N)."""
        self.feature_groups()  # feature members only
        probs = torch.stack(
            [
                torch.sigmoid(m.coalition_decisions(*features, keep).double() / self.temperature[i]).mean(-1)
                for i, (m, features) in enumerate(zip(self.members, self._member_features(x), strict=True))
            ]
        ).mean(0)
        return torch.logit(probs, eps=1e-12).float()

    def contribution_quantiles(self) -> torch.Tensor | None:
        """Each group's contribution quantiles over the training lesions of each class (2, G, Q): the members' mean,
        each divided by its temperature as its log-odds are (:meth:`LesionFeatureModel.set_reference`), or None
        when a member has none (older files)."""
        if not all(bool(m.has_reference) for m in self.members):
            return None
        return torch.stack([m.group_quantiles / self.temperature[i] for i, m in enumerate(self.members)]).mean(0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._shared = None  # new weights: check the backbones again
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _feature_members(self) -> bool:
        return all(isinstance(m, LesionFeatureModel) for m in self.members)

    def _shared_backbone(self) -> bool:
        """Whether every feature member's frozen backbone equals the first's (checked once, after the weights are
        loaded: frozen backbones do not change afterwards)."""
        if getattr(self, "_shared", None) is None:
            first = self.members[0].backbone
            self._shared = (
                first is None
                or all(
                    all(
                        torch.equal(a, b)
                        for a, b in zip(first.state_dict().values(), m.backbone.state_dict().values(), strict=True)
                    )  # fmt: skip
                    for m in self.members[1:]
                )
            )
        return self._shared

    def gradcam_layers(self) -> list[nn.Module]:
        """Every member's Grad-CAM layer (their maps are averaged); the one shared backbone's for feature members
        whose frozen backbones are the same.

        Raises:
            ValueError: for members without a convolutional layer (radiomics only).
        """
        if self._feature_members():
            if self.members[0].backbone is None:
                return self.members[0].gradcam_layers()  # raises, saying why
            if self._shared_backbone():
                return self.members[0].gradcam_layers()
        return [m.backbone.gradcam_layer() for m in self.members]

    @contextmanager
    def gradcam_context(self) -> Iterator[None]:
        """Every member's :meth:`~LesionClassifier.gradcam_context` at once."""
        with ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.gradcam_context())
            yield

    @torch.no_grad()
    def spatial_attention_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' mean spatial-attention map, or None for architectures without one."""
        maps = [m.spatial_attention_map(x) for m in self.members]
        return None if maps[0] is None else torch.stack(maps).mean(0)
