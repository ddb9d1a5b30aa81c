"""Hand-crafted lesion features ("radiomics") of a preprocessed lesion crop and its mask.

What a radiologist reads in a focal liver lesion, as numbers: its **shape** (circularity, solidity, margin
irregularity), its **echo pattern** (first-order intensity statistics and echogenicity relative to the surrounding
liver), its **texture** (grey-level co-occurrence and size-zone statistics; run-length statistics on request), a
hypoechoic **halo** (a dark rim just outside the margin) and **posterior acoustic** enhancement or shadowing (the band
below the lesion against the bands beside it at the same depth).

Shape and co-occurrence features come from scikit-image (``regionprops``, ``graycomatrix``/``graycoprops``, whose
definitions follow the IBSI reference). The grey-level size-zone and run-length statistics, the halo and the
posterior-acoustic features are written here because scikit-image has neither matrix and no library computes the two
ultrasound features; mirp computes IBSI texture matrices too but needs a whole medical-image stack (ITK images,
pandas tables) for what is a few lines on one 2-D crop.

Features are computed on the crop the model sees (the lesion-ROI crop is scaled to the lesion, so sizes in pixels
carry no information about the scanner's resolution, and intensities are standardised to the crop's own liver
background, so gain settings cancel).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import label, regionprops

from liverus.utils import DigestMemo

__all__ = [
    "FEATURE_NAMES",
    "RUN_LENGTH_NAMES",
    "ALL_FEATURE_NAMES",
    "FEATURE_MEMO",
    "lesion_features",
    "feature_matrix",
    "GLCM_LEVELS",
]

GLCM_LEVELS = 16
_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
_SHAPE = (
    "circularity",
    "solidity",
    "eccentricity",
    "extent",
    "axis_ratio",
    "margin_irregularity",
    "margin_roughness",
    "wider_than_tall",
)
_FIRST_ORDER = (
    "mean",
    "std",
    "skewness",
    "kurtosis",
    "p10",
    "p50",
    "p90",
    "entropy",
    "relative_echogenicity",
    "contrast_to_noise",
    "heterogeneity",
)
_TEXTURE = tuple(f"glcm_{p}_{d}" for d in (1, 3) for p in _GLCM_PROPS) + (
    "glszm_small_zone_emphasis",
    "glszm_large_zone_emphasis",
    "glszm_zone_percentage",
    "glszm_gray_level_nonuniformity",
)
_ULTRASOUND = ("halo_contrast", "posterior_enhancement", "posterior_vs_lesion")
FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"shape_{n}" for n in _SHAPE)
    + tuple(f"first_order_{n}" for n in _FIRST_ORDER)
    + tuple(f"texture_{n}" for n in _TEXTURE)
    + tuple(f"ultrasound_{n}" for n in _ULTRASOUND)
)
# Grey-level run-length statistics (IBSI 3.6), kept apart from the default set: on AUL they added nothing
# (docs/results.md, round 5), and models fitted on the 36 default features must keep reading exactly those.
RUN_LENGTH_NAMES: tuple[str, ...] = tuple(
    f"texture_glrlm_{n}"
    for n in (
        "short_run_emphasis",
        "long_run_emphasis",
        "gray_level_nonuniformity",
        "run_length_nonuniformity",
        "run_percentage",
    )
)
ALL_FEATURE_NAMES = FEATURE_NAMES + RUN_LENGTH_NAMES


def _shape_features(mask: np.ndarray) -> list[float]:
    props = max(regionprops(label(mask)), key=lambda r: r.area)
    area, perimeter = float(props.area), max(float(props.perimeter), 1.0)
    circularity = min(4 * np.pi * area / perimeter**2, 1.5)
    major, minor = max(props.axis_major_length, 1e-6), max(props.axis_minor_length, 1e-6)
    # Margin irregularity: spread of the boundary's distance from the centroid (0 for a disc); roughness: how much
    # longer the boundary is than that of its convex hull (spiculated and lobulated margins are longer).
    boundary = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool))
    ys, xs = np.nonzero(boundary)
    cy, cx = props.centroid
    radii = np.hypot(ys - cy, xs - cx)
    irregularity = float(radii.std() / max(radii.mean(), 1e-6))
    hull = props.image_convex.astype(np.uint8)
    hull_perimeter = max(float(regionprops(hull)[0].perimeter), 1.0)
    y0, x0, y1, x1 = props.bbox
    return [
        circularity,
        float(props.solidity),
        float(props.eccentricity),
        float(props.extent),
        float(minor / major),
        irregularity,
        perimeter / hull_perimeter,
        float((x1 - x0) / max(y1 - y0, 1)),
    ]


def _first_order(values: np.ndarray, background: np.ndarray) -> list[float]:
    hist = np.bincount(values.astype(np.int64), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    bg_mean = float(background.mean()) if background.size else float(values.mean())
    bg_std = float(background.std()) if background.size else 1.0
    mean = float(values.mean())
    return [
        mean / 255.0,
        float(values.std()) / 255.0,
        float(stats.skew(values)) if values.std() > 0 else 0.0,
        float(stats.kurtosis(values)) if values.std() > 0 else 0.0,
        *(float(np.percentile(values, q)) / 255.0 for q in (10, 50, 90)),
        float(-(p * np.log2(p)).sum()),
        mean / max(bg_mean, 1.0),
        (mean - bg_mean) / max(bg_std, 1.0),
        float(values.std()) / max(bg_std, 1.0),
    ]


def _quantize(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey levels 1..GLCM_LEVELS inside the mask (fixed bin count over the lesion's own range), 0 outside."""
    inside = image[mask]
    lo, hi = float(inside.min()), float(inside.max())
    q = np.zeros(image.shape, np.uint8)
    scaled = (image.astype(np.float32) - lo) / max(hi - lo, 1.0) * GLCM_LEVELS
    q[mask] = np.clip(scaled[mask].astype(np.int64), 0, GLCM_LEVELS - 1) + 1
    return q


