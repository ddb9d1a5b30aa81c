"""Fitting a :class:`~liverus.models.ScanFeatureModel` on a run's training cases (instead of the epoch loop).

As for the lesion feature models (:mod:`liverus.training.feature_fit`), everything fitted sees the training part
only: the standardisation, the PCA, and per class an RBF SVM against the other classes whose C is chosen by a
group-aware inner cross-validation and whose Platt scaling is fitted on that inner cross-validation's decision
values. Each one-vs-rest problem weighs its two sides equally (a class of 80 normal scans against 501 with a lesion
would otherwise be answered "not normal" almost always).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.utils.class_weight import compute_sample_weight

from liverus.data import Case, CaseCache
from liverus.models import ModelCard, ScanFeatureModel
from liverus.training.feature_fit import column_scale, fit_classifier, model_batches
from liverus.utils import STAGES

__all__ = ["fit_scan_feature_model", "extract_scan_features"]

log = logging.getLogger("liverus.training")


@torch.inference_mode()
def extract_scan_features(
    model: ScanFeatureModel, cases: list[Case], classes: tuple[str, ...], cache: CaseCache, card: ModelCard
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled whole-scan features (n, D) of ``cases`` (unaugmented) and their targets (n,)."""
    features, targets = [], []
    for x, y in model_batches(model, cases, classes, cache, card):
        features.append(model.features(x).cpu().numpy())
        targets.append(y)
    return np.concatenate(features), np.concatenate(targets)


@STAGES.timed("training steps")
def fit_scan_feature_model(
    model: ScanFeatureModel,
    cases: list[Case],
    classes: tuple[str, ...],
    cache: CaseCache,
    card: ModelCard,
    *,
    seed: int = 0,
) -> dict:
    """Fit ``model`` on the training ``cases``.

    Returns:
        What to record (``feature_fit.json``): per class the chosen C, the inner cross-validation's AUC and the
        number of support vectors.

    Raises:
        ValueError: when a class has no training case.
    """
    x, y = extract_scan_features(model, cases, classes, cache, card)
    missing = [name for k, name in enumerate(classes) if not (y == k).any()]
    if missing:
        raise ValueError(f"no training case of class {', '.join(missing)}: every class needs examples to fit on")
    groups = [c.group_key or c.path for c in cases]
    mean, scale = column_scale(x)
    z = (x - mean) / scale
    pca_dim, width = model.pca_components.shape
    # A small training set has fewer components than asked for; the rest stay zero (constant, so they change no
    # distance and no decision).
    n_components = min(pca_dim, len(z) - 1, width)
    pca = PCA(n_components, random_state=seed).fit(z)
    components = np.zeros((pca_dim, width), dtype=np.float32)
    components[:n_components] = pca.components_
    projected = (z - pca.mean_) @ components.T
    fits = []
    for k in range(len(classes)):
        target = (y == k).astype(int)
        fits.append(
            fit_classifier(
                projected,
                target,
                groups,
                "svm",
                seed=seed,
                sample_weight=compute_sample_weight("balanced", target),  # both sides count the same
                inner_probabilities=False,
            )  # fmt: skip
        )
    n_support = max(f.params["support"].shape[0] for f in fits)
    support = np.zeros((len(classes), n_support, pca_dim), dtype=np.float32)
    dual_coef = np.zeros((len(classes), n_support), dtype=np.float32)
    for k, f in enumerate(fits):
        support[k, : len(f.params["support"])] = f.params["support"]
        dual_coef[k, : len(f.params["dual_coef"])] = f.params["dual_coef"]
    model.load_fitted({
        "feature_mean": mean,
        "feature_scale": scale,
        "pca_mean": pca.mean_,
        "pca_components": components,
        "support": support,
        "dual_coef": dual_coef,
        "intercept": np.array([f.params["intercept"] for f in fits]),
        "gamma": np.array([f.params["gamma"] for f in fits]),
        "platt": np.stack([f.params["platt"] for f in fits]),
    })  # fmt: skip
    info = {
        "cases": len(cases),
        "pca_components": n_components,
        "classes": {
            name: {"C": float(f.info["C"]), "inner_auc": float(f.info["inner_auc"]), "n_support": f.info["n_support"]}
            for name, f in zip(classes, fits, strict=True)
        },
    }  # fmt: skip
    log.info("fitted %s on %d scans: %s", model.model_name, len(cases), info["classes"])
    return info
