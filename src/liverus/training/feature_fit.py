"""Fitting a :class:`~liverus.models.LesionFeatureModel` on a run's training cases (instead of the epoch loop).

Everything fitted (standardisation, the PCA of the deep features, the classifier's hyperparameter, Platt scaling)
sees the training part only: a cross-validation fold's held-out cases and a run's validation cases are scored by
the finished model like any network's. The hyperparameter (C) is chosen by an inner cross-validation that keeps
each group (patient, or near-duplicate frames) on one side; Platt scaling of the SVM is fitted on that inner
cross-validation's decision values, not on the training decisions (which an SVM separates too well). The same inner
cross-validation gives every training case an out-of-fold probability, from which a run without a validation split
(``data.val_fraction: 0``) chooses its operating points: a feature model needs no validation split, so all the
training cases can go into the fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, cross_val_predict
from sklearn.svm import SVC
from torch.utils.data import DataLoader

from liverus.data import Case, CaseCache, UltrasoundDataset
from liverus.engine.contributions import shapley_weights
from liverus.engine.forward import eval_batch_size, model_input
from liverus.models import LesionFeatureModel, ModelCard
from liverus.models.features import (
    REFERENCE_LESIONS,
    REFERENCE_QUANTILES,
    feature_store,
    save_feature_store,
)
from liverus.utils import STAGES

__all__ = [
    "fit_feature_model",
    "fit_classifier",
    "extract_features",
    "model_batches",
    "column_scale",
    "FeatureFit",
    "ClassifierFit",
    "C_GRID",
]

log = logging.getLogger("liverus.training")

C_GRID = {"logistic": (0.01, 0.03, 0.1, 0.3, 1.0), "svm": (0.3, 1.0, 3.0, 10.0)}
UNTUNED = {"logistic": {"C": 1.0}, "svm": {"C": 1.0}}


class ClassifierFit(NamedTuple):
    """What :func:`fit_classifier` fitted.

    Attributes:
        params: the arrays :meth:`LesionFeatureModel.load_fitted` takes.
        chosen: the chosen hyperparameters.
        info: what to record (``feature_fit.json``).
        inner_probabilities: each training case's probability from the inner fold that did not fit on it (the
            chosen hyperparameters; the SVM's after Platt scaling), or None without an inner cross-validation or when
            not asked for.
    """

    params: dict[str, np.ndarray]
    chosen: dict
    info: dict
    inner_probabilities: np.ndarray | None


@dataclass
class FeatureFit:
    """What :func:`fit_feature_model` fitted: ``info`` to record, and the training cases' targets and inner
    out-of-fold probabilities (see :class:`ClassifierFit`) to choose operating points on without a validation split."""

    info: dict
    targets: np.ndarray
    inner_probabilities: np.ndarray | None = field(default=None, repr=False)


def model_batches(
    model: torch.nn.Module, cases: list[Case], classes: tuple[str, ...], cache: CaseCache, card: ModelCard
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """The model inputs (normalised, unaugmented, on the model's device) and targets of ``cases``, batch by batch,
    with ``model`` in eval mode; the run's feature store is saved every four batches, so that an interrupted fit
    resumes from there."""
    model.eval()
    device = next(iter(model.buffers())).device
    loader = DataLoader(UltrasoundDataset(cases, classes, cache), batch_size=eval_batch_size(1))
    for i, (x, y) in enumerate(loader, 1):
        yield model_input(x.to(device), card), np.asarray(y)
        if i % 4 == 0:
            save_feature_store()


@torch.inference_mode()
def extract_features(
    model: LesionFeatureModel, cases: list[Case], classes: tuple[str, ...], cache: CaseCache, card: ModelCard
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Unscaled features of ``cases`` (unaugmented), in fp32 on the model's device.

    Returns:
        ``(radiomics (n, R), deep features (n, D) or None, targets (n,))``.
    """
    rad, deep, targets = [], [], []
    for x, y in model_batches(model, cases, classes, cache, card):
        r, d = model.raw_features(x)
        rad.append(r.cpu().numpy())
        if d is not None:
            deep.append(d.float().cpu().numpy())
        targets.append(y)
    return np.concatenate(rad), (np.concatenate(deep) if deep else None), np.concatenate(targets)


def column_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations; a column that does not vary (below a millionth of the most varying
    column's deviation, e.g. a principal component beyond the rank of a small training set) is left unscaled, so
    rounding noise is not blown up into the largest feature (it made an RBF SVM's answer constant on new images)."""
    mean, std = x.mean(0), x.std(0)
    return mean, np.where(std > max(1e-8, 1e-6 * float(std.max(initial=0.0))), std, 1.0)


def _inner_cv(y: np.ndarray, groups: list[str], seed: int) -> StratifiedGroupKFold | None:
    """Up to 5 group-disjoint inner folds, or None when a class has fewer than 2 groups."""
    per_class = [len({g for g, t in zip(groups, y, strict=True) if t == k}) for k in (0, 1)]
    n = min(5, *per_class)
    return StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed) if n >= 2 else None


@STAGES.timed("training steps")
def fit_feature_model(
    model: LesionFeatureModel,
    cases: list[Case],
    classes: tuple[str, ...],
    cache: CaseCache,
    card: ModelCard,
    *,
    seed: int = 0,
    sample_weight: list[float] | np.ndarray | None = None,
    inner_probabilities: bool = True,
    copies: Sequence[CaseCache] = (),
) -> FeatureFit:
    """Fit ``model`` on ``cases`` (see the module docstring) and store the fitted numbers in it.

    Args:
        sample_weight: per-case weights of the classifier's loss (``data.balance_by``: every class x acquisition
            group cell weighs the same); the standardisation and the PCA stay unweighted.
        inner_probabilities: also return the inner cross-validation's out-of-fold probabilities (see
            :func:`fit_classifier`); a run that has a validation split or a fixed threshold does not need them.
        copies: caches that give the same ``cases`` another way (``data.box_copies``: from boxes around their
            masks); every copy is one more training sample of its case, with the case's group (so the inner folds
            keep a case and its copies on one side) and weight. The returned ``targets`` and inner probabilities are
            those of ``cache``'s samples.

    Returns:
        The :class:`FeatureFit`; its ``info`` says what was chosen: ``{"C", "inner_auc", "n_features", "n_support"
        (SVM), "pca_variance" (deep), "sample_weight_range" (weighted)}``.

    Raises:
        ValueError: when the training cases hold one class only.
    """
    with feature_store(cache.directory):
        parts = [extract_features(model, cases, classes, c, card) for c in (cache, *copies)]
    rad = np.concatenate([p[0] for p in parts])
    deep = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    y = np.concatenate([p[2] for p in parts])
    n = len(cases)
    if len(np.unique(y)) < 2:
        raise ValueError(f"the training part holds one class only ({classes[int(y[0])]}); cannot fit a classifier")
    groups = [c.group_key for c in cases] * len(parts)
    if sample_weight is not None:
        sample_weight = np.tile(np.asarray(sample_weight, dtype=float), len(parts))
    params: dict[str, np.ndarray] = {}
    params["radiomics_mean"], params["radiomics_scale"] = column_scale(rad)
    blocks = [(rad - params["radiomics_mean"]) / params["radiomics_scale"]]
    info: dict = {}
    if deep is not None:
        projected, variance = _fit_deep_projection(deep, model.pca_components.shape[0] // model.views, model.views,
                                                   seed, params)  # fmt: skip
        blocks.append(projected)
        info["pca_variance"] = variance[0] if model.views == 1 else variance
    x = np.hstack(blocks)
    fit = fit_classifier(
        x, y, groups, model.classifier, seed=seed, sample_weight=sample_weight, inner_probabilities=inner_probabilities
    )
    params.update(fit.params)
    info.update(fit.info)
    model.load_fitted(params)
    set_contribution_reference(model, x[:n], y[:n], seed=seed)
    info["n_features"] = int(x.shape[1])
    if copies:
        info["box_copies"] = len(copies)
    also = f" and {len(copies)} box cop{'y' if len(copies) == 1 else 'ies'} of each" if copies else ""
    log.info(
        "fitted %s on %d cases%s: %s, inner-CV AUC %.3f, %d features",
        model.model_name, n, also,
        ", ".join(f"{k}={v}" for k, v in fit.chosen.items()), info["inner_auc"], info["n_features"],
    )  # fmt: skip
    inner = None if fit.inner_probabilities is None else fit.inner_probabilities[:n]
    return FeatureFit(info, y[:n], inner)


def _fit_deep_projection(
    deep: np.ndarray, k: int, views: int, seed: int, params: dict[str, np.ndarray]
) -> tuple[np.ndarray, list[float]]:
    """Standardise the deep features and reduce each view's by its own PCA to ``k`` components (so neither view's
    variance crowds out the other's), stored as one block-diagonal projection: ``deep_mean``, ``deep_scale``,
    ``pca_components`` and ``pca_scale`` go into ``params``. Returns: the scaled projection and each view's explained
    variance."""
    d_mean, d_scale = column_scale(deep)
    ds = (deep - d_mean) / d_scale
    width = ds.shape[1] // views
    comps = np.zeros((k * views, ds.shape[1]))
    centre = np.zeros(ds.shape[1])
    variance = []
    for v in range(views):
        cols = slice(v * width, (v + 1) * width)
        n_comp = min(k, ds.shape[0] - 1, width)
        pca = PCA(n_comp, random_state=seed).fit(ds[:, cols])
        comps[v * k : v * k + n_comp, cols] = pca.components_
        centre[cols] = pca.mean_
        variance.append(round(float(pca.explained_variance_ratio_.sum()), 4))
    # The PCA's own centring folds into the standardisation: (d - m)/s - c = (d - (m + c*s))/s.
    params["deep_mean"], params["deep_scale"] = d_mean + centre * d_scale, d_scale
    proj = (ds - centre) @ comps.T
    _, params["pca_scale"] = column_scale(proj)
    params["pca_components"] = comps
    return proj / params["pca_scale"], variance


@torch.inference_mode()
def set_contribution_reference(model: LesionFeatureModel, z: np.ndarray, y: np.ndarray, *, seed: int = 0) -> None:
    """Keep what a fitted model's feature contributions are measured against (:meth:`LesionFeatureModel.set_reference`):
    :data:`REFERENCE_LESIONS` training lesions, half of each class (drawn with repeats from a class that has fewer),
    and each group's contribution quantiles over up to 64 training lesions of each class.

    Args:
        z: the training lesions' scaled features (the classifier's input), one row per case.
        y: their classes (0 benign, 1 malignant).
    """
    rng = np.random.default_rng(seed)
    half = REFERENCE_LESIONS // 2
    by_class = [np.flatnonzero(y == k) for k in (0, 1)]
    rows = np.concatenate([rng.choice(idx, half, replace=len(idx) < half) for idx in by_class])
    quantiles = np.zeros(tuple(model.group_quantiles.shape))
    model.set_reference(z[rows], quantiles)  # the reference first: the contributions below are measured against it
    keep, weights = shapley_weights(len(model.feature_groups()))
    keep_t = torch.from_numpy(keep)
    device = model.reference_lesions.device
    for k, idx in enumerate(by_class):
        sample = rng.choice(idx, min(64, len(idx)), replace=False)
        values = []
        for chunk in np.array_split(sample, max(1, len(sample) // 16)):
            rows_t = torch.from_numpy(z[chunk]).float().to(device)  # the model may sit on a GPU
            decisions = model.mixed_decisions(rows_t, keep_t)  # (K, n, R)
            v = torch.logit(torch.sigmoid(decisions.double()).mean(-1), eps=1e-12).cpu().numpy()  # (K, n)
            values.append((weights @ v).T)
        quantiles[k] = np.quantile(np.concatenate(values), REFERENCE_QUANTILES, axis=0).T
    model.set_reference(z[rows], quantiles)


def fit_classifier(
    x: np.ndarray,
    y: np.ndarray,
    groups: list[str],
    classifier: str,
    *,
    seed: int = 0,
    sample_weight: list[float] | np.ndarray | None = None,
    inner_probabilities: bool = True,
) -> ClassifierFit:
    """Fit the ``classifier`` (``logistic`` or ``svm``) on scaled features ``x``, its hyperparameters
    chosen by the group-aware inner cross-validation.

    With ``sample_weight`` (rescaled to mean 1, so the C grid keeps its meaning) every fit weighs its loss by them;
    the inner folds are still scored by the plain AUC and the SVM's Platt scaling is fitted unweighted, so its
    probabilities match the data's own class mix.

    With ``inner_probabilities`` the fit also returns each case's out-of-fold probability from the inner folds, at
    the chosen hyperparameters. The SVM has them anyway (its Platt scaling is fitted on them); logistic regression
    refits every inner fold for them, so they are skipped when not asked for.

    Returns:
        The :class:`ClassifierFit` (``inner_probabilities`` None when not asked for or without inner folds).
    """
    fit_params: dict = {}
    info: dict = {}
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=float)
        if w.shape != y.shape or not np.all(np.isfinite(w)) or w.min() <= 0:
            raise ValueError(f"sample_weight: need one finite positive weight per case ({len(y)}), got {w.shape}")
        w = w * (len(w) / w.sum())
        fit_params["sample_weight"] = w
        info["sample_weight_range"] = [round(float(w.min()), 4), round(float(w.max()), 4)]
    cv = _inner_cv(y, groups, seed)
    base = LogisticRegression(max_iter=5000) if classifier == "logistic" else SVC(kernel="rbf", gamma="scale")
    grid = {"C": list(C_GRID[classifier])}
    if cv is not None:
        search = GridSearchCV(base, grid, cv=cv, scoring="roc_auc")
        search.fit(x, y, groups=groups, **fit_params)
        best, chosen, info["inner_auc"] = search.best_estimator_, search.best_params_, search.best_score_
    else:
        chosen = dict(UNTUNED[classifier])  # too few groups for an inner cross-validation
        best = base.set_params(**chosen).fit(x, y, **fit_params)
        info["inner_auc"] = float("nan")
    info.update(chosen)
    params: dict[str, np.ndarray] = {}
    inner = None
    if inner_probabilities and classifier == "logistic" and cv is not None:
        inner = cross_val_predict(
            clone(base).set_params(**chosen), x, y, groups=groups, cv=cv, method="predict_proba", params=fit_params
        )[:, 1]
    if classifier == "logistic":
        params["coef"], params["intercept"] = best.coef_[0], np.asarray(best.intercept_[0])
    else:
        params["support"] = best.support_vectors_
        params["dual_coef"] = best.dual_coef_[0]
        params["intercept"] = np.asarray(best.intercept_[0])
        params["gamma"] = np.asarray(best._gamma)
        if cv is not None:
            dv = cross_val_predict(SVC(kernel="rbf", gamma="scale", C=info["C"]), x, y, groups=groups, cv=cv,
                                   method="decision_function", params=fit_params)  # fmt: skip
        else:
            dv = best.decision_function(x)
        platt = LogisticRegression(max_iter=5000).fit(dv[:, None], y)
        params["platt"] = np.array([platt.coef_[0, 0], platt.intercept_[0]])
        info["n_support"] = int(best.support_vectors_.shape[0])
        if inner_probabilities and cv is not None:
            inner = platt.predict_proba(dv[:, None])[:, 1]
    return ClassifierFit(params, chosen, info, inner)
