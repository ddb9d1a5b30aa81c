"""Case tables: which images there are, their labels, groups (patient / scan) and masks.

Three sources, one result (a list of :class:`Case`):

* a folder per class (``benign/``, ``malignant/``, optionally ``normal/``) with optional masks in a parallel
  ``masks/`` tree, beside the image with a ``_mask`` suffix, or in a ``masks/`` sub-folder of the class folder
  (beside the images or beside an ``images/`` sub-folder); further outlines of the same image as ``_mask_1``,
  ``_mask_2``, ... (the layout of the common public breast-ultrasound release) are masks of that image too;
* a CSV manifest ``path,label[,group][,mask][,box][,...]``; a ``box`` (``x0,y0,x1,y1`` in pixels, or four columns
  ``x0``, ``y0``, ``x1``, ``y1``) gives the lesion of an image without a mask, as a user gives it at inference;
  extra columns are kept as metadata for subgroup analysis;
* the AUL dataset, either its public release layout (``Benign/image/*.jpg`` + ``segmentation/mass/*.json``) or the
  compact copy with ``manifest.csv`` (``../shared/data/aul``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from liverus.data.io import DataError, is_image_file

__all__ = [
    "Case",
    "CLASS_SETS",
    "load_cases",
    "cases_from_folder",
    "cases_from_manifest",
    "cases_from_aul_release",
    "select_task",
    "write_manifest",
    "any_box_only",
    "lesion_source_counts",
]

CLASS_SETS = {
    "binary": ("benign", "malignant"),
    "three_class": ("normal", "benign", "malignant"),
}
KNOWN_LABELS = {"benign", "malignant", "normal"}


@dataclass
class Case:
    """One image.

    Attributes:
        path: absolute image path.
        label: ``benign``, ``malignant`` or ``normal``.
        group: patient or scan id; cases sharing it always land on the same side of a split.
        mask: lesion mask path, if any.
        extra_masks: further outlines of lesions in the same image; the lesion mask is the union of all of them.
        polygon: lesion polygon in image pixels (AUL release import), used when there is no mask file.
        box: lesion box ``(x0, y0, x1, y1)`` in image pixels, used when there is no mask or polygon: the lesion then
            comes from the box as at inference (GrabCut's outline inside it, ``data.box_mask``).
        meta: any other manifest columns (kept as strings).
    """

    path: str
    label: str
    group: str = ""
    mask: str | None = None
    extra_masks: tuple[str, ...] = ()
    polygon: list[list[float]] | None = None
    box: tuple[float, float, float, float] | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def lesion_source(self) -> str:
        """Where the case's lesion comes from: ``mask`` (a mask file or polygon), ``box`` (a box alone) or ``none``."""
        if self.mask or self.extra_masks or self.polygon:
            return "mask"
        return "box" if self.box is not None else "none"

    @property
    def group_key(self) -> str:
        """The split group: ``group``, or the image path when it has none (its own group)."""
        return self.group or f"__own__:{self.path}"


def any_box_only(cases: list[Case]) -> bool:
    """Whether some case gives its lesion by a box alone (it is then scored averaged over boxes, as at inference)."""
    return any(c.lesion_source == "box" for c in cases)


def lesion_source_counts(cases: list[Case]) -> dict[str, int]:
    """How many cases give their lesion by a ``mask``, a ``box`` alone, or ``none`` (what runs and reports say)."""
    return dict(Counter(c.lesion_source for c in cases if c.label != "normal"))


def _check_cases(cases: list[Case], source: Path) -> list[Case]:
    if not cases:
        raise DataError(source, "no images found")
    counts = Counter(c.path for c in cases)
    dups = sorted(p for p, n in counts.items() if n > 1)
    if dups:
        raise DataError(source, f"duplicate image paths ({len(dups)}), first: {dups[0]}")
    return cases


MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<n>\d+))?$")
# Inside a class folder, masks may sit in a sub-folder of these names beside the images (or beside an images/
# sub-folder of the names below): a common layout of public ultrasound datasets.
MASK_FOLDERS = {"mask", "masks", "label", "labels", "annotation", "annotations", "segmentation", "segmentations"}
IMAGE_FOLDERS = {"image", "images", "img", "imgs"}