def _texture(image: np.ndarray, mask: np.ndarray) -> list[float]:
    q = _quantize(image, mask)
    out = []
    for d in (1, 3):
        glcm = graycomatrix(q, [d], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=GLCM_LEVELS + 1, symmetric=True)
        # Level 0 is "outside the lesion": dropping its row and column keeps only pairs with both pixels inside.
        glcm = glcm[1:, 1:].astype(np.float64)
        if glcm.sum() == 0:
            out.extend([0.0] * len(_GLCM_PROPS))
            continue
        out.extend(float(graycoprops(glcm, prop).mean()) for prop in _GLCM_PROPS)
    # Grey-level size-zone matrix (IBSI 3.7): connected zones of equal grey level, 8-connected.
    sizes, levels = [], []
    for level in range(1, GLCM_LEVELS + 1):
        zones = label(q == level, connectivity=2)
        if zones.max():
            counts = np.bincount(zones.ravel())[1:]
            sizes.extend(counts.tolist())
            levels.extend([level] * len(counts))
    sizes_a = np.asarray(sizes, np.float64)
    n_zones, n_pixels = len(sizes_a), float(mask.sum())
    per_level = np.bincount(np.asarray(levels), minlength=GLCM_LEVELS + 1)
    out += [
        float((1 / sizes_a**2).sum() / n_zones),
        float(np.log1p((sizes_a**2).sum() / n_zones)),  # log: one big zone would dominate the scale otherwise
        n_zones / n_pixels,
        float((per_level**2).sum() / n_zones**2),
    ]
    return out


def _lines(q: np.ndarray) -> list[list[np.ndarray]]:
    """The image's lines in the four IBSI directions (0, 45, 90 and 135 degrees), one list per direction."""
    h, w = q.shape
    flipped = q[:, ::-1]
    return [
        list(q),
        [q.diagonal(k) for k in range(-h + 1, w)],
        list(q.T),
        [flipped.diagonal(k) for k in range(-h + 1, w)],
    ]


def _run_length(q: np.ndarray) -> list[float]:
    """Grey-level run-length features (IBSI 3.6), each the mean over the four directions: short- and long-run
    emphasis, grey-level and run-length non-uniformity (normalised) and run percentage. ``q`` holds grey levels
    1..GLCM_LEVELS inside the lesion and 0 outside; runs never cross the lesion's border or a line's end."""
    per_direction = []
    n_pixels = float((q > 0).sum())
    for lines in _lines(q):
        # One 1-D array, lines separated by a 0 ("outside"), so a run cannot continue onto the next line.
        flat = np.concatenate([np.append(line, 0) for line in lines])
        starts = np.flatnonzero(np.diff(flat, prepend=-1))
        lengths = np.diff(np.append(starts, len(flat)))
        levels = flat[starts]
        inside = levels > 0
        lengths, levels = lengths[inside].astype(np.float64), levels[inside]
        n_runs = float(len(lengths))
        matrix = np.zeros((GLCM_LEVELS + 1, int(lengths.max()) + 1))
        np.add.at(matrix, (levels, lengths.astype(np.int64)), 1.0)
        per_direction.append(
            [
                float((1 / lengths**2).sum() / n_runs),
                float(np.log1p((lengths**2).sum() / n_runs)),  # log, as the large-zone emphasis
                float((matrix.sum(axis=1) ** 2).sum() / n_runs**2),
                float((matrix.sum(axis=0) ** 2).sum() / n_runs**2),
                n_runs / n_pixels,
            ]
        )
    return np.mean(per_direction, axis=0).tolist()


