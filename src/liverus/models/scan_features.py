"""A whole-scan frozen-feature model: class probabilities from the image alone, no lesion input.

This is the three-class recipe (normal / benign / malignant, AUL's public benchmark task, where a model is given the
image only). The frozen ImageNet backbone's last feature map of the whole scan is max-pooled (a lesion is a local
finding: the largest response anywhere keeps it, where the average dilutes it over the liver) and averaged with
that of the mirrored scan; the features are standardised and reduced by a PCA, and one RBF SVM per class, against
the others, gives a decision value that its own Platt scaling turns into a probability; the class probabilities are
these normalised to sum to 1.

Everything fitted (:func:`liverus.training.scan_fit.fit_scan_feature_model`) is a buffer, so the model is a plain
``nn.Module``: it is saved and loaded (``weights_only``), scored, mapped by Grad-CAM through the backbone and
exported to ONNX like a network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from liverus.models.backbones import POOLINGS, Backbone, WeightsInfo, global_pool, pooled_features
from liverus.models.features import (
    arithmetic_salt,
    has_hooks,
    rbf_svm_decision,
    remembered_features,
    store_fitted,
)

__all__ = ["ScanFeatureModel"]


class ScanFeatureModel(nn.Module):
    """Frozen backbone features of the whole scan -> one-vs-rest RBF SVMs with Platt scaling -> class probabilities.

    Args:
        backbone: the frozen feature extractor (its weights are never trained).
        num_classes: at least 2.
        in_chans: 1 (the gray scan; the model takes no lesion channel).
        pca_dim: principal components kept of the standardised features.
        pooling: ``max`` or ``mean`` over the backbone's last feature map.
        n_support: support vectors per class (set by fitting; needed to rebuild a fitted model from a file).

    Raises:
        ValueError: for fewer than 2 classes, a lesion channel, a ``pca_dim`` below 1 or above the backbone's width,
            or an unknown pooling.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int = 3,
        in_chans: int = 1,
        pca_dim: int = 128,
        pooling: str = "max",
        n_support: int = 1,
    ) -> None:
        super().__init__()
        width = backbone.spec.out_channels
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if in_chans != 1:
            raise ValueError(
                f"a whole-scan feature model takes the gray scan alone (in_chans=1), got in_chans={in_chans}; set "
                "data.lesion_channel: false"
            )
        if not 1 <= pca_dim <= width:
            raise ValueError(f"pca_dim must be in [1, {width}] for {backbone.spec.name}, got {pca_dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if n_support < 1:
            raise ValueError(f"n_support must be at least 1, got {n_support}")
        self.backbone = backbone.requires_grad_(False)
        self.pooling = pooling
        self._num_classes = num_classes
        self.model_name = ""
        self.build_kwargs: dict = {}
        spec = backbone.spec
        self._norm = (float(sum(spec.mean) / 3), float(sum(spec.std) / 3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_scale", torch.ones(width))
        self.register_buffer("pca_mean", torch.zeros(width))
        self.register_buffer("pca_components", torch.zeros(pca_dim, width))
        # One SVM per class; each keeps n_support rows (fewer real ones are padded with zero weight).
        self.register_buffer("support", torch.zeros(num_classes, n_support, pca_dim))
        self.register_buffer("dual_coef", torch.zeros(num_classes, n_support))
        self.register_buffer("intercept", torch.zeros(num_classes))
        self.register_buffer("gamma", torch.ones(num_classes))
        self.register_buffer("platt", torch.tensor([[1.0, 0.0]] * num_classes))

    # What consumers read from a network, answered for this model.
    num_classes = property(lambda self: self._num_classes)
    in_chans = property(lambda self: 1)
    views = 1
    has_spatial_attention = property(lambda self: False)

    @property
    def normalization(self) -> tuple[float, float]:
        return self._norm

    @property
    def weights_info(self) -> WeightsInfo:
        return self.backbone.weights_info

    def gradcam_layers(self) -> list[nn.Module]:
        """The backbone's last stage: Grad-CAM shows where the features the SVMs read came from."""
        return [self.backbone.gradcam_layer()]

    def train(self, mode: bool = True) -> ScanFeatureModel:
        # Nothing here is trained by gradient: the frozen backbone's batch norms keep their ImageNet statistics.
        return super().train(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of normalised scans ``x`` (N, 1, H, W), averaged with their mirror's.

        Without gradients and hooks, each scan's features are remembered by content
        (:data:`~liverus.models.features.DEEP_FEATURE_MEMO`, and the run's feature store): a study's folds and
        repeats compute each scan once.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected normalised gray scans (N, 1, H, W), got {tuple(x.shape)}")
        if torch.is_grad_enabled() or has_hooks(self.backbone) or torch.compiler.is_exporting():
            fmap = self.backbone(x).float()
            return (global_pool(fmap, self.pooling) + global_pool(self.backbone(x.flip(3)).float(), self.pooling)) / 2
        salt = arithmetic_salt(self, x) + f"|scan|pool={self.pooling}|flip".encode()
        return remembered_features(x, salt, self._mirror_pooled)

    def _mirror_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` without gradients: the scans and their mirrors through the backbone in one list."""
        pooled = pooled_features(self.backbone, torch.cat([x, x.flip(3)]), pool=self.pooling)
        return (pooled[: len(x)] + pooled[len(x) :]) / 2

    def scaled(self, features: torch.Tensor) -> torch.Tensor:
        """The SVMs' input: standardised features projected on the principal components (N, pca_dim)."""
        z = (features - self.feature_mean) / self.feature_scale
        return (z - self.pca_mean) @ self.pca_components.T

    def decisions(self, z: torch.Tensor) -> torch.Tensor:
        """Each class's Platt-scaled decision value (N, K) (its log-odds against the other classes)."""
        return torch.stack(
            [
                rbf_svm_decision(z, self.support[k], self.dual_coef[k], self.intercept[k], self.gamma[k], self.platt[k])
                for k in range(self._num_classes)
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) whose softmax is the normalised one-vs-rest probabilities."""
        # (Exporting cannot branch on a buffer's value; export reads a fitted model from its file.)
        if not torch.compiler.is_exporting() and not bool(self.fitted):
            raise RuntimeError("this scan feature model has not been fitted; train it with `liverus train`")
        features = self.features(x)
        # The fitted parts run in fp32 whatever the caller's autocast: their numbers were fitted in fp32.
        with torch.autocast(x.device.type, enabled=False):
            one_vs_rest = torch.sigmoid(self.decisions(self.scaled(features.float())))
            return torch.log(one_vs_rest.clamp_min(1e-12))

    def load_fitted(self, params: dict[str, np.ndarray]) -> None:
        """Store fitted parameters (numpy arrays under the buffer names); ``support`` and ``dual_coef`` take the
        fitted number of support vectors.

        Raises:
            ValueError: for an unknown name or a shape that does not fit.
        """
        store_fitted(self, params, resizable={"support": 1, "dual_coef": 1})  # per class: its support vectors
        self.build_kwargs["n_support"] = int(self.support.shape[1])
        self.fitted.fill_(True)

    def pad_support(self, n: int) -> None:
        """Grow every class's SVM to ``n`` support vectors with zero weight (the decisions are unchanged), so that
        fold models of different sizes can be stored as one ensemble of identically shaped members."""
        extra = n - self.support.shape[1]
        if extra <= 0:
            return
        self.support = torch.cat(
            [self.support, self.support.new_zeros(self._num_classes, extra, self.support.shape[2])], 1
        )
        self.dual_coef = torch.cat([self.dual_coef, self.dual_coef.new_zeros(self._num_classes, extra)], 1)
        self.build_kwargs["n_support"] = n
