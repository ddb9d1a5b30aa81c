"""Training augmentation: albumentations for the generic transforms, usaugment for the ultrasound-specific ones.

Ultrasound-specific (usaugment; they act inside the scan area only, so they need the scan mask):
depth attenuation, acoustic shadow (``GaussianShadow``), haze. Speckle is multiplicative noise, which is
albumentations' ``MultiplicativeNoise``. The ultrasound transforms run first, while the scan mask is still aligned.

Both libraries draw from their own generators (albumentations) and the global ones (usaugment); the dataset
seeds both per sample and epoch, so augmentation is reproducible and independent of the number of loader workers.
"""

from __future__ import annotations

import os
import random

# albumentations asks PyPI for its latest version on import: a network call from a clinical machine, and a wait for
# DNS to fail where there is no network (seen on a GPU machine without internet). liverus never wants it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["build_train_transform", "apply_transform", "AUGMENT_LEVELS"]

AUGMENT_LEVELS = ("none", "light", "strong")


def build_train_transform(level: str = "strong") -> A.Compose | None:
    """Build the training augmentation pipeline.

    Args:
        level: ``none``, ``light`` (geometry + brightness/contrast) or ``strong`` (adds speckle, depth
            attenuation, acoustic shadow, haze and blur).

    Returns:
        An albumentations ``Compose`` working on ``uint8`` (H, W) images, or ``None`` for ``none``.

    Raises:
        ValueError: for an unknown level.
    """
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment must be one of {AUGMENT_LEVELS}, got {level!r}")
    if level == "none":
        return None
    geometric = [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), border_mode=0, p=0.7),
    ]
    intensity = [
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.RandomGamma(p=0.3),
    ]
    if level == "light":
        return A.Compose(geometric + intensity)
    from usaugment.albumentations import DepthAttenuation, GaussianShadow, HazeArtifact

    ultrasound = [
        DepthAttenuation(attenuation_rate=(0.0, 1.5), p=0.3),
        GaussianShadow(strength=(0.25, 0.7), sigma_x=(0.01, 0.15), sigma_y=(0.01, 0.15), p=0.3),
        HazeArtifact(radius=(0.05, 0.95), sigma=(0, 0.1), p=0.2),
        A.MultiplicativeNoise(multiplier=(0.85, 1.15), per_channel=False, elementwise=True, p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    ]
    return A.Compose(ultrasound + geometric + intensity)


def apply_transform(
    transform: A.Compose | None, image: np.ndarray, scan: np.ndarray, seed: int, *, lesion: np.ndarray | None = None
):
    """Apply ``transform`` reproducibly.

    Args:
        transform: from :func:`build_train_transform`.
        image: ``uint8`` (H, W).
        scan: scan-area mask ``uint8`` (H, W), used by the ultrasound transforms.
        seed: per-sample seed (the dataset derives it from the run seed, the epoch and the index).
        lesion: optional lesion mask ``uint8`` (H, W), moved by the same geometric transforms as the image.

    Returns:
        The augmented ``uint8`` image; ``(image, lesion)`` when ``lesion`` is given.
    """
    if transform is None:
        return image if lesion is None else (image, lesion)
    transform.set_random_seed(seed)
    # usaugment draws from the global Python and NumPy generators: seed them for this sample, then put them back
    # so that the caller's random streams are not disturbed.
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        # usaugment works on float images; albumentations keeps the dtype it is given.
        extra = {"mask": lesion} if lesion is not None else {}
        res = transform(image=image.astype(np.float32) / 255.0, scan_mask=scan.astype(np.float32), **extra)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    out = np.clip(res["image"] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out if lesion is None else (out, np.ascontiguousarray(res["mask"]).astype(np.uint8))
