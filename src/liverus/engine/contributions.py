"""What each kind of lesion feature adds to a feature model's decision: exact Shapley values over feature groups.

A heatmap shows where the frozen backbone looked; it says nothing about the radiomics, which carry most of a
``radiomics_*`` model's decision. Here the decision is split between the feature groups a radiologist reads (shape,
echo pattern, texture, halo and posterior acoustics, and the deep features of each view;
:meth:`~liverus.models.LesionFeatureModel.feature_groups`). A group that is "absent" takes the value of the average
training lesion (zero after the fitted standardisation and PCA), so every contribution is in log-odds of malignancy,
and the contributions add up to the model's log-odds minus the log-odds of that average lesion (Shapley's efficiency).

Written here rather than with the ``shap`` package: with at most six groups the exact Shapley values take 2^6 = 64
evaluations of the fitted classifier on features computed once, where shap's model-agnostic explainers estimate them
by sampling (and would add numba to the dependencies); the groups, the baseline and the ensemble's
probability-averaging are the model's own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from liverus.engine.heatmaps import figure_rgb

__all__ = ["Contributions", "contributions_figure", "feature_contributions", "has_feature_groups", "shapley_weights"]


@dataclass(frozen=True)
class Contributions:
    """Shapley values of feature groups for N images.

    Attributes:
        groups: the group names, in column order.
        values: (N, G) contribution of each group, in log-odds of malignancy (positive: towards malignant).
        baseline: (N,) log-odds of the average training lesion (every group absent).
        logit: (N,) the model's log-odds, ``baseline + values.sum(1)``.
    """

    groups: tuple[str, ...]
    values: np.ndarray
    baseline: np.ndarray
    logit: np.ndarray

    @property
    def baseline_probability(self) -> np.ndarray:
        """(N,) probability of malignancy of the average training lesion."""
        return 1.0 / (1.0 + np.exp(-self.baseline))

    def as_dicts(self, digits: int = 4) -> list[dict[str, float]]:
        """One ``{group: contribution}`` per image, largest magnitude first."""
        out = []
        for row in self.values:
            order = np.argsort(-np.abs(row), kind="stable")
            out.append({self.groups[g]: round(float(row[g]), digits) for g in order})
        return out


def has_feature_groups(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a feature model (or an ensemble of them), whose decision splits into feature groups."""
    try:
        model.feature_groups()
    except (AttributeError, ValueError):
        return False
    return True


def shapley_weights(n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Every coalition of ``n_groups`` players and each player's Shapley weight matrix over them.

    Returns:
        ``(keep (2^G, G) bool, weights (G, 2^G))`` such that ``weights @ v`` gives the Shapley values of a game whose
        value on coalition ``keep[k]`` is ``v[k]``: ``|S|! (G - |S| - 1)! / G!`` for S without the player, its
        negative for S with it.

    Raises:
        ValueError: for fewer than one or more than 12 groups (4096 coalitions).
    """
    if not 1 <= n_groups <= 12:
        raise ValueError(f"exact Shapley values over 1 to 12 groups, got {n_groups}")
    keep = np.array(list(itertools.product((False, True), repeat=n_groups)), dtype=bool)
    sizes = keep.sum(1)
    index = {tuple(row): k for k, row in enumerate(keep)}
    weights = np.zeros((n_groups, len(keep)))
    for k, row in enumerate(keep):
        for g in np.flatnonzero(~row):
            w = math.factorial(sizes[k]) * math.factorial(n_groups - sizes[k] - 1) / math.factorial(n_groups)
            with_g = row.copy()
            with_g[g] = True
            weights[g, index[tuple(with_g)]] += w
            weights[g, k] -= w
    return keep, weights


@torch.inference_mode()
def feature_contributions(model: torch.nn.Module, x: torch.Tensor) -> Contributions:
    """Exact Shapley values of the feature groups of ``model``'s log-odds of malignancy for normalised input ``x``.

    Args:
        model: a fitted :class:`~liverus.models.LesionFeatureModel` or an ensemble of them.
        x: (N, 2 * views, H, W), as the model takes it.

    Raises:
        ValueError: for a model without feature groups (a CNN).
    """
    if not has_feature_groups(model):
        raise ValueError(
            f"{getattr(model, 'model_name', type(model).__name__)} is not a feature model (radiomics_*): its decision "
            "does not split into lesion-feature groups; explain it with a heatmap (liverus explain --method gradcam)"
        )
    groups = tuple(model.feature_groups())
    keep, weights = shapley_weights(len(groups))
    v = model.coalition_logits(x, torch.from_numpy(keep)).double().cpu().numpy()  # (2^G, N)
    values = (weights @ v).T
    return Contributions(groups, values, v[0], v[-1])


def contributions_figure(
    contributions: dict[str, float], *, probability: float, baseline_probability: float
) -> np.ndarray:
    """A bar chart of one image's contributions (red: towards malignant, blue: towards benign) with the probability
    and that of the average training lesion. Returns: an RGB ``uint8`` image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(contributions)[::-1]  # largest at the top
    values = [contributions[n] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(names) + 1.4), dpi=100)
    ax.barh(names, values, color=["#c0392b" if v > 0 else "#2471a3" for v in values])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("contribution to the log-odds of malignancy")
    ax.set_title(f"p(malignant) = {probability:.3f}; average training lesion {baseline_probability:.3f}", fontsize=10)
    fig.tight_layout()
    return figure_rgb(fig)
