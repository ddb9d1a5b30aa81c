"""What users point the applications at: files and folders to expand, and lesion boxes typed as text."""

from __future__ import annotations

import math
from pathlib import Path

from liverus.data.io import DataError, is_image_file

__all__ = ["expand_inputs", "parse_box"]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders expanded (recursively) to their image and DICOM files, sorted.

    Raises:
        DataError: for a path that does not exist or a folder without images.
    """
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise DataError(p, "folder holds no image or DICOM files")
            out.extend(found)
        elif p.exists():
            out.append(str(p))
        else:
            raise DataError(p, "does not exist")
    return out


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` (pixels of the input image) -> a box; empty -> ``None``.

    Raises:
        ValueError: if the text is not four finite numbers.
    """
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"the lesion box must be x0,y0,x1,y1 in pixels, got {text!r}")
    return vals  # type: ignore[return-value]
