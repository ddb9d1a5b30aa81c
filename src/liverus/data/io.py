"""Reading ultrasound images: PNG, JPEG, BMP, TIFF (8/16 bit) with OpenCV, and DICOM with pydicom.

Every reader returns a single-channel ``float32`` array scaled to [0, 1], and raises :class:`DataError` naming the file
and the problem on anything it cannot read.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "DataError",
    "read_image",
    "read_mask",
    "IMAGE_SUFFIXES",
    "DICOM_SUFFIXES",
    "is_image_file",
    "to_gray_unit",
    "dicom_to_gray",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


class DataError(ValueError):
    """A data file or table that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = str(path) if path is not None else ""
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES


def _is_dicom(path: Path, head: bytes) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or (len(head) >= 132 and head[128:132] == b"DICM")


def to_gray_unit(arr: np.ndarray, path: Path, max_value: float | None = None) -> np.ndarray:
    """Convert a decoded array (H, W) or (H, W, C) to gray float32 in [0, 1]."""
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if arr.shape[2] == 3:
            # OpenCV decodes to BGR; DICOM RGB arrives as RGB. ITU-R 601 luma weights either way (caller orders).
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY) if arr.dtype in (np.uint8, np.uint16) else arr.mean(axis=2)
        elif arr.shape[2] == 1:
            arr = arr[:, :, 0]
        else:
            raise DataError(path, f"unsupported channel count {arr.shape[2]}")
    if arr.ndim != 2:
        raise DataError(path, f"unsupported image shape {arr.shape}")
    if max_value is None:
        if arr.dtype == np.uint8:
            max_value = 255.0
        elif arr.dtype == np.uint16:
            max_value = 65535.0
        elif np.issubdtype(arr.dtype, np.floating):
            max_value = 1.0 if arr.max(initial=0) <= 1.0 else float(arr.max())
        else:
            raise DataError(path, f"unsupported pixel type {arr.dtype}")
    out = arr.astype(np.float32) / np.float32(max_value)
    return np.clip(out, 0.0, 1.0)


def _read_dicom(path: Path, frame: int | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except InvalidDicomError as exc:
        raise DataError(path, f"not a valid DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for truncated or unsupported pixel data
        raise DataError(path, f"DICOM pixel data could not be decoded ({type(exc).__name__}: {exc})") from exc
    return dicom_to_gray(ds, arr, frame, path)


def dicom_to_gray(ds, arr: np.ndarray, frame: int | None, path) -> np.ndarray:
    """Pixel array of a DICOM dataset -> gray float in [0, 1] (frame choice, colour spaces, MONOCHROME1)."""
    import pydicom

    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if n_frames > 1:
        idx = n_frames // 2 if frame is None else frame
        if not 0 <= idx < n_frames:
            raise DataError(path, f"frame {frame} requested but the cine has {n_frames} frames")
        arr = arr[idx]
    elif frame not in (None, 0):
        raise DataError(path, f"frame {frame} requested but the file has a single frame")
    if samples == 3 and photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
        # pydicom 3 converts YBR to RGB in pixel_array itself; older versions hand back YBR.
        from pydicom.pixel_data_handlers.util import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    bits = int(getattr(ds, "BitsStored", 8 * arr.dtype.itemsize))
    if samples == 3:
        rgb = arr.astype(np.float32)
        gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return np.clip(gray / float(2**bits - 1), 0.0, 1.0).astype(np.float32)
    arr = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    lo, hi = float(arr.min()), float(arr.max())
    # Scale by the stored bit depth (not per-image min/max) so that brightness stays comparable across images.
    full = float(2**bits - 1) * slope + intercept
    out = (arr - min(intercept, lo)) / max(full - min(intercept, lo), hi - min(intercept, lo), 1e-6)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_image(path: str | os.PathLike, *, frame: int | None = None) -> np.ndarray:
    """Read an ultrasound image as gray ``float32`` in [0, 1], shape (H, W).

    Args:
        path: PNG, JPEG, BMP, TIFF (8 or 16 bit, gray or colour) or DICOM (single or multi-frame).
        frame: for a DICOM cine, which frame (default: the middle one).

    Returns:
        The image.

    Raises:
        DataError: if the file is missing, empty, truncated, of an unknown format or not decodable.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file does not exist")
    size = p.stat().st_size
    if size == 0:
        raise DataError(p, "file is empty (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(132)
    if _is_dicom(p, head):
        img = _read_dicom(p, frame)
    else:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                p, f"unknown image format {p.suffix!r}; supported: {sorted(IMAGE_SUFFIXES | DICOM_SUFFIXES)}"
            )
        data = np.fromfile(p, dtype=np.uint8)
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise DataError(p, "could not be decoded as an image (corrupt or truncated?)")
        if p.suffix.lower() in (".jpg", ".jpeg") and not data[-2:].tobytes() == b"\xff\xd9":
            # libjpeg pads a truncated stream with grey and only warns; refuse it instead of training on it.
            raise DataError(p, "JPEG stream is truncated (no end-of-image marker)")
        img = to_gray_unit(arr, p)
    if img.shape[0] < 16 or img.shape[1] < 16:
        raise DataError(p, f"image is too small ({img.shape[1]}x{img.shape[0]} px)")
    return img


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask (any non-zero pixel is foreground) as ``uint8`` {0, 1}.

    Raises:
        DataError: if unreadable or, when ``shape`` is given, of another size than the image.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "mask file does not exist")
    if p.stat().st_size == 0:
        raise DataError(p, "mask file is empty (0 bytes)")
    arr = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise DataError(p, "mask could not be decoded")
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(p, f"mask is {arr.shape[1]}x{arr.shape[0]} px but its image is {shape[1]}x{shape[0]} px")
    return (arr > 0).astype(np.uint8)
