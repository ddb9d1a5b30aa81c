"""A synthetic B-mode liver phantom: the built-in default dataset of the main command and of the tests.

Each image is a sector scan of liver parenchyma with vessels and one focal lesion, formed the way B-mode images are
(tissue echogenicity x fully developed speckle from a filtered complex Gaussian field, depth attenuation, log
compression). Lesion appearance follows the textbook signs radiologists use:

* benign: round, smooth margins, homogeneous; either cyst-like (anechoic, posterior acoustic enhancement) or
  hemangioma-like (hyperechoic);
* malignant: irregular or spiculated margins, heterogeneous echotexture, hypoechoic halo, posterior shadowing.

Features overlap on purpose (some benign lesions are mildly lobulated, some malignant ones lack a halo) so the task is
learnable but not trivial. All images have the same size and scanner look, so there is no acquisition shortcut.
Several frames of one "patient" share a lesion and a ``group``, to exercise leakage-safe splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from liverus.data.cases import Case, write_manifest

__all__ = ["render_phantom", "make_phantom_dataset"]


def _sector(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ax, ay = size / 2, -0.12 * size
    r = np.hypot(xx - ax, yy - ay) / size
    theta = np.arctan2(xx - ax, yy - ay)
    mask = (np.abs(theta) < np.deg2rad(36)) & (r > 0.2) & (r < 1.08)
    return mask.astype(np.uint8), r, theta


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return n / (n.std() + 1e-6)


def _lesion_mask(
    rng: np.random.Generator, size: int, cx: float, cy: float, radius: float, irregularity: float, spikes: int
) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    rad = np.ones_like(angles)
    for k in range(2, 7):
        rad += irregularity * rng.uniform(-1, 1) / k * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    if spikes:
        for a in rng.uniform(0, 2 * np.pi, spikes):
            rad += rng.uniform(0.25, 0.5) * np.exp(-(((angles - a + np.pi) % (2 * np.pi) - np.pi) ** 2) / 0.004)
    aspect = rng.uniform(0.75, 1.0)
    pts = np.stack([cx + radius * rad * np.cos(angles), cy + radius * aspect * rad * np.sin(angles)], 1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def render_phantom(
    rng: np.random.Generator, label: str, size: int = 256, lesion: dict | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Render one phantom image.

    Args:
        rng: the random generator (speckle and, when ``lesion`` is None, the lesion itself).
        label: ``benign``, ``malignant`` or ``normal`` (no lesion).
        size: image side in pixels.
        lesion: lesion parameters from an earlier call, to render another frame of the same lesion.

    Returns:
        ``(image uint8, lesion mask uint8, scan mask uint8, lesion parameters)``.
    """
    scan, r, theta = _sector(size)
    echo = 0.55 + 0.06 * _smooth_noise(rng, size, size / 10)
    # Vessels: dark tubes with a bright wall.
    for _ in range(rng.integers(1, 4)):
        pts = np.cumsum(rng.normal(0, size / 14, (6, 2)), 0) + rng.uniform(0.2, 0.8, 2) * size
        width = int(rng.integers(3, 8))
        cv2.polylines(echo, [pts.astype(np.int32)], False, 0.85, width + 2)
        cv2.polylines(echo, [pts.astype(np.int32)], False, 0.06, width)
    les_mask = np.zeros((size, size), np.uint8)
    params = dict(lesion or {})
    if label != "normal":
        if not params:
            malignant = label == "malignant"
            params = {
                "cx": float(size * rng.uniform(0.35, 0.65)),
                "cy": float(size * rng.uniform(0.38, 0.62)),
                "radius": float(size * rng.uniform(0.06, 0.13)),
                "kind": str(
                    rng.choice(["irregular", "spiculated"]) if malignant else rng.choice(["cyst", "hemangioma"])
                ),
                "irregularity": float(rng.uniform(0.35, 0.8) if malignant else rng.uniform(0.0, 0.3)),
                "halo": bool(malignant and rng.random() < 0.75),
                "shadow": bool(malignant and rng.random() < 0.7),
                "seed": int(rng.integers(1 << 31)),
            }
        lrng = np.random.default_rng(params["seed"])
        spikes = int(lrng.integers(5, 11)) if params["kind"] == "spiculated" else 0
        jitter = rng.normal(0, size * 0.01, 2)  # frames of one lesion differ slightly in position
        cx, cy = params["cx"] + jitter[0], params["cy"] + jitter[1]
        les_mask = _lesion_mask(lrng, size, cx, cy, params["radius"], params["irregularity"], spikes)
        inside = les_mask.astype(bool)
        below = np.zeros((size, size), bool)
        ys, xs = np.nonzero(les_mask)
        x0, x1, y1 = xs.min(), xs.max(), ys.max()
        cols = slice(int(x0 + 0.15 * (x1 - x0)), int(x1 - 0.15 * (x1 - x0)) + 1)
        below[y1:, cols] = True
        soft_below = cv2.GaussianBlur(below.astype(np.float32), (0, 0), 3)
        kind = params["kind"]
        if kind == "cyst":
            echo[inside] = 0.04
            echo *= 1 + 0.45 * soft_below  # posterior acoustic enhancement
        elif kind == "hemangioma":
            echo[inside] = 0.85 + 0.03 * _smooth_noise(lrng, size, 3)[inside]
        else:
            het = 0.35 + 0.18 * _smooth_noise(lrng, size, 2.5)
            echo[inside] = het[inside]
        if params["halo"]:
            ring = cv2.dilate(les_mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))).astype(bool) & ~inside
            echo[ring] = 0.15
        if params["shadow"]:
            echo *= 1 - 0.55 * soft_below  # posterior acoustic shadowing
    # Speckle: magnitude of a complex Gaussian field blurred by an anisotropic point-spread function.
    field = rng.standard_normal((size, size, 2)).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=1.6, sigmaY=0.8)
    speckle = np.hypot(field[..., 0], field[..., 1])
    speckle /= speckle.mean() + 1e-6
    env = np.clip(echo, 0, None) * speckle * np.exp(-0.9 * np.clip(r - 0.2, 0, None))  # depth attenuation
    img = np.log1p(30 * env) / np.log1p(30 * 1.6)
    img = np.clip(img, 0, 1) * scan
    out = (img * 255).astype(np.uint8)
    # Burned-in annotation outside the scan, identical for every class (a distractor, not a shortcut).
    cv2.putText(out, "LIVER 3.5MHz", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 200, 1, cv2.LINE_AA)
    return out, les_mask, scan, params


