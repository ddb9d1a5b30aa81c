"""Leakage-safe splits: stratified group k-fold (scikit-learn) so that no patient or scan is on both sides.

Splits are written to a JSON file of image paths and reused, so every model of a study sees the same folds.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from liverus.data.cases import Case
from liverus.data.io import DataError

__all__ = ["kfold_splits", "train_val_test_split", "save_splits", "load_splits", "check_disjoint"]


def _check_groups(cases: list[Case], k: int) -> None:
    groups_per_class: dict[str, set[str]] = defaultdict(set)
    for c in cases:
        groups_per_class[c.label].add(c.group_key)
    for label, groups in sorted(groups_per_class.items()):
        if len(groups) < k:
            raise DataError(
                None,
                f"class {label!r} has only {len(groups)} group(s) (patients, or images merged as near duplicates); "
                f"{k} folds need at least {k}: use fewer folds (--k for cv/compare, model.ensemble for an "
                "ensemble, data.val_fraction for a validation split), data.group_by: source if near-duplicate "
                "merging joined too many images, or more data",
            )


def kfold_splits(cases: list[Case], k: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Stratified group k-fold.

    Args:
        cases: the cases (``group_key`` is the group; an empty group is the image's own).
        k: number of folds (>= 2).
        seed: shuffling seed.

    Returns:
        ``k`` folds, each ``{"train": [paths], "val": [paths]}``.

    Raises:
        ValueError: for ``k < 2``.
        DataError: when a class has fewer groups than folds.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    _check_groups(cases, k)
    labels = np.array([c.label for c in cases])
    groups = np.array([c.group_key for c in cases])
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for tr, va in sgkf.split(np.zeros(len(cases)), labels, groups):
        folds.append({"train": [cases[i].path for i in tr], "val": [cases[i].path for i in va]})
    return folds


def train_val_test_split(
    cases: list[Case], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[str]]:
    """Group-aware stratified train / validation (/ test) split.

    The test part is one fold of a ``round(1 / test_fraction)``-fold split; the validation part is then taken the same
    way from the rest. ``val_fraction`` 0 keeps no validation part (a model that needs none: a feature model, whose
    hyperparameters and threshold come from an inner cross-validation of its training cases).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (``val`` empty when ``val_fraction`` is 0, ``test`` when
        ``test_fraction`` is).
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions val={val_fraction}, test={test_fraction}")
    rest, test = list(cases), []
    if test_fraction > 0:
        fold = kfold_splits(rest, max(2, round(1 / test_fraction)), seed)[0]
        test_set = set(fold["val"])
        test = [c for c in rest if c.path in test_set]
        rest = [c for c in rest if c.path not in test_set]
    if val_fraction == 0:
        return {"train": [c.path for c in rest], "val": [], "test": [c.path for c in test]}
    k_val = max(2, round((1 - test_fraction) / val_fraction))
    fold = kfold_splits(rest, k_val, seed + 1)[0]
    return {"train": fold["train"], "val": fold["val"], "test": [c.path for c in test]}


def check_disjoint(cases: list[Case], split: dict[str, list[str]]) -> None:
    """Raise :class:`DataError` if any group appears in two parts of ``split``."""
    by_path = {c.path: c.group_key for c in cases}
    seen: dict[str, str] = {}
    for part, paths in split.items():
        for p in paths:
            g = by_path[p]
            if g in seen and seen[g] != part:
                raise DataError(p, f"group {g!r} is in both {seen[g]!r} and {part!r}")
            seen[g] = part


def save_splits(path: str | os.PathLike, splits: dict) -> None:
    """Write splits as JSON (atomically)."""
    from liverus.utils import atomic_write_json

    atomic_write_json(path, splits)


def load_splits(path: str | os.PathLike, cases: list[Case]) -> dict:
    """Read splits written by :func:`save_splits` and check that every path is one of ``cases``.

    Raises:
        DataError: if the file is unreadable or names images that are not in the data.
    """
    p = Path(path)
    try:
        splits = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(p, f"splits file could not be read ({exc})") from exc
    known = {c.path for c in cases}
    parts = splits.get("folds", []) + ([splits["holdout"]] if "holdout" in splits else [])
    for part in parts:
        for paths in part.values():
            missing = [x for x in paths if x not in known]
            if missing:
                raise DataError(p, f"names {len(missing)} image(s) not in the data, first: {missing[0]}")
    return splits
