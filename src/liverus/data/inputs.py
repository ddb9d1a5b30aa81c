"""What users point the applications at: files and folders to expand, and lesion boxes typed as text."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from liverus.data.io import DataError, is_image_file

__all__ = ["expand_inputs", "parse_box", "InputItem", "input_items", "read_input_manifest"]


@dataclass(frozen=True)
class InputItem:
    """One image to analyse and, for lesion models, where its lesion is.

    Attributes:
        path: the image.
        mask: a lesion-mask file of the image's size, or None.
        box: a lesion box ``(x0, y0, x1, y1)`` in the image's pixels, or None.
        problem: what is wrong with this manifest row (a malformed box), or None: the row is answered with this
            error and the other rows are analysed.
        lesion_id, patient_id: the manifest's ids (empty when it has none): a lesion's images get one answer, a
            patient's lesions another.
    """

    path: str
    mask: str | None = None
    box: tuple[float, float, float, float] | None = None
    problem: str | None = None
    lesion_id: str = ""
    patient_id: str = ""

    @property
    def lesion_source(self) -> str:
        """Where the lesion came from, as the outputs report it."""
        return "user mask" if self.mask else "user box" if self.box else "none"


def read_input_manifest(path: str | os.PathLike) -> list[InputItem]:
    """A CSV of images to analyse: a ``path`` column, and optionally ``mask`` (a mask file) or ``box``
    (``x0,y0,x1,y1``; or four columns ``x0``, ``y0``, ``x1``, ``y1``), ``lesion_id`` and ``patient_id``. Relative
    paths are relative to the CSV.

    A row's own problem (an empty path, a malformed box) is that row's: it comes back with ``problem`` set, so the
    other rows are still analysed.

    Raises:
        DataError: naming the CSV when it cannot be read as a manifest or has no ``path`` column.
    """
    p = Path(path)
    base = p.resolve().parent
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(p, f"could not be read as a CSV manifest ({exc})") from exc
    if "path" not in columns:
        raise DataError(
            p, "has no 'path' column; a manifest for predict/explain has a path column and optionally mask or box"
        )
    items = []
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header is line 1)
        raw = (row.get("path") or "").strip()
        if not raw:
            items.append(InputItem(f"{p}:{i}", problem=f"{p.name} line {i}: empty path"))
            continue
        mask = (row.get("mask") or "").strip() or None
        box_text = (row.get("box") or "").strip()
        if not box_text and all((row.get(k) or "").strip() for k in ("x0", "y0", "x1", "y1")):
            box_text = ",".join(row[k].strip() for k in ("x0", "y0", "x1", "y1"))
        box, problem = None, None
        try:
            box = parse_box(box_text)
        except ValueError as exc:
            problem = f"{p.name} line {i}: {exc}"
        # Absolute paths stay absolute.
        ids = {k: (row.get(k) or "").strip() for k in ("lesion_id", "patient_id")}
        items.append(InputItem(str(base / raw), str(base / mask) if mask else None, box, problem, **ids))
    return items


def input_items(
    inputs: list[str],
    *,
    mask: str | None = None,
    box: tuple[float, float, float, float] | None = None,
    errors: list[tuple[str, str]] | None = None,
) -> list[InputItem]:
    """Files, folders and manifest CSVs -> :class:`InputItem` s. ``mask``/``box`` (for one image) apply to a single
    input; manifests carry their own.

    Raises:
        ValueError: when ``mask`` or ``box`` is given with more than one image.
        DataError: as :func:`expand_inputs` and :func:`read_input_manifest`.
    """
    items: list[InputItem] = []
    plain = []
    for item in inputs:
        if item.lower().endswith(".csv") and Path(item).is_file():
            items.extend(read_input_manifest(item))
        else:
            plain.append(item)
    n_errors = len(errors) if errors is not None else 0
    files = expand_inputs(plain, errors=errors)
    items.extend(InputItem(f) for f in files)
    if mask or box:
        if len(items) + (len(errors) - n_errors if errors is not None else 0) != 1:
            raise ValueError(
                "--mask and --box describe one image; give exactly one input with them, or a manifest CSV "
                "(path plus mask or box columns) for many"
            )
        items = [InputItem(items[0].path, mask, box)] if items else []
    return items


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