def make_phantom_dataset(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 120,
    frames: tuple[int, int] = (1, 3),
    size: int = 256,
    malignant_fraction: float = 0.5,
    include_normal: bool = False,
    seed: int = 0,
) -> list[Case]:
    """Write a phantom dataset (``benign/``, ``malignant/``, masks, ``manifest.csv``) and return its cases.

    Args:
        out_dir: destination folder (created; existing files of the same names are replaced).
        n_patients: number of lesions; each gives ``frames`` images sharing a group.
        frames: inclusive range of frames per patient.
        size: image side in pixels.
        malignant_fraction: share of malignant patients.
        include_normal: also write a ``normal/`` class (no lesion), a tenth of the patients.
        seed: random seed; the same seed gives the same files.

    Returns:
        The cases, as read back from the written manifest.
    """
    from liverus.data.cases import cases_from_manifest

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    for p in range(n_patients):
        if include_normal and p % 10 == 9:
            label = "normal"
        else:
            label = "malignant" if rng.random() < malignant_fraction else "benign"
        group = f"p{p:04d}"
        params = None
        for f in range(int(rng.integers(frames[0], frames[1] + 1))):
            img, mask, _, params = render_phantom(rng, label, size, params)
            name = f"{group}_f{f}.png"
            ipath = out / label / name
            ipath.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(ipath), img)
            mpath = None
            if label != "normal":
                mpath = out / "masks" / label / name
                mpath.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(mpath), mask * 255)
            cases.append(
                Case(
                    str(ipath.resolve()),
                    label,
                    group,
                    str(mpath.resolve()) if mpath else None,
                    meta={"kind": params.get("kind", "normal") if params else "normal"},
                )
            )
    write_manifest(cases, out / "manifest.csv")
    return cases_from_manifest(out / "manifest.csv")
