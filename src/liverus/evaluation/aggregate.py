"""One answer per lesion and per patient from per-image predictions.

Clinical data has several images per lesion and several lesions per patient. A lesion's probability is the mean
log-odds of its images (as ``box_average`` averages the boxes of one image: each image is evidence about the same
lesion, and log-odds add evidence); a patient's is the highest of their lesions' (a patient has a malignancy when any
lesion is malignant, so their label is malignant when any lesion's is). Lesions are named by a manifest's
``lesion_id``; without it each image stands for its own lesion. Patients are named by ``patient_id``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from liverus.engine.predictions import Predictions

__all__ = ["mean_log_odds", "aggregate_predictions", "group_ids", "LEVELS"]

LEVELS = {"lesion": "lesion_id", "patient": "patient_id"}


def mean_log_odds(p: Sequence[float]) -> float:
    """The probability whose log-odds is the mean log-odds of ``p``."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    z = float(np.mean(np.log(q) - np.log1p(-q)))
    return float(1 / (1 + np.exp(-z)))


def group_ids(meta: Sequence[dict], paths: Sequence[str], level: str) -> list[str] | None:
    """Each row's lesion or patient key, or None when no row names one. A lesion is keyed within its patient (two
    patients' ``lesion_id`` 1 are two lesions); a row without a ``lesion_id`` is a lesion of its own (keyed by its
    row, since one image may be listed twice with two boxes: two lesions); a row without a ``patient_id`` is a
    patient of its own, or its lesion's."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    column = LEVELS[level]
    if not any(str(m.get(column) or "").strip() for m in meta):
        return None
    keys = []
    for i, (m, path) in enumerate(zip(meta, paths, strict=True)):
        patient = str(m.get("patient_id") or "").strip()
        lesion = str(m.get("lesion_id") or "").strip()
        own = f"image {i + 1}:{path}"
        if level == "patient":
            keys.append(patient or (f"/{lesion}" if lesion else own))
        else:
            keys.append(f"{patient}/{lesion}" if lesion else own)
    return keys


def aggregate_predictions(pr: Predictions, level: str, threshold: float) -> Predictions | None:
    """The predictions per lesion (mean log-odds of its images) or per patient (the highest of their lesions'),
    decided at ``threshold``; None when the manifest names no lesions (patients).

    Raises:
        ValueError: naming the lesion whose images carry different labels.
    """
    keys = group_ids(pr.meta, pr.paths, level)
    if keys is None:
        return None
    lesions = group_ids(pr.meta, pr.paths, "lesion") or [f"image {i + 1}:{p}" for i, p in enumerate(pr.paths)]
    per_lesion: dict[str, list[int]] = {}
    for i, lesion in enumerate(lesions):
        per_lesion.setdefault(lesion, []).append(i)
    lesion_p, lesion_y = {}, {}
    for lesion, idx in per_lesion.items():
        labels = set(pr.y[idx].tolist())
        if len(labels) > 1:
            raise ValueError(f"lesion {lesion!r} has images labelled both benign and malignant; fix the manifest")
        lesion_p[lesion], lesion_y[lesion] = mean_log_odds(pr.p[idx]), labels.pop()
    if level == "lesion":
        members = {lesion: [lesion] for lesion in per_lesion}
        first = {lesion: idx[0] for lesion, idx in per_lesion.items()}
    else:
        members, first = {}, {}
        for i, (key, lesion) in enumerate(zip(keys, lesions, strict=True)):
            if lesion not in members.setdefault(key, []):
                members[key].append(lesion)
            first.setdefault(key, i)
    names = list(members)
    p = np.array([max(lesion_p[les] for les in members[k]) for k in names])
    y = np.array([max(lesion_y[les] for les in members[k]) for k in names], dtype=int)
    meta = [
        {
            "patient_id": pr.meta[first[k]].get("patient_id", ""),
            "n_images": str(sum(len(per_lesion[les]) for les in members[k])),
            "n_lesions": str(len(members[k])),
        }
        for k in names
    ]
    return Predictions([f"{level}:{k}" for k in names], y, p, (p >= threshold).astype(int), meta)
