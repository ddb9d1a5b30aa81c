"""Ultrasound-aware preprocessing: scan-area (fan) detection and crop, lesion-ROI crop, letterbox.

The output of :func:`preprocess` is what the cache stores and augmentation starts from: a square ``uint8`` image plus
the aligned scan-area and lesion masks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = [
    "PreprocessConfig",
    "Preprocessed",
    "detect_scan_area",
    "preprocess",
    "roi_box",
    "CROP_MODES",
    "MAX_WORK_SIDE",
]

CROP_MODES = ("fan", "roi", "none")
# Larger images (legal up to the reader's pixel limit) are shrunk to this side before the fan detection, whose
# morphology kernel grows with the image: ultrasound frames are at most about 1-2 k pixels a side anyway.
MAX_WORK_SIDE = 2048


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings that decide what the model sees (and key the cache).

    Args:
        image_size: side of the square output in pixels.
        crop: ``fan`` (detect the scan area, blank what is outside it, crop to it), ``roi`` (crop around the lesion
            mask or box with a context margin) or ``none`` (whole image).
        roi_margin: context around the lesion box, as a fraction of the box's longer side, on every side.
        letterbox: keep the aspect ratio and pad to a square (true) or stretch (false).
        frame: DICOM cine frame (``None``: the middle frame).
    """

    image_size: int = 224
    crop: str = "fan"
    roi_margin: float = 0.3
    letterbox: bool = True
    frame: int | None = None

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if not 32 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [32, 2048], got {self.image_size}")
        if not 0 <= self.roi_margin <= 5:
            raise ValueError(f"roi_margin must be in [0, 5], got {self.roi_margin}")

    def key(self) -> str:
        """A short hash of the settings (part of the cache key)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Preprocessed:
    """A preprocessed case: ``image``, ``scan`` and ``lesion`` are ``uint8`` arrays of shape (S, S)."""

    image: np.ndarray
    scan: np.ndarray
    lesion: np.ndarray
    # Crop box (x0, y0, x1, y1) in original pixels and the scale applied, to map heatmaps back.
    box: tuple[int, int, int, int]
    scale: float

    def stacked(self) -> np.ndarray:
        return np.stack([self.image, self.scan, self.lesion])


def detect_scan_area(img: np.ndarray, threshold: float = 0.04) -> np.ndarray:
    """Find the ultrasound scan area (sector or linear field of view).

    A hand-written heuristic, because no maintained library detects ultrasound fans: threshold the non-black
    pixels, open with a kernel ~2% of the image to detach burned-in text, body markers and thin lines, keep the
    largest connected component and fill it with its convex hull (B-mode fans are convex; dark lesions and shadows
    inside them must stay inside).

    Args:
        img: gray image, float in [0, 1] or uint8.
        threshold: intensity (in [0, 1]) above which a pixel counts as signal.

    Returns:
        ``uint8`` mask {0, 1} of the image's shape; all ones when nothing sensible is found.
    """
    f = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    h, w = f.shape
    smooth = cv2.medianBlur((f * 255).astype(np.uint8), 5)
    binary = (smooth > threshold * 255).astype(np.uint8)
    k = max(3, int(round(0.02 * min(h, w))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    opened = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n <= 1:
        return np.ones_like(binary)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < 0.05 * h * w:
        return np.ones_like(binary)
    pts = cv2.findNonZero((labels == largest).astype(np.uint8))
    hull = cv2.convexHull(pts)
    mask = np.zeros_like(binary)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask


def roi_box(
    lesion: np.ndarray | None,
    box: tuple[float, float, float, float] | None,
    margin: float,
    shape: tuple[int, int],
) -> tuple[int, int, int, int]:
    """A square crop box around the lesion (mask or ``(x0, y0, x1, y1)`` box) with ``margin`` context.

    Raises:
        ValueError: if neither a non-empty mask nor a box is given, or the box is empty or outside the image.
    """
    if box is None:
        if lesion is None or not lesion.any():
            raise ValueError("crop='roi' needs a lesion mask or box for every image")
        ys, xs = np.nonzero(lesion)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite((x0, y0, x1, y1))):
        raise ValueError(f"lesion box {box} has non-finite coordinates")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"lesion box {box} is empty")
    h, w = shape[:2]
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        # A box beside the image would crop pure padding and still get a confident-looking probability.
        raise ValueError(f"lesion box {box} lies outside the {w}x{h} image")
    # A box reaching past the edge means a lesion at the edge: clip it, so the crop (and its memory) stays bounded
    # by the image, whatever numbers were typed.
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = max(side, 32.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (
        int(round(cx - side / 2)),
        int(round(cy - side / 2)),
        int(round(cx + side / 2)),
        int(round(cy + side / 2)),
    )


def _crop(arr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop with zero padding where the box leaves the image."""
    x0, y0, x1, y1 = box
    h, w = arr.shape
    out = np.zeros((y1 - y0, x1 - x0), dtype=arr.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def _fit(arr: np.ndarray, size: int, letterbox: bool, interp: int) -> tuple[np.ndarray, float]:
    h, w = arr.shape
    if not letterbox:
        return cv2.resize(arr, (size, size), interpolation=interp), size / max(h, w)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(arr, (nw, nh), interpolation=interp)
    out = np.zeros((size, size), dtype=arr.dtype)
    oy, ox = (size - nh) // 2, (size - nw) // 2
    out[oy : oy + nh, ox : ox + nw] = resized
    return out, scale


def preprocess(
    img: np.ndarray,
    cfg: PreprocessConfig,
    *,
    lesion: np.ndarray | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> Preprocessed:
    """Crop and resize one image as ``cfg`` says.

    Args:
        img: gray float image in [0, 1], shape (H, W).
        cfg: the settings.
        lesion: optional lesion mask (H, W), needed (or ``box``) for ``crop="roi"``.
        box: optional lesion box ``(x0, y0, x1, y1)`` in pixels.

    Returns:
        The preprocessed image and masks.
    """
    shrink = min(1.0, MAX_WORK_SIDE / max(img.shape))
    if shrink < 1.0:
        size = (max(1, round(img.shape[1] * shrink)), max(1, round(img.shape[0] * shrink)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        if lesion is not None:
            lesion = cv2.resize(lesion.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if box is not None:
            box = tuple(float(v) * shrink for v in box)
    u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    les = lesion.astype(np.uint8) if lesion is not None else np.zeros_like(u8)
    scan = detect_scan_area(u8) if cfg.crop in ("fan", "roi") else np.ones_like(u8)
    if cfg.crop == "fan":
        u8 = u8 * scan
        ys, xs = np.nonzero(scan)
        crop_box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    elif cfg.crop == "roi":
        crop_box = roi_box(lesion, box, cfg.roi_margin, u8.shape)
    else:
        crop_box = (0, 0, u8.shape[1], u8.shape[0])
    area = cv2.INTER_AREA
    image, scale = _fit(_crop(u8, crop_box), cfg.image_size, cfg.letterbox, area)
    scan_o, _ = _fit(_crop(scan, crop_box), cfg.image_size, cfg.letterbox, cv2.INTER_NEAREST)
    les_o, _ = _fit(_crop(les, crop_box), cfg.image_size, cfg.letterbox, cv2.INTER_NEAREST)
    if shrink < 1.0:  # report the crop in the original image's pixels
        crop_box = tuple(int(round(v / shrink)) for v in crop_box)
        scale *= shrink
    return Preprocessed(image, scan_o, les_o, crop_box, scale)
