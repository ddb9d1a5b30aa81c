"""What users point the applications at: files and folders to expand, and lesion boxes typed as text."""

from __future__ import annotations

import math
import os
from pathlib import Path

from liverus.data.io import DataError, is_image_file

__all__ = ["expand_inputs", "parse_box"]


def expand_inputs(inputs: list[str], *, errors: list[tuple[str, str]] | None = None) -> list[str]:
    """Files as given; folders expanded (recursively, links to folders not followed) to their image and DICOM files.

    Args:
        inputs: files and folders.
        errors: if given, receives ``(path, problem)`` for inputs that yield nothing (missing paths, dangling links,
            empty folders) instead of raising, so that one bad path does not lose a whole batch. Files are returned
            as given; whether they can be read is the reader's business.

    Raises:
        DataError: for the first such input when ``errors`` is None.
    """
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        problem = None
        if p.is_dir():
            found = sorted(
                str(Path(d) / f)
                for d, _, names in os.walk(p)
                for f in names
                if is_image_file(Path(f)) and not f.startswith(".")
            )
            if found:
                out.extend(found)
            else:
                problem = "folder holds no image or DICOM files"
        elif p.exists() or p.is_symlink():
            out.append(str(p))  # dangling links and link loops get their message from the reader
        else:
            problem = "does not exist"
        if problem:
            if errors is None:
                raise DataError(p, problem)
            errors.append((str(p), problem))
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
