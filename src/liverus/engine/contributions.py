"""What each kind of lesion feature adds to a feature model's decision: exact Shapley values over feature groups.

A heatmap shows where in the image the score came from; it does not say what the radiomics, which carry most of a
``radiomics_*`` model's decision, read there. Here the decision is split between the feature groups a radiologist
reads (shape and margin, echo pattern, texture, halo and posterior acoustics, and the deep features of each view;
:meth:`~liverus.models.LesionFeatureModel.feature_groups`).
A group that is "absent" takes the values of
reference training lesions kept with the model (32 benign and 32 malignant, :meth:`~liverus.models.LesionFeatureModel.
set_reference`) and the probabilities are averaged over them (the interventional Shapley value), so every contribution
is in log-odds of malignancy against a typical lesion of either class, and the contributions add up to the model's
log-odds minus the log-odds of that reference (Shapley's efficiency). Beside each contribution the model keeps where
the training lesions of each class put the same group (quartiles), so a reader sees whether a case's texture, say,
looks like that of the benign or of the malignant training lesions. (Models trained before the reference was kept
measure against the all-zero standardised features, the training mean.)

Written here rather than with the ``shap`` package: with at most six groups the exact Shapley values take 2^6 = 64
coalitions (times 64 reference lesions) of the fitted classifier on features computed once, where shap's
model-agnostic explainers estimate them by sampling (and would add numba to the dependencies); the groups, the
reference and the ensemble's probability-averaging are the model's own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from liverus.engine.heatmaps import figure_rgb

__all__ = [
    "Contributions",
    "contributions_figure",
    "contributions_plot",
    "feature_contributions",
    "has_feature_groups",
    "shapley_weights",
]


@dataclass(frozen=True)
class Contributions:
    """Shapley values of feature groups for N images.

    Attributes:
        groups: the group names, in column order.
        values: (N, G) contribution of each group, in log-odds of malignancy (positive: towards malignant).
        baseline: (N,) log-odds of the reference (every group absent).
        logit: (N,) the model's log-odds, ``baseline + values.sum(1)``.
        quantiles: (2, G, 3) quartiles of each group's contribution over the benign (0) and malignant (1) training
            lesions, or None for a model trained without them.
    """

    groups: tuple[str, ...]
    values: np.ndarray
    baseline: np.ndarray
    logit: np.ndarray
    quantiles: np.ndarray | None = None

    @property
    def baseline_probability(self) -> np.ndarray:
        """(N,) probability of malignancy of the reference (every group absent)."""
        return 1.0 / (1.0 + np.exp(-self.baseline))

    def training_context(self, digits: int = 4) -> dict[str, dict[str, list[float]]] | None:
        """``{group: {"benign": [q25, median, q75], "malignant": [...]}}``: where the training lesions of each class
        put each group's contribution; None for a model trained without them."""
        if self.quantiles is None:
            return None
        classes = ("benign", "malignant")
        return {
            g: {c: [round(float(v), digits) for v in self.quantiles[k, i]] for k, c in enumerate(classes)}
            for i, g in enumerate(self.groups)
        }

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
    quantiles = model.contribution_quantiles()
    return Contributions(groups, values, v[0], v[-1], None if quantiles is None else quantiles.double().cpu().numpy())


def contributions_figure(
    contributions: dict[str, float],
    *,
    probability: float,
    baseline_probability: float,
    context: dict[str, dict[str, list[float]]] | None = None,
) -> np.ndarray:
    """A bar chart of one image's contributions (red: towards malignant, blue: towards benign), largest first, with
    the probability and that of the reference; with ``context`` (:meth:`Contributions.training_context`) each bar
    also shows where the benign (blue marks) and malignant (red marks) training lesions put that group: median and
    interquartile range. Returns: an RGB ``uint8`` image."""
    return figure_rgb(
        contributions_plot(
            contributions, probability=probability, baseline_probability=baseline_probability, context=context
        )
    )


def contributions_plot(
    contributions: dict[str, float],
    *,
    probability: float,
    baseline_probability: float,
    context: dict[str, dict[str, list[float]]] | None = None,
):
    """The matplotlib figure :func:`contributions_figure` draws (for tests that read its text boxes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(contributions)[::-1]  # largest at the top
    values = [contributions[n] for n in names]
    rows = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.2, 0.55 * len(names) + 1.9), dpi=100, layout="constrained")
    for r in rows[::2]:  # a faint band per other row, so each row's marks read as one group
        ax.axhspan(r - 0.5, r + 0.5, color="#f2f3f4", zorder=0)
    ax.set_ylim(-0.5, len(names) - 0.5)
    ax.barh(rows, values, height=0.4, color=["#c0392b" if v > 0 else "#2471a3" for v in values], label="this lesion")
    if context:
        for offset, cls, colour in ((-0.3, "benign", "#1f618d"), (0.3, "malignant", "#922b21")):
            q = np.array([context[n][cls] for n in names])
            ax.errorbar(q[:, 1], rows + offset, xerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], fmt="o", ms=4,
                        color=colour, capsize=2, lw=1, label=f"{cls} training lesions (median, quartiles)")  # fmt: skip
    ax.set_yticks(rows, names)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("pushes towards benign  <-  log-odds  ->  towards malignant")
    ax.set_title(
        f"p(malignant) = {probability:.3f}, against {baseline_probability:.3f} for a typical training lesion",
        fontsize=10,
    )
    if context:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig
