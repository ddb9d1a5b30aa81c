"""``liverus predict``: probability of malignancy for files, folders and DICOM, to CSV or JSON.

Every input appears in the output: unreadable files get ``status=error`` and the problem, and are printed; the exit
code is 1 when any file failed (0 with ``--skip-bad``, which only acknowledges them — they are still listed).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from liverus.data.inputs import expand_inputs, parse_box
from liverus.data.io import DataError, read_image, read_mask
from liverus.engine.heatmaps import overlay, save_overlay
from liverus.engine.predictor import Predictor
from liverus.utils import atomic_write_json, atomic_write_text

__all__ = ["predict_files", "run_predict"]


def predict_files(
    predictor: Predictor,
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
                    "label": predictor.card.label(p),
                    "threshold": round(predictor.threshold, 6),
                    "model": predictor.name,
                    "error": "",
                }
                if heatmap_dir:
                    dest = Path(heatmap_dir) / f"{Path(f).stem}_gradcam.png"
                    save_overlay(dest, overlay(pp.image, predictor.heatmap(pp)))
                    row["heatmap"] = str(dest)
                rows.append(row)
        bar.update(len(chunk))
    bar.close()
    order = {f: i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["path"]])


def run_predict(args: argparse.Namespace) -> int:
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