def _ultrasound(image: np.ndarray, mask: np.ndarray) -> list[float]:
    img = image.astype(np.float64)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    ring_width = max(2, round(0.08 * max(h, w)))
    near = ndimage.binary_dilation(mask, iterations=ring_width) & ~mask
    far = ndimage.binary_dilation(mask, iterations=3 * ring_width) & ~ndimage.binary_dilation(
        mask, iterations=ring_width
    )
    near_mean = img[near].mean() if near.any() else img[mask].mean()
    far_mean = img[far].mean() if far.any() else near_mean
    halo = (near_mean - far_mean) / max(far_mean, 1.0)  # negative: a dark rim around the lesion
    # Below the lesion (sound that went through it) against beside it at the same depth (sound that did not).
    band = max(2, round(0.5 * h))
    by0, by1 = y1, min(img.shape[0], y1 + band)
    below = img[by0:by1, x0:x1]
    side_l = img[by0:by1, max(0, x0 - w) : x0]
    side_r = img[by0:by1, x1 : min(img.shape[1], x1 + w)]
    beside = np.concatenate([side_l.ravel(), side_r.ravel()])
    below_mean = below.mean() if below.size else far_mean
    beside_mean = beside.mean() if beside.size else far_mean
    return [
        float(halo),
        float((below_mean - beside_mean) / max(beside_mean, 1.0)),
        float((below_mean - img[mask].mean()) / 255.0),
    ]


def lesion_features(image: np.ndarray, mask: np.ndarray, *, run_length: bool = False) -> np.ndarray:
    """The :data:`FEATURE_NAMES` features of one lesion (with ``run_length``: :data:`ALL_FEATURE_NAMES`).

    Args:
        image: gray ``uint8`` crop (H, W).
        mask: lesion mask (H, W), non-zero inside the lesion.
        run_length: also the run-length features (:data:`RUN_LENGTH_NAMES`), after the default ones.

    Returns:
        ``float64`` vector of ``len(FEATURE_NAMES)`` (or ``len(ALL_FEATURE_NAMES)``) finite values.

    Raises:
        ValueError: for shapes that differ, or a mask with fewer than 9 lesion pixels (no shape to measure).
    """
    if image.shape != mask.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be 2-D and of one shape")
    m = mask > 0
    if m.sum() < 9:
        raise ValueError(f"the lesion mask has {int(m.sum())} pixels; radiomics needs a lesion of at least 9")
    background = image[ndimage.binary_dilation(m, iterations=max(3, round(0.1 * max(m.shape)))) & ~m]
    values = image[m].astype(np.float64)
    feats = np.asarray(
        _shape_features(m.astype(np.uint8))
        + _first_order(values, background)
        + _texture(image, m)
        + _ultrasound(image, m)
        + (_run_length(_quantize(image, m)) if run_length else []),
        dtype=np.float64,
    )
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)


# The features are a pure function of (image, mask), and a study computes them for every image in every fold and
# repeat (15 times for 5 folds x 3 repeats), an ensemble for every member, a server for every repeated image.
FEATURE_MEMO = DigestMemo()


def feature_matrix(images: np.ndarray, masks: np.ndarray, *, run_length: bool = False) -> np.ndarray:
    """:func:`lesion_features` of a batch: ``images`` and ``masks`` (N, H, W) -> (N, F), remembered per image
    (:data:`FEATURE_MEMO`), so the same image is measured once per process."""
    return np.stack([_remembered_features(i, m, run_length) for i, m in zip(images, masks, strict=True)])


def _remembered_features(image: np.ndarray, mask: np.ndarray, run_length: bool) -> np.ndarray:
    key = FEATURE_MEMO.key(image, mask, salt=b"run_length" if run_length else b"")
    value = FEATURE_MEMO.get(key)
    if value is None:
        value = lesion_features(image, mask, run_length=run_length)
        FEATURE_MEMO.put(key, value)
    return value
