"""Feature models: lesion radiomics (and frozen ImageNet features of the lesion crop) into a fitted classifier.

A :class:`LesionFeatureModel` is used exactly like the networks (``model.pt`` with its card, ``evaluate``,
``predict``, ``serve``, studies): its input is the preprocessed crop plus the lesion-mask channel (the config's
``data.lesion_channel: true``) and ``forward`` returns two logits. Inside, it computes the
:mod:`~liverus.data.radiomics` features of the lesion, optionally appends the frozen backbone's pooled features
(reduced by a PCA), standardises them and applies a logistic regression or an RBF support-vector machine with Platt
scaling. The classifier is fitted with scikit-learn (``liverus.training.feature_fit``, inside each training fold); its
fitted numbers are then stored here as tensors, so the file loads with ``torch.load(weights_only=True)`` like every
other model instead of as a pickled scikit-learn object.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from liverus import __version__
from liverus.data.radiomics import FEATURE_MEMO, FEATURE_NAMES, RUN_LENGTH_NAMES, feature_matrix
from liverus.models.backbones import Backbone, WeightsInfo, pooled_features
from liverus.utils import DigestMemo

__all__ = [
    "LesionFeatureModel",
    "FEATURE_CLASSIFIERS",
    "FEATURE_MODEL_OPTIONS",
    "DEEP_FEATURE_MEMO",
    "MAX_FEATURE_ROTATION",
    "MAX_FEATURE_ZOOM",
    "REFERENCE_LESIONS",
    "REFERENCE_QUANTILES",
    "feature_store",
    "save_feature_store",
]

FEATURE_CLASSIFIERS = ("logistic", "svm")

# The options of a feature model that a config's model section sets, with :class:`LesionFeatureModel`'s defaults:
# the registry's builders pass them straight through to the model (which checks them) and the trainer takes from
# the config those that differ from these, so a model file records only what was chosen.
FEATURE_MODEL_OPTIONS: dict[str, object] = {
    "pca_dim": 32,
    "flip_features": False,
    "rotate_features": 0.0,
    "zoom_features": 0.0,
    "run_length": False,
    "lesion_size": None,
}

# The largest turn (degrees) and zoom (fraction) the lesion crop's deep features are averaged over
# (rotate_features, zoom_features); the config checks against the same bounds.
MAX_FEATURE_ROTATION = 45.0
MAX_FEATURE_ZOOM = 0.5

# The training lesions a fitted model keeps as the reference its feature contributions are measured against (half of
# each class, so the reference is "a typical lesion", not the training set's class mix), and the quantiles of each
# group's contribution over the training lesions of each class that a contributions chart shows beside a case's.
REFERENCE_LESIONS = 64
REFERENCE_QUANTILES = (0.25, 0.5, 0.75)

# The frozen backbone's pooled features of an image depend only on the image, the weights and the arithmetic
# (device, dtype, autocast), yet a 5-fold x 3-repeat study asks for them 15 times per image (fitting and scoring):
# remembered by digest, at most 16k vectors (~80 MB for EfficientNet-Lite0's 1280 features).
DEEP_FEATURE_MEMO = DigestMemo(max_items=16384)

# Stored features are found again by content, so whatever else decides their numbers names the store's folders: the
# liverus version (radiomics code), torch's (kernels) and this number, raised when the way deep features are computed
# changes (2: channels-last chunks, :func:`~liverus.models.backbones.pooled_features`).
DEEP_FEATURE_VERSION = 2


@contextmanager
def feature_store(cache_directory: str | os.PathLike | None) -> Iterator[None]:
    """Keep the radiomics and frozen deep features computed inside the block in ``cache_directory/features/`` (and
    find those computed before there): ensemble members, folds and repeats of a study, a resumed run and a second
    study with the same cache compute each image's features once. Saved when the block ends, also on an error or an
    interrupt (:func:`save_feature_store` saves earlier); blocks nest, the outer store is attached again after an
    inner one. ``None``: memory only. ``liverus data clear-cache`` removes the store with the decoded images."""
    if cache_directory is None:
        yield
        return
    root = Path(cache_directory) / "features"
    previous = (FEATURE_MEMO.store, DEEP_FEATURE_MEMO.store)
    FEATURE_MEMO.attach(root / f"radiomics-liverus{__version__}")
    DEEP_FEATURE_MEMO.attach(root / f"deep-v{DEEP_FEATURE_VERSION}-liverus{__version__}-torch{torch.__version__}")
    try:
        yield
    finally:
        save_feature_store()
        FEATURE_MEMO.attach(previous[0])
        DEEP_FEATURE_MEMO.attach(previous[1])


def save_feature_store() -> None:
    """Save the features computed since the last save to the attached store (see :func:`feature_store`)."""
    FEATURE_MEMO.save()
    DEEP_FEATURE_MEMO.save()


class LesionFeatureModel(nn.Module):
    """Radiomics (+ frozen deep features) -> standardisation -> logistic regression or RBF SVM.

    Args:
        classifier: ``logistic`` or ``svm``.
        backbone: a frozen backbone whose pooled features join the radiomics, or ``None`` for radiomics only.
        num_classes: must be 2 (benign / malignant).
        in_chans: must be 2: the gray image and the lesion mask.
        pca_dim: deep features are reduced to this many principal components (fitted in the training fold).
        flip_features: the deep features are the mean of those of the crop and of its left-right mirror image (a
            lesion's echo pattern has no left or right; up and down differ in ultrasound, so no vertical mirror).
            Part of the model: fitting and scoring both see the mean.
        rotate_features: degrees; when above 0 the lesion crop's deep features are also averaged over the crop
            rotated by plus and minus this angle (a lesion's texture and margin have no preferred small tilt;
            the probe's does). Corners the rotation uncovers hold the normalisation mean (0). The whole-scan view
            is not rotated (its fan's orientation is the scanner's). Part of the model, as ``flip_features``.
        zoom_features: when above 0, the lesion crop's deep features are also averaged over the crop zoomed by
            ``1 - zoom_features`` and ``1 + zoom_features`` about its centre (how tight a user's box is varies).
            With both, the mean is over five crops (the crop, two rotations, two zooms), each mirror-averaged with
            ``flip_features``; round 14 of docs/results.md measures them.
        run_length: add the grey-level run-length features (:data:`~liverus.data.radiomics.RUN_LENGTH_NAMES`) to
            the default radiomics.
        views: 1, or 2 when the input also holds a second view (the whole scan, ``data.scan_view``): its frozen
            features are standardised and reduced by a PCA of their own (``pca_dim`` more columns). The radiomics
            are always of the first view, the lesion crop.
        lesion_size: when set, the lesion crop (image and mask) is area-resized to this many pixels square inside
            the model, before its radiomics and deep features; the other view keeps the input's size. With
            ``data.image_size: 320`` and ``lesion_size=224`` the whole-scan view gets 320 px of detail while the
            lesion is seen as at 224 px (round 8 of docs/results.md). ``None``: every view at the input's size.
        n_support: number of support vectors (set by fitting; needed to rebuild a fitted SVM from a file).

    Raises:
        ValueError: for an unknown classifier, another class count, input without the mask channel, or a second
            view without a backbone, or a ``lesion_size`` outside [32, 1024], or ``rotate_features`` outside
            [0, 45] or ``zoom_features`` outside [0, 0.5], or either without a backbone.
    """

    def __init__(
        self,
        classifier: str,
        backbone: Backbone | None = None,
        *,
        num_classes: int = 2,
        in_chans: int = 2,
        pca_dim: int = 32,
        flip_features: bool = False,
        rotate_features: float = 0.0,
        zoom_features: float = 0.0,
        run_length: bool = False,
        views: int = 1,
        lesion_size: int | None = None,
        n_support: int = 1,
    ) -> None:
        super().__init__()
        _check_options(classifier, backbone, num_classes, in_chans, pca_dim, n_support, flip_features,
                       rotate_features, zoom_features, views, lesion_size)  # fmt: skip
        self.classifier = classifier
        self.backbone = backbone
        self.lesion_size = lesion_size
        self.flip_features = bool(flip_features)
        self.rotate_features = float(rotate_features)
        self.zoom_features = float(zoom_features)
        self.views = views
        if backbone is not None:
            backbone.requires_grad_(False)
        self.model_name = ""
        self.build_kwargs: dict = {}
        self.run_length = bool(run_length)
        n_rad = len(FEATURE_NAMES) + (len(RUN_LENGTH_NAMES) if run_length else 0)
        width = n_rad + (pca_dim * views if backbone is not None else 0)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("radiomics_mean", torch.zeros(n_rad))
        self.register_buffer("radiomics_scale", torch.ones(n_rad))
        if backbone is not None:
            # The views' features side by side; the PCA is block-diagonal, one block per view, fitted separately.
            dim = backbone.spec.out_channels * views
            self.register_buffer("deep_mean", torch.zeros(dim))
            self.register_buffer("deep_scale", torch.ones(dim))
            self.register_buffer("pca_components", torch.zeros(pca_dim * views, dim))
            self.register_buffer("pca_scale", torch.ones(pca_dim * views))
        if classifier == "logistic":
            self.register_buffer("coef", torch.zeros(width))
        else:
            self.register_buffer("support", torch.zeros(n_support, width))
            self.register_buffer("dual_coef", torch.zeros(n_support))
            self.register_buffer("gamma", torch.ones(()))
            self.register_buffer("platt", torch.tensor([1.0, 0.0]))
        self.register_buffer("intercept", torch.zeros(()))
        # Set by training (liverus.training.feature_fit); a model without them (older files) measures contributions
        # against the all-zero standardised features, as before.
        self.register_buffer("has_reference", torch.zeros((), dtype=torch.bool))
        self.register_buffer("reference_lesions", torch.zeros(REFERENCE_LESIONS, width))
        n_groups = len(self.feature_groups())
        self.register_buffer("group_quantiles", torch.zeros(2, n_groups, len(REFERENCE_QUANTILES)))
        self._norm = (0.5, 0.5) if backbone is None else _gray_stats(backbone)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files written before the reference lesions existed load as models without them (see has_reference).
        for name in ("has_reference", "reference_lesions", "group_quantiles"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # What consumers read from a network, answered for a feature model.
    num_classes = property(lambda self: 2)
    in_chans = property(lambda self: 2)
    has_spatial_attention = property(lambda self: False)
    _mapped_pass_only = False  # set by gradcam_context

    @property
    def normalization(self) -> tuple[float, float]:
        return self._norm

    @property
    def weights_info(self) -> WeightsInfo:
        return self.backbone.weights_info if self.backbone is not None else WeightsInfo("none (no backbone)")

    def gradcam_layers(self) -> list[nn.Module]:
        """The frozen backbone's last stage (Grad-CAM then shows where its features, not the radiomics, looked).

        Raises:
            ValueError: for a radiomics-only model, which has no convolutional layer.
        """
        if self.backbone is None:
            raise ValueError(
                f"{self.model_name or 'this radiomics model'} has no convolutional layers, so it has no Grad-CAM "
                "heatmap; its inputs are the lesion-mask features listed by liverus.data.radiomics.FEATURE_NAMES"
            )
        return [self.backbone.gradcam_layer()]

    @contextmanager
    def gradcam_context(self) -> Iterator[None]:
        """What Grad-CAM runs the model in: only the pass it maps, the lesion crop as given (the backbone's first
        call), keeps its autograd graph; the mirror, the turns and zooms and the other views are computed without
        one. Their values are the same, so are the output and the gradient at the mapped pass, and so the map (a
        test checks it); the backward pass skips eleven of the final recipe's twelve backbone passes (Grad-CAM of
        one AUL image 0.30 s instead of 0.60 s on 2 cores) and their graphs are not kept in memory. Outside this
        context every pass keeps its graph, so other gradient methods (input saliency) see the whole model."""
        previous = self._mapped_pass_only
        self._mapped_pass_only = True
        try:
            yield
        finally:
            self._mapped_pass_only = previous

    def _unmapped_pass(self) -> AbstractContextManager[None]:
        """The autograd mode of a pass Grad-CAM does not map (see :meth:`gradcam_context`)."""
        return torch.no_grad() if self._mapped_pass_only else nullcontext()

    def raw_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unscaled features of normalised input ``x`` (N, 2 * views, H, W).

        Returns:
            ``(radiomics (N, R), pooled deep features (N, D * views) or None)``.

        Raises:
            ValueError: when an image's lesion mask is (nearly) empty.
        """
        lesion = self.lesion_view(x)  # resized once for both feature kinds
        return self._radiomics_of(lesion), self._deep_features_of(lesion, x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 2 * self.views:
            what = "image and lesion mask" + (" of each view" if self.views > 1 else "")
            raise ValueError(f"expected (N, {2 * self.views}, H, W) input ({what}), got {tuple(x.shape)}")

    def lesion_view(self, x: torch.Tensor) -> torch.Tensor:
        """The lesion crop's image and mask (N, 2, S, S) as the features see them: at ``lesion_size`` when set."""
        self._check_input(x)
        view = x[:, :2]
        if self.lesion_size is None or view.shape[-2:] == (self.lesion_size, self.lesion_size):
            return view
        # Area averaging (torch's adaptive average pooling: exact block means for integer ratios, close to the
        # preprocessing's cv2.INTER_AREA otherwise); the mask keeps the pixels more than half inside the lesion.
        resized = F.interpolate(view.float(), size=(self.lesion_size,) * 2, mode="area")
        return torch.stack([resized[:, 0], (resized[:, 1] > 0.5).to(resized.dtype)], dim=1).to(view.dtype)

    def radiomics(self, x: torch.Tensor) -> torch.Tensor:
        """The :mod:`~liverus.data.radiomics` features (N, R) of the lesion crop of normalised input ``x``
        (N, 2 * views, H, W)."""
        return self._radiomics_of(self.lesion_view(x))

    def _radiomics_of(self, lesion: torch.Tensor) -> torch.Tensor:
        mean, std = self._norm
        pixels = ((lesion[:, 0].float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
        masks = (lesion[:, 1].float() > 0.5).cpu().numpy()
        feats = feature_matrix(pixels.cpu().numpy(), masks, run_length=self.run_length)
        return torch.from_numpy(feats).to(lesion.device, torch.float32)

    def deep_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """The frozen backbone's pooled features (N, D * views) of each view's image channel, or None without a
        backbone.

        Without gradients, in eval mode and with no hooks on the backbone (Grad-CAM needs its forward pass), each
        image's features are remembered (:data:`DEEP_FEATURE_MEMO`) and only unseen images go through the backbone.
        """
        if self.backbone is None:
            return None
        return self._deep_features_of(self.lesion_view(x), x)

    def _deep_features_of(self, lesion: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Deep features of the lesion view (from :meth:`lesion_view`) and of the other views of ``x``."""
        if self.backbone is None:
            return None
        # The lesion crop first: Grad-CAM reads the first forward pass it sees.
        parts = [self._view_features(lesion[:, :1], self.lesion_transforms())]
        with self._unmapped_pass():
            parts += [self._view_features(x[:, 2 * v : 2 * v + 1], ()) for v in range(1, self.views)]
        return torch.cat(parts, dim=1)

    def lesion_transforms(self) -> tuple[tuple[float, float], ...]:
        """The ``(angle in degrees, scale)`` pairs, besides the crop itself, whose deep features the lesion crop's
        are averaged with (``rotate_features``, ``zoom_features``)."""
        turns = ((self.rotate_features, 1.0), (-self.rotate_features, 1.0)) if self.rotate_features else ()
        zooms = ((0.0, 1.0 - self.zoom_features), (0.0, 1.0 + self.zoom_features)) if self.zoom_features else ()
        return turns + zooms

    def _view_features(self, image: torch.Tensor, transforms: tuple[tuple[float, float], ...]) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training or has_hooks(self.backbone) or torch.compiler.is_exporting():
            return self._transformed_mean(image, transforms)
        salt = self._arithmetic_salt(image) + (f"|{transforms}".encode() if transforms else b"")
        return remembered_features(image, salt, lambda unseen: self._batched_mean(unseen, transforms))

    def _transformed_mean(self, image: torch.Tensor, transforms: tuple[tuple[float, float], ...]) -> torch.Tensor:
        """Mean pooled features of ``image`` and of its ``transforms``; the untransformed pass first (Grad-CAM)."""
        pooled = self._pooled(image)
        for angle, scale in transforms:
            with self._unmapped_pass():
                other = self._pooled(_turned(image, angle, scale))
            pooled = pooled + other  # outside: the mapped pass's graph goes on
        return pooled / (1 + len(transforms))

    def _batched_mean(self, image: torch.Tensor, transforms: tuple[tuple[float, float], ...]) -> torch.Tensor:
        """:meth:`_transformed_mean` without gradients, faster: every turn, zoom and mirror of every image goes
        through the backbone in one list of inputs (:func:`~liverus.models.backbones.pooled_features`: channels-last,
        in chunks), and the means are taken in the same order."""
        variants = [image] + [_turned(image, angle, scale) for angle, scale in transforms]
        if self.flip_features:
            variants += [v.flip(3) for v in variants]
        pooled = pooled_features(self.backbone, torch.cat(variants)).reshape(len(variants), image.shape[0], -1)
        if self.flip_features:
            pooled = (pooled[: len(variants) // 2] + pooled[len(variants) // 2 :]) / 2
        mean = pooled[0]
        for other in pooled[1:]:
            mean = mean + other
        return mean / (1 + len(transforms))

    def _pooled(self, image: torch.Tensor) -> torch.Tensor:
        if getattr(self.backbone, "_channels_last", False):
            # The weights' layout since pooled_features ran: NCHW input would make every convolution reorder it.
            image = image.contiguous(memory_format=torch.channels_last)
        pooled = self.backbone(image).float().mean(dim=(2, 3))
        if self.flip_features:
            # A second call, not a doubled batch: the unmirrored view is then the backbone's first call, the one
            # Grad-CAM maps, so its map stays in image coordinates. (Batching the passes would also be slower on a
            # CPU: one batch of ten crops 240 ms against ten batches of one 166 ms, 2-core Zen 4.)
            with self._unmapped_pass():
                mirrored = self.backbone(image.flip(3)).float().mean(dim=(2, 3))
            pooled = (pooled + mirrored) / 2
        return pooled

    def _arithmetic_salt(self, image: torch.Tensor) -> bytes:
        return arithmetic_salt(self, image) + f"|flip={self.flip_features}".encode()

    def scaled_features(self, rad: torch.Tensor, deep: torch.Tensor | None) -> torch.Tensor:
        """The classifier's input: standardised radiomics and (standardised, projected) deep features."""
        parts = [(rad - self.radiomics_mean) / self.radiomics_scale]
        if self.backbone is not None and deep is not None:
            d = (deep - self.deep_mean) / self.deep_scale
            parts.append((d @ self.pca_components.T) / self.pca_scale)
        return torch.cat(parts, dim=1)

    def feature_groups(self) -> dict[str, list[int]]:
        """The columns of :meth:`scaled_features` by what they describe: ``shape and margin``, ``echo pattern``
        (first-order intensity), ``texture``, ``halo and posterior acoustics`` and, with a backbone, the deep features
        of each view (``deep: lesion crop``, ``deep: whole scan``)."""
        names = FEATURE_NAMES + (RUN_LENGTH_NAMES if self.run_length else ())
        kinds = {"shape": "shape and margin", "first_order": "echo pattern", "texture": "texture",
                 "ultrasound": "halo and posterior acoustics"}  # fmt: skip
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(next(v for k, v in kinds.items() if name.startswith(k + "_")), []).append(i)
        if self.backbone is not None:
            k = self.pca_components.shape[0] // self.views
            for v, view in enumerate(("lesion crop", "whole scan")[: self.views]):
                groups[f"deep: {view}"] = list(range(len(names) + v * k, len(names) + (v + 1) * k))
        return groups

    def coalition_logits(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Log-odds of malignancy with only some feature groups present: ``keep`` (K, G) says, for each of K
        coalitions, which of :meth:`feature_groups` keep the image's values; the others take those of the reference
        lesions (:meth:`set_reference`), and the probabilities over the reference lesions are averaged (the
        interventional value of the coalition). Returns: (K, N) for normalised input ``x``."""
        rad, deep = self.raw_features(x)
        probs = torch.sigmoid(self.coalition_decisions(rad, deep, keep).double()).mean(-1)
        return torch.logit(probs, eps=1e-12).float()

    @property
    def reference(self) -> torch.Tensor:
        """The scaled features that absent groups take: the reference training lesions (R, F), or, for a model
        without them, one all-zero row (the training mean after standardisation and PCA)."""
        if bool(self.has_reference):
            return self.reference_lesions.float()
        return self.reference_lesions.new_zeros(1, self.reference_lesions.shape[1]).float()

    def coalition_decisions(self, rad: torch.Tensor, deep: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
        """The classifier's logits from raw features (:meth:`raw_features`) for every coalition and every reference
        lesion: ``keep`` (K, G) as in :meth:`coalition_logits`. Returns: (K, N, R)."""
        if not bool(self.fitted):
            raise RuntimeError("this feature model has not been fitted; train it with `liverus train`")
        groups = list(self.feature_groups().values())
        if keep.ndim != 2 or keep.shape[1] != len(groups):
            raise ValueError(f"keep must be (coalitions, {len(groups)}) booleans, got {tuple(keep.shape)}")
        with torch.autocast(rad.device.type, enabled=False):
            z = self.scaled_features(rad.float(), None if deep is None else deep.float())
            return self.mixed_decisions(z, keep)

    def mixed_decisions(self, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`coalition_decisions` from scaled features ``z`` (N, F). Returns: (K, N, R)."""
        groups = list(self.feature_groups().values())
        columns = torch.zeros(keep.shape[0], z.shape[1], dtype=torch.bool, device=z.device)
        for g, cols in enumerate(groups):
            columns[:, cols] = keep[:, g : g + 1].to(z.device)
        ref = self.reference.to(z.device)
        if self.classifier == "svm":
            return self._mixed_rbf_decisions(z, ref, columns)
        mixed = torch.where(columns[:, None, None, :], z[None, :, None, :], ref[None, None, :, :])  # (K, N, R, F)
        return self.decision(mixed.reshape(-1, z.shape[1])).reshape(keep.shape[0], z.shape[0], ref.shape[0])

    def _mixed_rbf_decisions(self, z: torch.Tensor, ref: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """:meth:`mixed_decisions` of the RBF SVM without building the K x N x R mixed rows: a squared distance is a
        sum over columns, so each coalition's kernel splits into a factor of the case's kept columns and one of the
        reference's others, exp(-g(A + B)) = exp(-gA) exp(-gB), and the sum over support vectors is a matrix product.
        The same numbers (to float rounding) as scoring every mixed row; ~40x faster for the recipe's 64 coalitions
        x 64 reference lesions x ~900 support vectors (0.5 s per image before)."""
        keep = columns.to(z.dtype)  # (K, F)
        case = (z[:, None, :] - self.support[None]).pow(2) @ keep.T  # (N, S, K): kept columns' distance
        other = (ref[:, None, :] - self.support[None]).pow(2) @ (1 - keep).T  # (R, S, K)
        kernel_case, kernel_other = torch.exp(-self.gamma * case), torch.exp(-self.gamma * other)
        f = torch.einsum("nsk,s,rsk->knr", kernel_case, self.dual_coef, kernel_other)
        return self.platt[0] * (f + self.intercept) + self.platt[1]

    def contribution_quantiles(self) -> torch.Tensor | None:
        """Each group's contribution quantiles over the training lesions of each class (2, G, Q), or None for a
        model trained before they were kept."""
        return self.group_quantiles.clone() if bool(self.has_reference) else None

    def set_reference(self, lesions: np.ndarray, quantiles: np.ndarray) -> None:
        """Store the reference lesions (:data:`REFERENCE_LESIONS` rows of scaled features) and each group's
        contribution quantiles over the training lesions of each class ((2, G, len(REFERENCE_QUANTILES))).

        Raises:
            ValueError: for shapes that do not fit.
        """
        lesions, quantiles = torch.as_tensor(lesions).float(), torch.as_tensor(quantiles).float()
        if lesions.shape != self.reference_lesions.shape or quantiles.shape != self.group_quantiles.shape:
            raise ValueError(
                f"reference lesions {tuple(lesions.shape)} / quantiles {tuple(quantiles.shape)} do not fit "
                f"{tuple(self.reference_lesions.shape)} / {tuple(self.group_quantiles.shape)}"
            )
        self.reference_lesions.copy_(lesions)
        self.group_quantiles.copy_(quantiles)
        self.has_reference.fill_(True)

    def decision(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's logit of malignancy for scaled features (N, F) -> (N,)."""
        if self.classifier == "logistic":
            return features @ self.coef + self.intercept
        return rbf_svm_decision(features, self.support, self.dual_coef, self.intercept, self.gamma, self.platt)

    def classify(self, rad: torch.Tensor, deep: torch.Tensor | None) -> torch.Tensor:
        """Logits (N, 2) from raw features (what :meth:`forward` does after :meth:`raw_features`)."""
        if not bool(self.fitted):
            raise RuntimeError("this feature model has not been fitted; train it with `liverus train`")
        # The fitted classifier runs in fp32 whatever the caller's autocast: its numbers were fitted in fp32.
        with torch.autocast(rad.device.type, enabled=False):
            z = self.decision(self.scaled_features(rad.float(), None if deep is None else deep.float()))
        return torch.stack([torch.zeros_like(z), z], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("this feature model has not been fitted; train it with `liverus train`")
        return self.classify(*self.raw_features(x))

    def load_fitted(self, params: dict[str, np.ndarray]) -> None:
        """Store fitted parameters (numpy arrays under the buffer names); an SVM's buffers take the fitted size.

        Raises:
            ValueError: for an unknown name or a shape that does not fit.
        """
        store_fitted(self, params, resizable={"support": 0, "dual_coef": 0})
        if self.classifier == "svm":
            self.build_kwargs["n_support"] = int(self.support.shape[0])
        self.fitted.fill_(True)

    def pad_support(self, n: int) -> None:
        """Grow the SVM to ``n`` support vectors with zero weight (the decision is unchanged), so that fold models
        of different sizes can be stored as one ensemble of identically shaped members."""
        if self.classifier != "svm" or n <= self.support.shape[0]:
            return
        extra = n - self.support.shape[0]
        self.support = torch.cat([self.support, self.support.new_zeros(extra, self.support.shape[1])])
        self.dual_coef = torch.cat([self.dual_coef, self.dual_coef.new_zeros(extra)])
        self.build_kwargs["n_support"] = n


def _check_options(
    classifier: str,
    backbone: Backbone | None,
    num_classes: int,
    in_chans: int,
    pca_dim: int,
    n_support: int,
    flip_features: bool,
    rotate_features: float,
    zoom_features: float,
    views: int,
    lesion_size: int | None,
) -> None:
    """:class:`LesionFeatureModel`'s argument checks (its ``Raises``)."""
    if classifier not in FEATURE_CLASSIFIERS:
        raise ValueError(f"classifier must be one of {FEATURE_CLASSIFIERS}, got {classifier!r}")
    if num_classes != 2:
        raise ValueError(f"feature models are binary (benign / malignant); got num_classes={num_classes}")
    if in_chans != 2:
        raise ValueError(
            f"feature models read the lesion mask: they need in_chans=2 (gray image + mask), got {in_chans}; "
            "set data.lesion_channel: true in the config"
        )
    if not 1 <= pca_dim <= 512:
        raise ValueError(f"pca_dim must be in [1, 512], got {pca_dim}")
    if n_support < 1:
        raise ValueError(f"n_support must be at least 1, got {n_support}")
    if flip_features and backbone is None:
        raise ValueError("flip_features averages the backbone's features; a radiomics-only model has none")
    if not 0 <= rotate_features <= MAX_FEATURE_ROTATION:
        raise ValueError(f"rotate_features must be in [0, {MAX_FEATURE_ROTATION:g}] degrees, got {rotate_features}")
    if not 0 <= zoom_features <= MAX_FEATURE_ZOOM:
        raise ValueError(f"zoom_features must be in [0, {MAX_FEATURE_ZOOM:g}], got {zoom_features}")
    if (rotate_features or zoom_features) and backbone is None:
        raise ValueError(
            "rotate_features and zoom_features average the backbone's features; a radiomics-only model has none"
        )
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    if views == 2 and backbone is None:
        raise ValueError(
            "a second view adds the backbone's features of the whole scan; a radiomics-only model has none"
        )
    if lesion_size is not None and not 32 <= lesion_size <= 1024:
        raise ValueError(f"lesion_size must be in [32, 1024] pixels (or None), got {lesion_size}")


def _turned(image: torch.Tensor, angle: float, scale: float) -> torch.Tensor:
    """torchvision's affine (bilinear, about the centre; uncovered pixels are 0, the normalised mean), computed the
    way ``torchvision.transforms.v2.functional.affine`` computes it (a test checks they are equal) but with the
    sampling grid built once per size: the grid is then a constant, which an ONNX export can hold (torchvision's
    own grid building does not export)."""
    grid = _turn_grid(float(angle), float(scale), image.shape[-2], image.shape[-1], image.dtype, image.device)
    return F.grid_sample(image, grid.expand(image.shape[0], -1, -1, -1), mode="bilinear", padding_mode="zeros",
                         align_corners=False)  # fmt: skip


# Sampling grids by (angle, scale, height, width, dtype, device): a plain dict, so that a graph traced for export (after
# one eager call) reads a grid as a constant instead of tracing how it was built.
_TURN_GRIDS: dict[tuple, torch.Tensor] = {}


def _turn_grid(angle: float, scale: float, height: int, width: int, dtype, device) -> torch.Tensor:
    """torchvision's inverse affine matrix and grid (``transforms.v2.functional._geometry``) for a turn by ``angle``
    degrees and a zoom by ``scale`` about the centre, written out here: importing torchvision's transforms costs
    1.3 s, most of a one-image ``liverus predict``'s wall time. A test checks the result equals ``TF.affine``."""
    key = (angle, scale, height, width, dtype, device)
    grid = _TURN_GRIDS.get(key)
    if grid is None:
        rot = math.radians(angle)
        a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
        matrix = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
        with torch.inference_mode(False):  # a grid made in inference mode could not be saved for Grad-CAM's backward
            theta = torch.tensor(matrix, dtype=dtype, device=device).reshape(1, 2, 3)
            base = torch.empty(1, height, width, 3, dtype=dtype, device=device)
            base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
            ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)
            base[..., 1].copy_(ys.unsqueeze_(-1))
            base[..., 2].fill_(1)
            rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device))
            grid = _TURN_GRIDS[key] = base.view(1, height * width, 3).bmm(rescaled).view(1, height, width, 2)
    return grid


def rbf_svm_decision(
    z: torch.Tensor,
    support: torch.Tensor,
    dual_coef: torch.Tensor,
    intercept: torch.Tensor,
    gamma: torch.Tensor,
    platt: torch.Tensor,
) -> torch.Tensor:
    """A fitted RBF SVM's Platt-scaled decision value (N,) for inputs ``z`` (N, F): scikit-learn's decision function
    (``support`` vectors, ``dual_coef``, ``intercept``, ``gamma``) through the affine part of its Platt sigmoid
    (``platt``: slope, offset), so that its sigmoid is the probability."""
    if torch.compiler.is_exporting():  # cdist has no ONNX form; the expansion cdist itself uses for large inputs
        sq = z.pow(2).sum(1, keepdim=True) + support.pow(2).sum(1) - 2 * z @ support.T
        dist = sq.clamp_min(0)
    else:
        dist = torch.cdist(z, support).pow(2)
    f = torch.exp(-gamma * dist) @ dual_coef + intercept
    return platt[0] * f + platt[1]


def store_fitted(model: nn.Module, params: dict[str, np.ndarray], *, resizable: dict[str, int]) -> None:
    """Store fitted parameters (numpy arrays under ``model``'s buffer names) in their buffers' dtype and device; the
    buffers named in ``resizable`` take the fitted size along the axis given (an SVM's number of support vectors).

    Raises:
        ValueError: for a name that is not a fitted buffer, or a shape that does not fit.
    """
    for name, value in params.items():
        current = getattr(model, name, None)
        if not isinstance(current, torch.Tensor) or name == "fitted":
            raise ValueError(f"{name!r} is not a fitted parameter of {type(model).__name__}")
        tensor = torch.as_tensor(np.asarray(value), dtype=current.dtype)
        free = resizable.get(name)
        fits = tensor.ndim == current.ndim and all(
            a == b or axis == free for axis, (a, b) in enumerate(zip(tensor.shape, current.shape, strict=True))
        )
        if not fits:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(current.shape)}")
        setattr(model, name, tensor.to(current.device))


def remembered_features(
    images: torch.Tensor, salt: bytes, compute: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``compute(images)`` (one feature row per image) through :data:`DEEP_FEATURE_MEMO`: each image is looked up by
    its bytes and ``salt`` (what else its features depend on, :func:`arithmetic_salt`), and only the unseen images go
    to ``compute``, each once however often it appears (a case's averaged boxes share one whole-scan view)."""
    rows = images.detach().cpu().contiguous().reshape(images.shape[0], -1).view(torch.uint8).numpy()
    keys = [DEEP_FEATURE_MEMO.key(row, salt=salt) for row in rows]
    found = [DEEP_FEATURE_MEMO.get(k) for k in keys]
    first_of: dict[bytes, int] = {}
    for i, (key, value) in enumerate(zip(keys, found, strict=True)):
        if value is None:
            first_of.setdefault(key, i)
    missing = list(first_of.values())
    if missing:
        values = compute(images[missing]).cpu().numpy()
        computed = dict(zip([keys[i] for i in missing], values, strict=True))
        for key, value in computed.items():
            DEEP_FEATURE_MEMO.put(key, value)
        found = [f if f is not None else computed[k] for f, k in zip(found, keys, strict=True)]
    return torch.from_numpy(np.stack(found)).to(images.device)


def arithmetic_salt(model: nn.Module, image: torch.Tensor) -> bytes:
    """What a frozen backbone's features of ``image`` depend on besides its pixels (the memo's salt): the weights of
    ``model.backbone`` (a digest, kept on ``model`` and recomputed only when a tensor changed in place, e.g. by
    ``load_state_dict``), the device, the input dtype and autocast."""
    tensors = list(model.backbone.state_dict(keep_vars=True).values())
    versions = tuple((t.data_ptr(), t._version) for t in tensors)
    if getattr(model, "_weights_versions", None) != versions:
        arrays = [t.detach().float().cpu().numpy() for t in tensors]
        model._weights_digest = DigestMemo.key(*arrays)
        model._weights_versions = versions
    device = image.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return model._weights_digest + f"{image.device}|{image.dtype}|{autocast}".encode()


def has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


def _gray_stats(backbone: Backbone) -> tuple[float, float]:
    spec = backbone.spec
    return float(sum(spec.mean) / 3), float(sum(spec.std) / 3)
