"""Decoded-image cache and the torch ``Dataset``.

Decoding JPEG/DICOM and finding the fan costs far more than a training step's share of the loader, so every case is
decoded and preprocessed once and kept, keyed by the file contents (image, mask) and the preprocessing settings, in
memory and optionally on disk (``.npy``). Epochs after the first only augment.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from liverus.data.augment import apply_transform
from liverus.data.cases import Case
from liverus.data.io import DataError, read_image, read_mask
from liverus.data.preprocess import (
    VIEW_PLANES,
    PreprocessConfig,
    Preprocessed,
    lesion_box,
    model_pixels,
    preprocess,
)
from liverus.utils import STAGES

__all__ = [
    "CaseCache",
    "UltrasoundDataset",
    "SegmentationDataset",
    "load_preprocessed",
    "prepare_cases",
    "default_cache_dir",
    "clear_cache",
]

CACHE_VERSION = "1"


def default_cache_dir(folder: str | os.PathLike) -> Path:
    """Where decoded images are cached for a run or study ``folder``: ``$LIVERUS_CACHE`` when set, else
    ``folder/cache``, so that decoded patient images stay inside the folder of the work that made them (and go
    when it goes; ``liverus data clear-cache FOLDER`` removes them earlier)."""
    env = os.environ.get("LIVERUS_CACHE")
    return Path(env) if env else Path(folder) / "cache"


def clear_cache(target: str | os.PathLike) -> tuple[int, int]:
    """Remove cached decoded images and stored features: ``target`` itself when it is a cache folder, else every
    ``cache/`` folder of runs and studies below it. Only ``.npy`` files in two-hex-digit shards and ``.npz`` files
    in ``features/*/`` are removed, so pointing it at the wrong folder cannot delete anything else.

    Returns:
        ``(files removed, bytes freed)``.
    """
    target = Path(target)
    roots = [target] if target.name == "cache" or (target / "00").is_dir() else list(target.rglob("cache"))
    files = n_bytes = 0
    for root in roots:
        for shard in root.glob("[0-9a-f][0-9a-f]"):
            for f in shard.glob("*.npy"):
                n_bytes += f.stat().st_size
                f.unlink()
                files += 1
            if shard.is_dir() and not any(shard.iterdir()):
                shard.rmdir()
        # The feature store (liverus.models.features.feature_store): .npz shards in folders below features/.
        for f in [*root.glob("features/*/*.npz"), *root.glob("features/*/*.tmp")]:
            n_bytes += f.stat().st_size
            f.unlink()
            files += 1
        for folder in [*root.glob("features/*"), root / "features"]:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    return files, n_bytes


def _polygon_mask(poly: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(poly)).astype(np.int32)], 1)
    return mask


def _checked_box(case: Case, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """The case's box clipped to its image. Raises: DataError when the box does not overlap the image."""
    h, w = shape[:2]
    x0, y0, x1, y1 = case.box
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        raise DataError(
            case.path, f"the manifest's box {x0:g},{y0:g},{x1:g},{y1:g} does not lie inside the {w}x{h} image"
        )
    return cx0, cy0, cx1, cy1


def load_preprocessed(case: Case, cfg: PreprocessConfig) -> Preprocessed:
    """Decode and preprocess one case (no cache).

    Raises:
        DataError: for an unreadable image or mask, a mask of another size, or a ROI crop without a lesion.
    """
    img = read_image(case.path, frame=cfg.frame)
    lesion = None
    if case.mask:
        lesion = read_mask(case.mask, img.shape)
        for extra in case.extra_masks:  # several outlines of one image: the lesion is their union
            lesion |= read_mask(extra, img.shape)
    elif case.polygon:
        lesion = _polygon_mask(case.polygon, img.shape)
    box = None
    if cfg.lesion_from == "box" and lesion is not None and lesion.any():
        # Score (or train) as a user would use the model: from a box around the lesion, not its expert outline.
        seed = int.from_bytes(hashlib.sha256(Path(case.path).name.encode()).digest()[:4], "little")
        box = lesion_box(lesion, loosen=cfg.box_loosen, jitter=cfg.box_jitter, seed=seed)
        lesion = None
    elif lesion is None and case.box is not None:
        # A box and no outline (a box-only dataset): the lesion comes from the box exactly as predict and serve take
        # a user's box. Loosening and jitter stand in for a user's box around an expert outline; a given box is
        # already a user's, so it is not moved (its averaged boxes, data.box_average, are moved as at inference).
        box = _checked_box(case, img.shape)
    try:
        return preprocess(img, cfg, lesion=lesion, box=box)
    except ValueError as exc:
        raise DataError(case.path, str(exc)) from exc


class CaseCache:
    """Memory (and optional disk) cache of preprocessed cases.

    Args:
        cfg: preprocessing settings (part of the key).
        directory: where ``.npy`` files go; ``None`` keeps the cache in memory only.
    """

    def __init__(self, cfg: PreprocessConfig, directory: str | os.PathLike | None = None) -> None:
        self.cfg = cfg
        self.directory = Path(directory) if directory else None
        self._memory: dict[tuple, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _content_key(self, case: Case) -> str:
        h = hashlib.sha256()
        h.update(f"v{CACHE_VERSION}|{self.cfg.key()}|".encode())
        for p in (case.path, case.mask, *case.extra_masks):
            if p:
                h.update(Path(p).read_bytes())
            h.update(b"|")
        if case.polygon:
            h.update(json.dumps(case.polygon).encode())
        if case.box is not None:
            h.update(f"box{case.box}".encode())
        return h.hexdigest()

    def get(self, case: Case) -> np.ndarray:
        """Returns: ``uint8`` array (3, S, S): image, scan-area mask, lesion mask.

        Raises:
            DataError: as :func:`load_preprocessed`.
        """
        try:
            st = os.stat(case.path)
        except OSError as exc:
            raise DataError(case.path, "file does not exist") from exc
        mkey = (case.path, st.st_mtime_ns, st.st_size, case.mask, case.box)
        arr = self._memory.get(mkey)
        if arr is not None:
            self.hits += 1
            return arr
        disk = None
        if self.directory is not None:
            key = self._content_key(case)
            disk = self.directory / key[:2] / f"{key}.npy"
            if disk.is_file():
                try:
                    arr = np.load(disk, allow_pickle=False)
                except (OSError, ValueError):
                    arr = None  # a damaged cache entry is rebuilt below
        if arr is None:
            self.misses += 1
            arr = load_preprocessed(case, self.cfg).stacked()
            if disk is not None:
                disk.parent.mkdir(parents=True, exist_ok=True)
                tmp = disk.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, arr, allow_pickle=False)
                os.replace(tmp, disk)
        else:
            self.hits += 1
        self._memory[mkey] = arr
        return arr


@STAGES.timed("decoding and preprocessing")
def prepare_cases(
    cases: Sequence[Case], cache: CaseCache, *, skip_bad: bool = False, workers: int = 2
) -> tuple[list[Case], list[tuple[str, str]]]:
    """Decode and cache every case once, checking each file.

    Args:
        cases: the cases.
        cache: the cache to fill.
        skip_bad: skip unreadable cases (and list them) instead of raising.
        workers: decoding threads (OpenCV releases the GIL).

    Returns:
        ``(usable cases, skipped)`` where ``skipped`` lists ``(path, problem)``.

    Raises:
        DataError: for the first bad case when ``skip_bad`` is false.
    """

    def one(case: Case):
        try:
            cache.get(case)
            return None
        except DataError as exc:
            return (exc.path or case.path, exc.problem)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, cases))
    bad = [(c, r) for c, r in zip(cases, results, strict=True) if r is not None]
    if bad and not skip_bad:
        path, problem = bad[0][1]
        more = (
            f" (and {len(bad) - 1} more bad file(s); --skip-bad skips and lists them)"
            if len(bad) > 1
            else " (--skip-bad skips and lists such files)"
        )
        raise DataError(path, problem + more)
    good = [c for c, r in zip(cases, results, strict=True) if r is None]
    return good, [r for _, r in bad]


class UltrasoundDataset(Dataset):
    """Preprocessed ultrasound images as ``uint8`` tensors (1, S, S), or (2, S, S) with the lesion-mask channel when
    the cache's preprocessing says ``lesion_channel`` (twice the channels with ``scan_view``'s second view), with
    integer labels.

    Normalisation to the backbone's statistics happens on the device in the training step (cheaper than in the
    loader, and the loader ships a quarter of the bytes).

    Args:
        cases: the cases.
        classes: class names; a case's target is ``classes.index(case.label)``.
        cache: the preprocessed-image cache.
        transform: albumentations pipeline for training, or ``None``.
        seed: run seed; with the epoch and index it seeds each sample's augmentation.
        with_lesion: add the (augmented) lesion mask (1, S, S) to a third item, a dict (key ``lesion``).
        groups: add each case's acquisition-group index to that dict (key ``group``), for debiasing.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        classes: Sequence[str],
        cache: CaseCache,
        transform=None,
        seed: int = 0,
        *,
        with_lesion: bool = False,
        groups: Sequence[int] | None = None,
    ) -> None:
        unknown = sorted({c.label for c in cases} - set(classes))
        if unknown:
            raise DataError(None, f"labels {unknown} are not among the classes {list(classes)}")
        self.cases = list(cases)
        self.classes = tuple(classes)
        self.targets = [self.classes.index(c.label) for c in self.cases]
        self.cache = cache
        self.transform = transform
        self.seed = seed
        self.with_lesion = with_lesion
        self.groups = list(groups) if groups is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        """Args: ``index`` or ``(index, epoch)`` (as the training sampler yields, so workers need no epoch state)."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        arr = self.cache.get(self.cases[index])
        if self.transform is not None:
            seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            planes = []
            # Every view (the whole scan too, with scan_view) draws the same augmentation (one seed), so an
            # intensity change is the same on both.
            for v in range(0, len(arr), VIEW_PLANES):
                image, lesion = apply_transform(self.transform, arr[v], arr[v + 1], seed, lesion=arr[v + 2])
                planes += [image, arr[v + 1], lesion]
            arr = np.stack(planes)
        pixels = model_pixels(arr, self.cache.cfg.lesion_channel)
        extras = {}  # for auxiliary losses (attention supervision, debiasing), not model input
        if self.with_lesion:
            extras["lesion"] = torch.from_numpy(arr[2:3] > 0)
        if self.groups is not None:
            extras["group"] = self.groups[index]
        if extras:
            return torch.from_numpy(np.ascontiguousarray(pixels)), self.targets[index], extras
        return torch.from_numpy(np.ascontiguousarray(pixels)), self.targets[index]


class SegmentationDataset(Dataset):
    """Preprocessed images and their lesion masks as ``uint8`` tensors ((1, S, S), (1, S, S)), augmented together
    (the geometric transforms move the mask with the image).

    Args:
        cases: cases with a lesion mask (or polygon).
        cache: the preprocessed-image cache.
        transform: albumentations pipeline for training, or ``None``.
        seed: run seed; with the epoch and index it seeds each sample's augmentation.
    """

    def __init__(self, cases: Sequence[Case], cache: CaseCache, transform=None, seed: int = 0) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        arr = self.cache.get(self.cases[index])
        image, lesion = arr[0], arr[2]
        if self.transform is not None:
            seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            image, lesion = apply_transform(self.transform, image, arr[1], seed, lesion=lesion)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy((lesion > 0).astype(np.uint8))[
            None
        ]
