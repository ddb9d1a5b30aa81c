"""The per-case predictions CSV: its writer (training, ``evaluate``) beside its reader (reports, studies).

Columns: ``path, label, target, p_<class>..., predicted, group`` and the cases' metadata columns.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from liverus.data.cases import Case
from liverus.utils import atomic_write_text

__all__ = ["Predictions", "read_predictions", "read_class_probabilities", "write_predictions"]


class Predictions:
    """Per-case predictions of one model: labels, malignancy probabilities, decisions and case metadata."""

    def __init__(
        self,
        paths: list[str],
        y: np.ndarray,
        p: np.ndarray,
        pred: np.ndarray,
        meta: list[dict],
        fold: np.ndarray | None = None,
    ) -> None:
        self.paths, self.y, self.p, self.pred, self.meta = paths, y, p, pred, meta
        self.fold = fold if fold is not None else np.zeros(len(y), dtype=int)

    def __len__(self) -> int:
        return len(self.y)

    def align(self, paths: Sequence[str]) -> Predictions:
        """Reorder to ``paths`` (for paired comparisons). Raises: ValueError if a path is missing."""
        index = {p: i for i, p in enumerate(self.paths)}
        missing = [p for p in paths if p not in index]
        if missing:
            raise ValueError(f"{len(missing)} case(s) have no prediction, first: {missing[0]}")
        idx = np.array([index[p] for p in paths])
        return Predictions(
            list(paths), self.y[idx], self.p[idx], self.pred[idx], [self.meta[i] for i in idx], self.fold[idx]
        )


def read_class_probabilities(files: Sequence[str | Path]) -> tuple[list[str], np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read and concatenate prediction files of a k-class model (one per fold), every class's probability.

    Returns:
        (paths, targets, probabilities of shape (n, k), class names in column order).

    Raises:
        ValueError: if a file is missing or the files disagree on the classes.
    """
    paths, targets, probs, classes = [], [], [], None
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"{f} is missing: the study has unfinished folds (resume it with --resume)")
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = tuple(c[2:] for c in reader.fieldnames or [] if c.startswith("p_"))
            if classes is None:
                classes = cols
            elif cols != classes:
                raise ValueError(f"{f} has classes {cols}, the other folds {classes}")
            for row in reader:
                paths.append(row["path"])
                targets.append(int(row["target"]))
                probs.append([float(row[f"p_{c}"]) for c in cols])
    return paths, np.array(targets), np.array(probs, dtype=float), classes or ()


def write_predictions(
    path: Path,
    cases: Sequence[Case],
    probs: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    threshold: float,
) -> None:
    """Write one row per case, atomically. Binary models decide at ``threshold``; more classes take the argmax."""
    buf = io.StringIO()
    w = csv.writer(buf)
    meta_cols = sorted({k for c in cases for k in c.meta})
    w.writerow(["path", "label", "target", *[f"p_{c}" for c in classes], "predicted", "group", *meta_cols])
    for c, p, t in zip(cases, probs, targets, strict=True):
        pred = classes[int(p[1] >= threshold)] if len(classes) == 2 else classes[int(p.argmax())]
        w.writerow(
            [c.path, c.label, int(t), *[f"{v:.6f}" for v in p], pred, c.group, *[c.meta.get(k, "") for k in meta_cols]]
        )
    atomic_write_text(path, buf.getvalue())


def read_predictions(files: Sequence[str | Path], positive: str = "malignant") -> Predictions:
    """Read and concatenate prediction files written by :func:`write_predictions` (one per fold, in fold order)."""
    paths, y, p, pred, meta, fold = [], [], [], [], [], []
    for k, f in enumerate(files):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                paths.append(row["path"])
                y.append(int(row["label"] == positive))
                p.append(float(row[f"p_{positive}"]))
                pred.append(int(row["predicted"] == positive))
                meta.append({k2: v for k2, v in row.items() if not k2.startswith("p_")})
                fold.append(k)
    return Predictions(paths, np.array(y), np.array(p), np.array(pred), meta, np.array(fold))
