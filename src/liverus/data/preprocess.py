"""Ultrasound-aware preprocessing: scan-area (fan) detection and crop, lesion-ROI crop, letterbox.

The output of :func:`preprocess` is what the cache stores and augmentation starts from: a square ``uint8`` image plus
the aligned scan-area and lesion masks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

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
    "LESION_SOURCES",
    "BOX_MASKS",
    "lesion_box",
    "shifted_box",
    "box_variants",
    "box_to_mask",
    "model_pixels",
    "view_names",
    "VIEW_PLANES",
    "INTENSITY_MODES",
    "standardize_to_background",
]

CROP_MODES = ("fan", "roi", "none")
LESION_SOURCES = ("mask", "box")
BOX_MASKS = ("box", "ellipse", "grabcut")
INTENSITY_MODES = ("raw", "liver")
# Where intensity="liver" puts the liver background: near the median of AUL's lesion crops (background mean 70,
# standard deviation 30 gray levels; 5-95th percentiles 40-148 and 16-54, the spread the mapping removes), so a
# standardised crop looks like a typical raw one and the ImageNet normalisation still fits.
BACKGROUND_MEAN, BACKGROUND_STD = 80.0, 32.0
# Fewer background pixels than this (a lesion filling the crop) give no stable statistics: then the whole scan area.
MIN_BACKGROUND_PIXELS = 64
# Larger images (legal up to the reader's pixel limit) are shrunk to this side before the fan detection, whose
# morphology kernel grows with the image: ultrasound frames are at most about 1-2 k pixels a side anyway.
MAX_WORK_SIDE = 2048
# Each averaged box costs one more preprocessing and forward pass per image.
MAX_BOX_AVERAGE = 16


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings that decide what the model sees (and key the cache).

    Every field but ``frame`` and ``box_variant`` (set per call) is also a key of a training config's ``data``
    section (``data.image_size``, ``data.crop``, ...), which takes them from here: this docstring documents them.

    Args:
        image_size: side of the square output in pixels.
        crop: ``fan`` (detect the scan area, blank what is outside it, crop to it), ``roi`` (crop around the lesion
            mask or box with a context margin) or ``none`` (whole image).
        roi_margin: context around the lesion box, as a fraction of the box's longer side, on every side.
        letterbox: keep the aspect ratio and pad to a square (true) or stretch (false).
        frame: DICOM cine frame (``None``: the middle frame).
        lesion_channel: give the model the lesion mask as a second input channel (and feature models their mask:
            ``radiomics_*`` models need it).
        lesion_from: where a case's lesion comes from when it has an expert mask: the ``mask`` itself, or a ``box``
            around it (what a radiologist draws), loosened by ``box_loosen`` and moved by ``box_jitter``.
        box_loosen: the derived box grows by this fraction of its size on every side.
        box_jitter: each edge of the derived box moves by up to this fraction of the box size (seeded per image).
        box_mask: how a box becomes the lesion mask of the mask channel: the filled ``box``, the inscribed
            ``ellipse``, or OpenCV's ``grabcut`` segmentation inside the box.
        scan_view: two-view input (``crop="roi"`` only; feature models with a frozen backbone): besides the lesion
            crop, the whole scan area as ``crop="fan"`` gives it (the rest of the liver, other lesions, the depth of
            the scan), at ``image_size``. It is not centred on the lesion.
        intensity: ``raw`` (gray levels as scanned) or ``liver``: per-image intensity standardisation, each view's
            gray levels mapped linearly so that its liver background (the scan area outside the lesion) has a fixed
            mean and spread; the scanner's gain and dynamic-range settings cancel, the lesion's echogenicity relative
            to the liver stays. Outside the scan area becomes black.
        box_average: when a case's lesion is given by a box alone (a user's box, or ``lesion_from="box"``), the
            model's probability is the average over this many boxes: the box itself and ``box_average - 1`` copies
            with each edge moved by up to ``box_shift`` of the box size (seeded by the box, so one input always gives
            one answer). Log-odds are averaged. 1: the box alone. How a user draws the box moves a lesion model's
            probability; averaging over nearby boxes takes part of that out. A training run averages where it scores
            boxes: its held-out test part; the model card carries it to ``evaluate``, ``predict`` and ``serve``.
        box_shift: how far (fraction of the box size) each edge of an averaged box moves.
        box_variant: which of those boxes this preprocessing uses (0: the box itself); set by :func:`box_variants`.
    """

    image_size: int = 224
    crop: str = "fan"
    roi_margin: float = 0.3
    letterbox: bool = True
    frame: int | None = None
    lesion_channel: bool = False
    lesion_from: str = "mask"
    box_loosen: float = 0.0
    box_jitter: float = 0.0
    box_mask: str = "grabcut"
    intensity: str = "raw"
    scan_view: bool = False
    box_average: int = 1
    box_shift: float = 0.1
    box_variant: int = 0

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.lesion_from not in LESION_SOURCES:
            raise ValueError(f"lesion_from must be one of {LESION_SOURCES}, got {self.lesion_from!r}")
        if self.box_mask not in BOX_MASKS:
            raise ValueError(f"box_mask must be one of {BOX_MASKS}, got {self.box_mask!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if not 0 <= self.box_jitter <= 0.5:
            raise ValueError(f"box_jitter must be in [0, 0.5], got {self.box_jitter}")
        if not 0 <= self.box_loosen <= 1:
            raise ValueError(f"box_loosen must be in [0, 1], got {self.box_loosen}")
        if not 1 <= self.box_average <= MAX_BOX_AVERAGE:
            raise ValueError(f"box_average must be in [1, {MAX_BOX_AVERAGE}] boxes, got {self.box_average}")
        if not 0 < self.box_shift <= 0.5:
            raise ValueError(f"box_shift must be in (0, 0.5], got {self.box_shift}")
        if not 0 <= self.box_variant < self.box_average:
            raise ValueError(f"box_variant must be in [0, box_average={self.box_average}), got {self.box_variant}")
        if not 32 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be in [32, 2048], got {self.image_size}")
        if not 0 <= self.roi_margin <= 5:
            raise ValueError(f"roi_margin must be in [0, 5], got {self.roi_margin}")
        if self.scan_view and self.crop != "roi":
            raise ValueError(
                f"scan_view: the whole scan is the second view beside a lesion crop; set crop to 'roi' (got "
                f"{self.crop!r}; crop 'fan' alone already shows the whole scan)"
            )

    def key(self) -> str:
        """A short hash of the settings (part of the cache key)."""
        d = asdict(self)
        # Settings of earlier versions keep their cache key.
        if self.intensity == "raw":
            d.pop("intensity")
        if not self.scan_view:
            d.pop("scan_view")
        # How many boxes are averaged does not change one box's preprocessing; which box it is does.
        d.pop("box_average")
        if not self.box_variant:
            d.pop("box_variant")
            d.pop("box_shift")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Preprocessed:
    """A preprocessed case: ``image``, ``scan`` and ``lesion`` are ``uint8`` arrays of shape (S, S); with two-view
    input (``scan_view``), ``context`` holds the same three planes of the second view, the whole scan."""

    image: np.ndarray
    scan: np.ndarray
    lesion: np.ndarray
    # Crop box (x0, y0, x1, y1) in original pixels and the scale applied, to map heatmaps back.
    box: tuple[int, int, int, int]
    scale: float
    # Where the lesion came from (user mask, user box, predicted), set by the predictor for its outputs.
    lesion_source: str = ""
    context: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # The other boxes the probability is averaged over (PreprocessConfig.box_average), set by the predictor.
    variants: tuple[Preprocessed, ...] = ()

    def stacked(self) -> np.ndarray:
        """Returns: ``(3 * views, S, S)``: image, scan, lesion of the crop, then those of the second view."""
        return np.stack([self.image, self.scan, self.lesion, *(self.context or ())])


VIEW_PLANES = 3  # image, scan area, lesion: the planes of one view in a stacked array


def view_names(crop: str, scan_view: bool) -> list[str]:
    """What each view of a model's input shows, in order, from its preprocessing (``crop``, ``scan_view``)."""
    first = "lesion crop" if crop == "roi" else "image"
    return [first] + (["whole scan"] if scan_view else [])


def model_pixels(stacked: np.ndarray, lesion_channel: bool) -> np.ndarray:
    """What the network is fed from :meth:`Preprocessed.stacked` arrays ``(..., 3 * V, S, S)``: per view, the image
    (1 channel) plus the lesion mask scaled to 0/255 when ``lesion_channel``; the views follow each other.
    ``uint8``, shape (..., C * V, S, S)."""
    out = []
    for v in range(stacked.shape[-3] // VIEW_PLANES):
        base = v * VIEW_PLANES
        out.append(stacked[..., base : base + 1, :, :])
        if lesion_channel:
            out.append((stacked[..., base + 2 : base + 3, :, :] > 0).astype(np.uint8) * 255)
    return out[0] if len(out) == 1 else np.concatenate(out, axis=-3)


def lesion_box(
    lesion: np.ndarray, *, loosen: float = 0.0, jitter: float = 0.0, seed: int = 0
) -> tuple[float, float, float, float]:
    """A box ``(x0, y0, x1, y1)`` around a lesion mask as a user might draw it: grown by ``loosen`` of its size on
    every side, each edge then moved by up to ``jitter`` of the box size (uniform, from ``seed``), and kept inside
    the image and non-empty.

    Raises:
        ValueError: for an empty mask.
    """
    if not lesion.any():
        raise ValueError("the lesion mask is empty; no box can be derived from it")
    ys, xs = np.nonzero(lesion)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    w, h = x1 - x0, y1 - y0
    x0, x1, y0, y1 = x0 - loosen * w, x1 + loosen * w, y0 - loosen * h, y1 + loosen * h
    if jitter:
        d = np.random.default_rng(seed).uniform(-jitter, jitter, 4) * np.array([w, h, w, h])
        x0, y0, x1, y1 = x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]
    H, W = lesion.shape
    x0, x1 = np.clip([x0, x1], 0, W)
    y0, y1 = np.clip([y0, y1], 0, H)
    if x1 - x0 < 2:
        x0, x1 = max(0.0, min(x0, W - 2.0)), min(float(W), max(x0, W - 2.0) + 2)
    if y1 - y0 < 2:
        y0, y1 = max(0.0, min(y0, H - 2.0)), min(float(H), max(y0, H - 2.0) + 2)
    return float(x0), float(y0), float(x1), float(y1)


def shifted_box(
    box: tuple[float, ...], shape: tuple[int, int], *, shift: float, variant: int
) -> tuple[float, float, float, float]:
    """The ``variant``-th box averaged over for ``box`` (:attr:`PreprocessConfig.box_average`): variant 0 is ``box``
    itself; the others have each edge moved by up to ``shift`` of the box size, uniformly, from a generator seeded
    by the box's coordinates and the variant, clipped to the ``shape`` (H, W) image. A copy that would be thinner
    than 2 pixels is the box itself.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if variant == 0:
        return x0, y0, x1, y1
    w, h = x1 - x0, y1 - y0
    seed = [*np.round(np.array([x0, y0, x1, y1]) * 16).astype(np.int64).tolist(), variant]
    d = np.random.default_rng([abs(v) for v in seed]).uniform(-shift, shift, 4) * np.array([w, h, w, h])
    H, W = shape[:2]
    a0, a1 = np.clip([x0 + d[0], x1 + d[2]], 0, W)
    b0, b1 = np.clip([y0 + d[1], y1 + d[3]], 0, H)
    if a1 - a0 < 2 or b1 - b0 < 2:
        return x0, y0, x1, y1
    return float(a0), float(b0), float(a1), float(b1)


def box_variants(cfg: PreprocessConfig, *, from_box: bool | None = None) -> tuple[PreprocessConfig, ...]:
    """The preprocessing of every box a case's probability is averaged over (``cfg.box_average`` of them), or
    ``(cfg,)`` alone when its lesion does not come from a box alone, where there is nothing to average.

    Args:
        from_box: whether the lesion is given by a box alone (a user's box without an outline); default: whether
            ``cfg.lesion_from`` derives boxes from the cases' masks.
    """
    if from_box is None:
        from_box = cfg.lesion_from == "box"
    if not from_box or cfg.box_average == 1:
        return (cfg,)
    return tuple(replace(cfg, box_variant=k) for k in range(cfg.box_average))


def box_to_mask(image_u8: np.ndarray, box: tuple[float, ...], method: str = "grabcut") -> np.ndarray:
    """The lesion mask a box stands for: the filled ``box``, its inscribed ``ellipse``, or ``grabcut``.

    GrabCut (Rother et al., 2004; OpenCV's implementation) separates the lesion from the liver inside the box by
    colour models of the two; it runs on a window around the box (so its cost follows the lesion, not the image)
    with OpenCV's generator seeded, so one box always gives one mask. When it keeps less than a tenth of the box
    (a box around a lesion that barely differs from the liver), the inscribed ellipse is used instead.

    Returns:
        ``uint8`` mask {0, 1} of the image's shape, inside the box.
    """
    if method not in BOX_MASKS:
        raise ValueError(f"box_mask must be one of {BOX_MASKS}, got {method!r}")
    h, w = image_u8.shape[:2]
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    mask = np.zeros((h, w), np.uint8)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return mask
    if method == "box":
        mask[y0:y1, x0:x1] = 1
        return mask
    ellipse = np.zeros_like(mask)
    center = ((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2)
    cv2.ellipse(ellipse, (round(center[0]), round(center[1])), (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)),
                0, 0, 360, 1, -1)  # fmt: skip
    ellipse[:y0], ellipse[y1:], ellipse[:, :x0], ellipse[:, x1:] = 0, 0, 0, 0
    if method == "ellipse" or min(x1 - x0, y1 - y0) < 8:
        return ellipse
    pad = max(x1 - x0, y1 - y0) // 2
    wx0, wy0, wx1, wy1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    window = cv2.cvtColor(np.ascontiguousarray(image_u8[wy0:wy1, wx0:wx1]), cv2.COLOR_GRAY2BGR)
    gc = np.zeros(window.shape[:2], np.uint8)
    bg, fg = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(window, gc, (x0 - wx0, y0 - wy0, x1 - x0, y1 - y0), bg, fg, 4, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return ellipse
    inside = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.uint8)
    mask[wy0:wy1, wx0:wx1] = inside
    mask[:y0], mask[y1:], mask[:, :x0], mask[:, x1:] = 0, 0, 0, 0
    # Keep the largest piece: a lesion is one region, and stray speckle pixels would distort its shape features.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n > 1:
        mask = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    if mask.sum() < 0.1 * (x1 - x0) * (y1 - y0):
        return ellipse
    return mask


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
        box: optional lesion box ``(x0, y0, x1, y1)`` in pixels; without ``lesion``, ``cfg.box_variant`` picks
            which of its averaged boxes (:func:`shifted_box`) is used.

    Returns:
        The preprocessed image and masks.
    """
    if box is not None and cfg.box_variant and (lesion is None or not lesion.any()):
        box = shifted_box(box, img.shape, shift=cfg.box_shift, variant=cfg.box_variant)
    shrink = min(1.0, MAX_WORK_SIDE / max(img.shape))
    if shrink < 1.0:
        size = (max(1, round(img.shape[1] * shrink)), max(1, round(img.shape[0] * shrink)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        if lesion is not None:
            lesion = cv2.resize(lesion.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if box is not None:
            box = tuple(float(v) * shrink for v in box)
    u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if cfg.lesion_channel and box is not None and (lesion is None or not lesion.any()):
        # A box but no outline: the mask channel gets the lesion the box stands for.
        lesion = box_to_mask(u8, box, cfg.box_mask)
    les = lesion.astype(np.uint8) if lesion is not None else np.zeros_like(u8)
    # What the intensity standardisation leaves out of the background: the outline, or else the user's box.
    exclude = les
    if cfg.intensity != "raw" and not les.any() and box is not None:
        exclude = box_to_mask(u8, box, "box")
    scan = detect_scan_area(u8) if cfg.crop in ("fan", "roi") else np.ones_like(u8)
    if cfg.crop == "fan":
        u8 = u8 * scan
        crop_box = _bounding_box(scan)
    elif cfg.crop == "roi":
        crop_box = roi_box(lesion, box, cfg.roi_margin, u8.shape)
    else:
        crop_box = (0, 0, u8.shape[1], u8.shape[0])
    image, scan_o, les_o, scale = _view(u8, scan, les, exclude, crop_box, cfg)
    context = None
    if cfg.scan_view:
        context = _view(u8 * scan, scan, les, exclude, _bounding_box(scan), cfg)[:3]
    if shrink < 1.0:  # report the crop in the original image's pixels
        crop_box = tuple(int(round(v / shrink)) for v in crop_box)
        scale *= shrink
    return Preprocessed(image, scan_o, les_o, crop_box, scale, context=context)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _view(u8, scan, les, exclude, crop_box, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Image, scan area and lesion cropped to ``crop_box`` and fitted to ``cfg.image_size``; and the scale."""
    image, scale = _fit(_crop(u8, crop_box), cfg.image_size, cfg.letterbox, cv2.INTER_AREA)
    scan_o, _ = _fit(_crop(scan, crop_box), cfg.image_size, cfg.letterbox, cv2.INTER_NEAREST)
    les_o, _ = _fit(_crop(les, crop_box), cfg.image_size, cfg.letterbox, cv2.INTER_NEAREST)
    if cfg.intensity == "liver":
        excl_o = les_o
        if exclude is not les:
            excl_o, _ = _fit(_crop(exclude, crop_box), cfg.image_size, cfg.letterbox, cv2.INTER_NEAREST)
        image = standardize_to_background(image, scan_o, excl_o)
    return image, scan_o, les_o, scale


def standardize_to_background(image: np.ndarray, scan: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Map gray levels linearly so the background (scan area outside ``lesion``) has a fixed mean and spread.

    Written here because the standard normalisers (torchvision's ``Normalize``, MONAI's ``NormalizeIntensity``)
    standardise over the whole image: the lesion and the black outside the fan would then set the scale.

    Args:
        image: ``uint8`` image (H, W).
        scan: scan-area mask (H, W); pixels outside it become 0 (unless it is nearly empty: then it is ignored).
        lesion: lesion mask (H, W), left out of the statistics.

    Returns:
        The standardised ``uint8`` image: background mean ``BACKGROUND_MEAN``, standard deviation ``BACKGROUND_STD``
        (before clipping to 0-255).
    """
    inside = scan > 0
    if inside.sum() < MIN_BACKGROUND_PIXELS:  # no usable scan area: the whole image
        inside = np.ones(image.shape, dtype=bool)
    background = inside & (lesion == 0)
    if background.sum() < MIN_BACKGROUND_PIXELS:
        background = inside
    values = image[background].astype(np.float64)
    gain = BACKGROUND_STD / max(float(values.std()), 1.0)  # a flat background is not blown up into noise
    out = (image.astype(np.float64) - values.mean()) * gain + BACKGROUND_MEAN
    out[~inside] = 0.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
