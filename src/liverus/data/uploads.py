"""Decoding untrusted uploads from memory (never from a user-supplied path): type sniffing and decoding."""

from __future__ import annotations

import io

import cv2
import numpy as np

from liverus.data.io import DataError, dicom_to_gray, to_gray_unit

__all__ = ["ALLOWED_KINDS", "sniff_kind", "decode_upload"]

ALLOWED_KINDS = {"png", "jpeg", "bmp", "tiff", "dicom"}


def sniff_kind(data: bytes) -> str | None:
    """The file type from its first bytes (magic numbers), or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def decode_upload(data: bytes, kind: str) -> np.ndarray:
    """Decode bytes of a sniffed type to a gray float image in [0, 1].

    Raises:
        DataError: if the bytes cannot be decoded (the message never contains a path).
    """
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            arr = ds.pixel_array
        except Exception as exc:
            raise DataError(None, f"DICOM could not be decoded ({type(exc).__name__})") from exc
        return dicom_to_gray(ds, arr, None, "upload")
    if kind == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DataError(None, "JPEG stream is truncated (no end-of-image marker)")
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(None, f"{kind.upper()} data could not be decoded (corrupt or truncated?)")
    img = to_gray_unit(arr, "upload")
    if img.shape[0] < 16 or img.shape[1] < 16:
        raise DataError(None, f"image is too small ({img.shape[1]}x{img.shape[0]} px)")
    return img
