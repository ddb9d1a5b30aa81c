"""``liverus predict``: probability of malignancy for files, folders and DICOM, to CSV or JSON.

Every input appears in the output: unreadable files get ``status=error`` and the problem, and are printed; the exit
code is 1 when any file failed (0 with ``--skip-bad``, which only acknowledges them — they are still listed).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

import numpy as np

from liverus.data.io import DataError, is_image_file, read_image, read_mask

__all__ = ["expand_inputs", "parse_box", "predict_files", "run_predict"]


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


def predict_files(
    predictor,
    files: list[str],
    *,
    batch_size: int = 16,
    heatmap_dir: str | Path | None = None,
    mask: str | None = None,
    box: tuple[float, float, float, float] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Predict every file; returns one row per file (errors included)."""
    from tqdm import tqdm

    rows: list[dict] = []
    bar = tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        good, pre = [], []
        for f in chunk:
            try:
                img = read_image(f)
                lesion = read_mask(mask, img.shape) if mask else None
                pre.append(predictor.prepare(img, lesion=lesion, box=box))
                good.append(f)
            except (DataError, ValueError) as exc:
                problem = exc.problem if isinstance(exc, DataError) else str(exc)
                rows.append({"path": f, "status": "error", "error": problem})
        if pre:
            probs = predictor.probabilities(pre)
            for f, p, pp in zip(good, probs, pre, strict=True):
                row = {
                    "path": f,
                    "status": "ok",
                    "p_malignant": round(float(p), 6),
                    "label": predictor.classes[int(p >= predictor.threshold)],
                    "threshold": round(predictor.threshold, 6),
                    "model": predictor.name,
                    "error": "",
                }
                if heatmap_dir:
                    from liverus.explain import overlay, save_overlay

                    dest = Path(heatmap_dir) / f"{Path(f).stem}_gradcam.png"
                    save_overlay(dest, overlay(pp.image, predictor.heatmap(pp)))
                    row["heatmap"] = str(dest)
                rows.append(row)
        bar.update(len(chunk))
    bar.close()
    order = {f: i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["path"]])


def run_predict(args: argparse.Namespace) -> int:
    from liverus.inference import Predictor
    from liverus.utils import atomic_write_json, atomic_write_text

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {out.name}")
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out (results are never overwritten)")
    files = expand_inputs(args.inputs)
    box = parse_box(args.box)
    if (args.mask or box) and len(files) != 1:
        raise ValueError("--mask and --box describe one image; give exactly one input with them")
    predictor = Predictor.from_path(args.model)
    if args.heatmaps and predictor.model is None:
        raise ValueError("--heatmaps needs the PyTorch model.pt; ONNX exports carry no gradients")
    rows = predict_files(
        predictor, files, batch_size=args.batch_size, heatmap_dir=args.heatmaps, mask=args.mask, box=box
    )
    if out.suffix.lower() == ".json":
        atomic_write_json(out, {"model": predictor.name, "backend": predictor.backend, "predictions": rows})
    else:
        cols = ["path", "status", "p_malignant", "label", "threshold", "model", "error"]
        if args.heatmaps:
            cols.append("heatmap")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out, buf.getvalue())
    bad = [r for r in rows if r["status"] == "error"]
    ok = len(rows) - len(bad)
    print(f"{ok} image(s) predicted, {len(bad)} failed -> {out}")
    for r in bad:
        print(f"  failed: {r['path']}: {r['error']}", file=sys.stderr)
    probs = [r["p_malignant"] for r in rows if r["status"] == "ok"]
    if probs:
        print(
            f"  p(malignant): mean {np.mean(probs):.3f}, {sum(p >= predictor.threshold for p in probs)} above the "
            f"threshold {predictor.threshold:.3f}"
        )
    return 1 if bad and not args.skip_bad else 0
