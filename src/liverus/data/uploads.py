"""Decoding untrusted uploads from memory (never from a user-supplied path), with exactly the checks files get."""

from __future__ import annotations

import numpy as np

from liverus.data.io import KINDS, decode_image_bytes, sniff_kind

__all__ = ["ALLOWED_KINDS", "sniff_kind", "decode_upload"]

ALLOWED_KINDS = frozenset(KINDS)


def decode_upload(data: bytes, limit: int | None = None) -> np.ndarray:
    """Decode an upload to a gray float image in [0, 1].

    Raises:
        DataError: if the bytes cannot be decoded or are too large an image (the message never contains a path).
    """
    return decode_image_bytes(data, limit=limit)