def _find_masks_for(img: Path, root: Path, siblings: list[Path]) -> tuple[str | None, tuple[str, ...]]:
    """The image's mask (parallel ``masks/`` tree or ``_mask`` sibling) and its further ``_mask_N`` siblings."""
    rel = img.relative_to(root)
    numbered = tuple(str(p) for p in sorted(siblings, key=lambda q: q.name))
    first = None
    for cand in (
        root / "masks" / rel,
        root / "masks" / rel.with_suffix(".png"),
        img.with_name(f"{img.stem}_mask{img.suffix}"),
        img.with_name(f"{img.stem}_mask.png"),
    ):
        if cand.is_file():
            first = str(cand)
            break
    extra = tuple(p for p in numbered if p != first)
    if first is None and extra:
        first, extra = extra[0], extra[1:]
    return first, extra


def _scan_class_folder(folder: Path, ignored: list[tuple[str, str]]) -> tuple[list[Path], dict[Path, list[Path]]]:
    """Image files and masks (keyed by their image's folder / stem) under ``folder``; everything else goes to
    ``ignored``.

    ``os.walk`` does not follow links to folders, so link loops cannot trap the scan; links to files are checked.
    """
    images: list[Path] = []
    masks: dict[Path, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in sorted(dirnames):
            if (Path(dirpath) / d).is_symlink():
                ignored.append((str(Path(dirpath) / d), "symbolic link to a folder (not followed)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                ignored.append((str(p), "dangling symbolic link"))
                continue
            except OSError as exc:
                ignored.append((str(p), f"cannot be opened ({exc.strerror or exc})"))
                continue
            if not stat.S_ISREG(st.st_mode):
                ignored.append((str(p), "not a regular file (a FIFO, socket or device)"))
                continue
            if not is_image_file(p):
                ignored.append((str(p), f"not an image or DICOM file ({p.suffix or 'no extension'})"))
                continue
            m = MASK_NAME.match(p.stem)
            if Path(dirpath).name.lower() in MASK_FOLDERS and Path(dirpath) != folder:
                # class/masks/x.png (or x_mask.png) is the mask of class/x.png or class/images/x.png.
                masks.setdefault(p.parent.parent / (m.group("stem") if m else p.stem), []).append(p)
            elif m:
                masks.setdefault(p.parent / m.group("stem"), []).append(p)
            else:
                images.append(p)
    return images, masks


def _mask_key(img: Path) -> Path:
    """Where an image's masks are keyed: its folder and stem, or for ``class/images/x.png`` the folder above, where
    a sibling ``masks/`` folder keys them."""
    return (img.parent.parent if img.parent.name.lower() in IMAGE_FOLDERS else img.parent) / img.stem


def cases_from_folder(root: str | os.PathLike, *, ignored: list[tuple[str, str]] | None = None) -> list[Case]:
    """Read a folder with one sub-folder per class.

    Args:
        root: the folder.
        ignored: if given, receives ``(path, reason)`` for every file that is not used (other formats, dangling
            links, link loops, FIFOs), so that callers can list them.

    Raises:
        DataError: if the folder has no class sub-folders or no images, or holds an unknown class folder.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(root, "folder does not exist")
    ignored = [] if ignored is None else ignored
    cases: list[Case] = []
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name != "masks" and not d.name.startswith(".")]
    if not class_dirs:
        raise DataError(root, "empty folder: expected sub-folders benign/, malignant/ (and optionally normal/)")
    for d in class_dirs:
        label = d.name.lower()
        if label not in KNOWN_LABELS:
            raise DataError(d, f"unknown class folder {d.name!r}; expected one of {sorted(KNOWN_LABELS)}")
        images, masks = _scan_class_folder(d, ignored)
        for img in images:
            keys = dict.fromkeys([img.parent / img.stem, _mask_key(img)])  # one or two places, in order
            mask, extra = _find_masks_for(img, root, [m for key in keys for m in masks.get(key, [])])
            cases.append(Case(str(img), label, mask=mask, extra_masks=extra))
        stems = {img.parent / img.stem for img in images} | {_mask_key(img) for img in images}
        ignored += [(str(p), "mask without its image") for key, ps in masks.items() if key not in stems for p in ps]
    return _check_cases(cases, root)


BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def _row_box(row: dict, manifest: Path, lineno: int) -> tuple[float, float, float, float] | None:
    """A manifest row's lesion box: its ``box`` cell or its four ``x0``..``y1`` cells; None when empty."""
    from liverus.data.inputs import parse_box

    text = (row.get("box") or "").strip()
    if not text and all((row.get(k) or "").strip() for k in BOX_COLUMNS):
        text = ",".join(row[k].strip() for k in BOX_COLUMNS)
    try:
        box = parse_box(text)
    except ValueError as exc:
        raise DataError(manifest, f"line {lineno}: {exc}") from exc
    if box is not None and not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(manifest, f"line {lineno}: the box {text!r} is empty (x1 must exceed x0 and y1 exceed y0)")
    return box


def cases_from_manifest(manifest: str | os.PathLike) -> list[Case]:
    """Read a CSV manifest with columns ``path,label`` and optional ``group``, ``mask``, ``box`` and metadata
    columns.

    Relative paths are resolved against the manifest's folder. For the AUL compact copy the ``near_dup_group``
    column is the group and ``mass_mask`` the lesion mask. A row's ``box`` (or ``x0,y0,x1,y1`` columns) is its
    lesion where it has no mask.

    Raises:
        DataError: for a missing column, an unknown label, a malformed box, an empty table or duplicate paths.
    """
    manifest = Path(manifest).resolve()
    if not manifest.is_file():
        raise DataError(manifest, "manifest does not exist")
    base = manifest.parent
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = {"path", "label"} - set(cols)
        if missing:
            raise DataError(
                manifest,
                f"missing column(s) {sorted(missing)}; found {cols}. A manifest names each image in a 'path' column "
                "(relative to the CSV) and its class in a 'label' column (benign, malignant or normal); rename "
                "your columns to these",
            )
        group_col = "group" if "group" in cols else ("near_dup_group" if "near_dup_group" in cols else None)
        if group_col is None and "patient_id" in cols:
            group_col = "patient_id"
        if group_col is None and "lesion_id" in cols:  # a lesion's images stay on one side of a split
            group_col = "lesion_id"
        mask_col = "mask" if "mask" in cols else ("mass_mask" if "mass_mask" in cols else None)
        cases = []
        for lineno, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip().lower()
            if label not in KNOWN_LABELS:
                raise DataError(
                    manifest,
                    f"line {lineno}: unknown label {row.get('label')!r}; expected {sorted(KNOWN_LABELS)}",
                )
            raw = (row.get("path") or "").strip()
            if not raw:
                raise DataError(manifest, f"line {lineno}: empty path")
            path = (base / raw).resolve()
            group = (row.get(group_col) or "").strip() if group_col else ""
            if group_col == "near_dup_group" and not group and row.get("patient_id"):
                group = row["patient_id"].strip()
            mask_raw = (row.get(mask_col) or "").strip() if mask_col else ""
            box = _row_box(row, manifest, lineno)
            meta = {k: v for k, v in row.items() if k not in ("path", "label", "box") and k is not None}
            mask = str((base / mask_raw).resolve()) if mask_raw else None
            cases.append(Case(str(path), label, group, mask, box=box, meta=meta))
    return _check_cases(cases, manifest)


def cases_from_aul_release(root: str | os.PathLike) -> list[Case]:
    """Import the public AUL release layout: ``{Benign,Malignant,Normal}/image/N.jpg`` with
    ``{Class}/segmentation/mass/N.json`` lesion polygons (a JSON list of ``[x, y]`` points in image pixels).

    AUL has no patient ids, so every image is its own group unless a ``near_dup_group`` is supplied by a manifest.

    Raises:
        DataError: if no class folder with an ``image/`` sub-folder exists, or a polygon file is not valid JSON.
    """
    root = Path(root).resolve()
    cases: list[Case] = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        label = cls_dir.name.lower()
        if label not in KNOWN_LABELS or not (cls_dir / "image").is_dir():
            continue
        for img in sorted((cls_dir / "image").iterdir(), key=lambda p: (len(p.stem), p.stem)):
            if not is_image_file(img):
                continue
            poly = None
            pj = cls_dir / "segmentation" / "mass" / f"{img.stem}.json"
            if pj.is_file():
                try:
                    pts = json.loads(pj.read_text())
                except json.JSONDecodeError as exc:
                    raise DataError(pj, f"polygon file is not valid JSON ({exc})") from exc
                # Some exports wrap the single polygon in one more list.
                if pts and isinstance(pts[0], list) and pts[0] and isinstance(pts[0][0], list):
                    pts = pts[0]
                poly = [[float(x), float(y)] for x, y in pts]
            cases.append(Case(str(img), label, polygon=poly, meta={"source_file": f"{cls_dir.name}/image/{img.name}"}))
    if not cases:
        raise DataError(root, "no AUL release layout found (expected Benign/image/*.jpg, Malignant/image/*.jpg)")
    return _check_cases(cases, root)


def load_cases(source: str | os.PathLike, *, ignored: list[tuple[str, str]] | None = None) -> list[Case]:
    """Load cases from a manifest CSV, an AUL release folder, a folder with ``manifest.csv``, or a class-folder tree.

    Args:
        source: the data.
        ignored: if given, receives ``(path, reason)`` for files of a class-folder tree that are not used.
    """
    p = Path(source)
    if p.is_file():
        return cases_from_manifest(p)
    if not p.exists():
        raise DataError(p, "data path does not exist (give the data with --data PATH or data.source in the config)")
    if (p / "manifest.csv").is_file():
        return cases_from_manifest(p / "manifest.csv")
    subdirs = {d.name.lower() for d in p.iterdir() if d.is_dir()}
    if any((p / d / "image").is_dir() for d in os.listdir(p) if (p / d).is_dir() and d.lower() in KNOWN_LABELS):
        return cases_from_aul_release(p)
    if not subdirs:
        raise DataError(p, "empty folder: no class sub-folders and no manifest.csv")
    return cases_from_folder(p, ignored=ignored)


def select_task(cases: list[Case], task: str = "binary") -> tuple[list[Case], tuple[str, ...]]:
    """Keep the cases of a task's classes.

    Args:
        task: ``binary`` (benign vs malignant; normal images are excluded) or ``three_class``.

    Returns:
        ``(cases, classes)``; class index ``i`` is ``classes[i]`` (malignant is the last, the positive class).
    """
    if task not in CLASS_SETS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(CLASS_SETS)}")
    classes = CLASS_SETS[task]
    return [c for c in cases if c.label in classes], classes


def write_manifest(cases: list[Case], path: str | os.PathLike) -> None:
    """Write cases as a manifest CSV (paths relative to the manifest's folder where possible)."""
    from liverus.utils import atomic_write_text

    path = Path(path)
    meta_cols = sorted({k for c in cases for k in c.meta if k not in ("group", "mask", "box")})
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    with_box = any(c.box is not None for c in cases)
    w.writerow(["path", "label", "group", "mask", *(["box"] if with_box else []), *meta_cols])
    for c in cases:
        rel = os.path.relpath(c.path, path.parent.resolve())
        mrel = os.path.relpath(c.mask, path.parent.resolve()) if c.mask else ""
        box = [",".join(f"{v:g}" for v in c.box) if c.box is not None else ""] if with_box else []
        w.writerow([rel, c.label, c.group, mrel, *box, *[c.meta.get(k, "") for k in meta_cols]])
    atomic_write_text(path, buf.getvalue())
