"""``liverus data audit``: what is in a dataset, and whether something other than the lesion predicts the label."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from liverus.data.cases import Case
from liverus.data.io import DataError, printable, read_image

__all__ = [
    "derived_columns",
    "size_groups",
    "case_size",
    "audit_cases",
    "shortcut_check",
    "format_audit",
    "image_size",
    "near_duplicate_groups",
    "apply_grouping",
    "load_task_cases",
    "GROUPINGS",
    "SHORTCUT_WARN_AUC",
]

SHORTCUT_WARN_AUC = 0.70
# What a split groups by: the groups the data source gives (patient / scan ids, AUL's near_dup_group), or those
# merged with groups found in the images themselves (exact and near duplicates).
GROUPINGS = ("source", "near_duplicates")
_NON_FEATURE_COLS = {
    "group",
    "patient_id",
    "near_dup_group",
    "source_sha256",
    "source_file",
    "mask",
    "mass_mask",
    "liver_mask",
    "outline_mask",
}


def derived_columns(meta: dict) -> dict:
    """A manifest row's columns plus those derived from it: ``orig_size`` (WxH) and ``size_group`` (1024x768 vs
    other) when the manifest has ``orig_width``/``orig_height`` (AUL), the columns that carry its acquisition
    shortcut (subgroup tables, ``data.balance_by``)."""
    out = dict(meta)
    w, h = meta.get("orig_width"), meta.get("orig_height")
    if w and h:
        out["orig_size"] = f"{w}x{h}"
        out["size_group"] = "1024x768" if (str(w), str(h)) == ("1024", "768") else "other"
    return out


# size_groups: the most common image size is a group of its own when it holds at least this share of the images.
MODAL_SIZE_SHARE = 0.2


def size_groups(sizes: list[tuple[int, int]]) -> list[str]:
    """Each image's acquisition group from its size alone, for any dataset: few, well-filled groups.

    Image size is what every file carries of the scanner and its settings, and it can predict the label (on AUL
    1024x768 images are mostly malignant). The groups: the most common size against every other size when it holds
    at least ``MODAL_SIZE_SHARE`` of the images (AUL: ``1024x768`` against ``other``, 56% of the benign and malignant
    images); otherwise (many sizes, none common) ``small`` and ``large`` at the median pixel area; ``all`` when
    every image has one size.
    """
    if not sizes:
        return []
    counts = Counter(sizes)
    (w, h), n = counts.most_common(1)[0]
    if n == len(sizes):
        return ["all"] * len(sizes)
    if n >= MODAL_SIZE_SHARE * len(sizes):
        return [f"{w}x{h}" if s == (w, h) else "other" for s in sizes]
    areas = np.array([sw * sh for sw, sh in sizes])
    cut = float(np.median(areas))
    return ["small" if a <= cut else "large" for a in areas]


def case_size(case: Case) -> tuple[int, int]:
    """The original image's ``(width, height)``: the manifest's ``orig_width``/``orig_height`` where it records
    them (AUL's compact copy is resized), else the file's header.

    Raises:
        DataError: for an unreadable file.
    """
    w, h = case.meta.get("orig_width"), case.meta.get("orig_height")
    if w and h:
        return int(w), int(h)
    return image_size(case.path)


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the header where Pillow can read it, else by decoding (DICOM)."""
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception:
        img = read_image(path)
        return img.shape[1], img.shape[0]


def _texture_signature(path: str) -> np.ndarray:
    """A z-normalised band-pass thumbnail (64 x 48).

    Perceptual hashes are dominated by the fan outline, which every scan of a scanner shares; the band-pass keeps
    speckle-scale anatomy instead, so a high correlation means the same scan (consecutive frames).
    """
    small = cv2.resize(read_image(path), (64, 48), interpolation=cv2.INTER_AREA)
    band = cv2.GaussianBlur(small, (0, 0), 0.8) - cv2.GaussianBlur(small, (0, 0), 4)
    band = band.flatten() - band.mean()
    return band / (np.linalg.norm(band) + 1e-8)


def shortcut_check(cases: list[Case], sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """How well image size, aspect ratio and numeric metadata alone predict benign vs malignant.

    A random forest is cross-validated with stratified group folds on those features only; its out-of-fold AUC is
    the shortcut's strength. 0.5 is no shortcut.

    Returns:
        ``{"auc": float | None, "features": [...], "per_feature_auc": {...}, "warning": str | None}``.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    idx = [i for i, c in enumerate(cases) if c.label in ("benign", "malignant")]
    y = np.array([cases[i].label == "malignant" for i in idx], dtype=int)
    if len(idx) < 10 or y.min() == y.max():
        return {
            "auc": None,
            "features": [],
            "per_feature_auc": {},
            "warning": None,
            "note": "needs benign and malignant cases (at least 10)",
        }
    feats: dict[str, list[float]] = {
        "width": [sizes[i][0] for i in idx],
        "height": [sizes[i][1] for i in idx],
        "aspect_ratio": [sizes[i][0] / sizes[i][1] for i in idx],
    }
    meta_cols = sorted({k for i in idx for k in cases[i].meta} - _NON_FEATURE_COLS)
    for col in meta_cols:
        vals = []
        for i in idx:
            try:
                vals.append(float(cases[i].meta.get(col, "")))
            except ValueError:
                vals = []
                break
        if vals and len(set(vals)) > 1:
            feats[col] = vals
    X = np.array([feats[k] for k in feats], dtype=float).T
    groups = np.array([cases[i].group_key for i in idx])
    n_splits = min(5, int(np.bincount(y).min()))
    if n_splits < 2:
        return {
            "auc": None,
            "features": list(feats),
            "per_feature_auc": {},
            "warning": None,
            "note": "too few cases of one class",
        }
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rf = RandomForestClassifier(n_estimators=200, min_samples_leaf=3, random_state=seed, n_jobs=1)
    proba = cross_val_predict(rf, X, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(y, proba))
    per = {}
    for k, col in zip(feats, X.T, strict=True):
        a = roc_auc_score(y, col) if len(set(col)) > 1 else 0.5
        per[k] = float(max(a, 1 - a))
    warning = None
    if auc >= SHORTCUT_WARN_AUC:
        top = max(per, key=per.get)
        warning = (
            f"SHORTCUT: image size / metadata alone predict malignancy with AUC {auc:.2f} "
            f"(strongest single feature: {top}, AUC {per[top]:.2f}). A model may learn the scanner instead of "
            "the lesion: crop to the scan area or lesion ROI, letterbox to a fixed canvas, and check metrics "
            "inside each image-size subgroup."
        )
    return {"auc": auc, "features": list(feats), "per_feature_auc": per, "warning": warning}


def _fingerprints(cases: list[Case], *, sizes: bool = False) -> tuple[list[tuple], list[tuple[str, str]]]:
    """``(index, band-pass signature, SHA-256, (width, height) or None)`` of every readable case, and the unreadable
    ones as ``(path, problem)``. The signature decodes the whole file, so a valid header over a bad body is caught."""
    rows, unreadable = [], []
    for i, c in enumerate(cases):
        try:
            sig = _texture_signature(c.path)
            size = image_size(c.path) if sizes else None
            digest = hashlib.sha256(Path(c.path).read_bytes()).hexdigest()
        except (DataError, OSError) as exc:
            unreadable.append((c.path, getattr(exc, "problem", None) or str(exc)))
            continue
        rows.append((i, sig, digest, size))
    return rows, unreadable


def _near_pairs(sigs: list[np.ndarray], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs ``(a, b, correlation)`` of signatures correlating at least ``threshold`` (positions in ``sigs``)."""
    if not sigs:
        return []
    corr = np.stack(sigs) @ np.stack(sigs).T
    return [
        (int(a), int(b), float(corr[a, b])) for a, b in zip(*np.nonzero(np.triu(corr, 1) >= threshold), strict=True)
    ]


def near_duplicate_groups(
    cases: list[Case], *, threshold: float = 0.85
) -> tuple[list[Case], list[dict], list[tuple[str, str]]]:
    """Groups from the data itself, for sets without patient IDs: exact duplicates (same bytes) and near duplicates
    (band-pass thumbnails correlating at least ``threshold``, as in the audit) join one group, merged with any groups
    the cases already have, so that no pair lands on both sides of a split.

    Returns:
        ``(cases with the merged groups, conflicts, unreadable)``: ``conflicts`` lists near-duplicate pairs with
        different labels, by name (``{"a", "b", "label_a", "label_b", "correlation"}``); unreadable files keep their
        group and are listed as ``(path, problem)``.
    """
    import dataclasses

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, unreadable = _fingerprints(cases)
    edges: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for i, c in enumerate(cases):  # the source's own groups
        if c.group:
            edges.append((i, first.setdefault(f"group:{c.group}", i)))
    for i, _, digest, _ in rows:  # exact duplicates
        edges.append((i, first.setdefault(f"sha:{digest}", i)))
    conflicts = []
    for a, b, r in _near_pairs([sig for _, sig, _, _ in rows], threshold):
        i, j = rows[a][0], rows[b][0]
        edges.append((i, j))
        if cases[i].label != cases[j].label:
            conflicts.append(
                {"a": cases[i].path, "b": cases[j].path, "label_a": cases[i].label, "label_b": cases[j].label,
                 "correlation": round(r, 3)}
            )  # fmt: skip
    src, dst = zip(*edges, strict=True) if edges else ((), ())
    graph = coo_matrix((np.ones(len(edges)), (src, dst)), shape=(len(cases), len(cases)))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    first_member = {}
    for i, comp in enumerate(component):
        first_member.setdefault(comp, i)
    out = [
        dataclasses.replace(c, group=f"dup:{Path(cases[first_member[comp]].path).name}:{comp}")
        if sizes[comp] > 1
        else c
        for c, comp in zip(cases, component, strict=True)
    ]
    return out, conflicts, unreadable


def apply_grouping(cases: list[Case], grouping: str) -> tuple[list[Case], list[dict]]:
    """The cases with the groups ``grouping`` asks for (see :data:`GROUPINGS`). Returns: ``(cases, conflicts)``.

    Raises:
        ValueError: for an unknown grouping.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {GROUPINGS}")
    if grouping == "source":
        return cases, []
    grouped, conflicts, _ = near_duplicate_groups(cases)
    return grouped, conflicts


def load_task_cases(source: str | Path, task: str, grouping: str = "source") -> tuple[list[Case], list[dict]]:
    """The cases of ``source`` that belong to ``task``, grouped as ``grouping`` says (what training splits and what
    its reports count). Returns: ``(cases, conflicts)`` (see :func:`near_duplicate_groups`)."""
    from liverus.data.cases import load_cases, select_task

    cases, _ = select_task(load_cases(source), task)
    return apply_grouping(cases, grouping)


def audit_cases(
    cases: list[Case],
    *,
    near_dup_threshold: float = 0.85,
    seed: int = 0,
    ignored: list[tuple[str, str]] | None = None,
) -> dict:
    """Audit a dataset. Files that cannot be read are listed and the audit goes on.

    Args:
        cases: the cases.
        ignored: files the case table left out, with the reason (from ``load_cases(..., ignored=...)``), listed.
        near_dup_threshold: two images whose band-pass thumbnails correlate at least this much are near duplicates.
        seed: seed of the shortcut check.

    Returns:
        A JSON-serialisable dict: counts per class and group, sizes per class, exact and near duplicates, missing
        masks, unreadable files and the shortcut check.
    """
    counts = Counter(c.label for c in cases)
    groups: dict[str, set[str]] = defaultdict(set)
    for c in cases:
        groups[c.label].add(c.group_key)
    rows, bad = _fingerprints(cases, sizes=True)
    unreadable = [{"path": printable(p), "problem": q} for p, q in bad]
    ok = [cases[i] for i, _, _, _ in rows]
    sizes = [size for _, _, _, size in rows]
    hashes = [digest for _, _, digest, _ in rows]
    size_by_class: dict[str, Counter] = defaultdict(Counter)
    for c, (w, h) in zip(ok, sizes, strict=True):
        size_by_class[c.label][f"{w}x{h}"] += 1
    by_hash: dict[str, list[str]] = defaultdict(list)
    for c, h in zip(ok, hashes, strict=True):
        by_hash[h].append(c.path)
    exact = [paths for paths in by_hash.values() if len(paths) > 1]
    near = [
        {
            "a": ok[i].path,
            "b": ok[j].path,
            "correlation": round(r, 3),
            "same_group": ok[i].group_key == ok[j].group_key,
            "same_label": ok[i].label == ok[j].label,
        }
        for i, j, r in _near_pairs([sig for _, sig, _, _ in rows], near_dup_threshold)
        if hashes[i] != hashes[j]
    ]
    missing_masks = [c.path for c in cases if c.label != "normal" and not c.mask and not c.polygon]
    return {
        "n_images": len(cases),
        "counts": dict(sorted(counts.items())),
        "groups_per_class": {k: len(v) for k, v in sorted(groups.items())},
        "n_groups": len({c.group_key for c in cases}),
        "sizes_per_class": {k: dict(v.most_common()) for k, v in sorted(size_by_class.items())},
        "exact_duplicates": exact,
        "near_duplicates": near,
        "near_duplicates_across_groups": sum(1 for n in near if not n["same_group"]),
        "missing_masks": missing_masks,
        "unreadable": unreadable,
        "ignored": [{"path": printable(p), "problem": q} for p, q in (ignored or [])],
        "shortcut": shortcut_check(ok, sizes, seed),
    }


def format_audit(report: dict) -> str:
    """Human-readable summary of :func:`audit_cases`."""
    lines = [f"images: {report['n_images']}  groups: {report['n_groups']}"]
    for label, n in report["counts"].items():
        sizes = report["sizes_per_class"].get(label, {})
        top = ", ".join(f"{s}:{k}" for s, k in list(sizes.items())[:5])
        lines.append(f"  {label:10s} {n:5d} images in {report['groups_per_class'][label]:5d} groups; sizes {top}")
    lines.append(f"exact duplicates: {len(report['exact_duplicates'])} sets")
    lines.append(
        f"near duplicates: {len(report['near_duplicates'])} pairs "
        f"({report['near_duplicates_across_groups']} across different groups: possible leakage)"
    )
    lines.append(f"lesion masks missing: {len(report['missing_masks'])}")
    lines.append(f"unreadable files: {len(report['unreadable'])}")
    for u in report["unreadable"]:
        lines.append(f"  {u['path']}: {u['problem']}")
    ignored = report.get("ignored", [])
    if ignored:
        lines.append(f"files not used: {len(ignored)}")
        lines += [f"  {u['path']}: {u['problem']}" for u in ignored]
    sc = report["shortcut"]
    if sc.get("auc") is None:
        lines.append(f"shortcut check: not run ({sc.get('note', '')})")
    else:
        per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(sc["per_feature_auc"].items(), key=lambda kv: -kv[1])[:5])
        lines.append(f"shortcut check: metadata-only AUC {sc['auc']:.3f} (features: {per})")
        if sc["warning"]:
            lines.append("WARNING " + sc["warning"])
    return "\n".join(lines)
