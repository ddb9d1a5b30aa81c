"""``liverus predict``: probability of malignancy for files, folders and DICOM, to CSV or JSON.

Every input appears in the output: unreadable files, missing paths and empty folders get ``status=error`` and the
problem, and are printed; the exit code is 1 when any input failed (0 with ``--skip-bad``, which only acknowledges
them: they are still listed). Where the results and heatmaps go is checked before any work starts, and nothing is
overwritten.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

import numpy as np

from liverus.data.inputs import InputItem, input_items, parse_box
from liverus.data.io import DataError, printable, read_image, read_mask
from liverus.engine.heatmaps import save_overlay
from liverus.engine.predictions import Predictions
from liverus.engine.predictor import Predictor
from liverus.evaluation.aggregate import LEVELS, aggregate_predictions
from liverus.utils import atomic_write_json, atomic_write_text, check_new_file

__all__ = ["predict_files", "heatmap_names", "run_predict", "COLUMNS", "THREE_CLASS_COLUMNS", "columns"]

COLUMNS = ["path", "status", "p_malignant", "label", "threshold", "operating_points", "lesion_source", "model", "error"]
# A three-class model's rows: every class's probability and the most probable class (no threshold, no operating
# points: they are the binary model's).
THREE_CLASS_COLUMNS = [
    "path",
    "status",
    "p_normal",
    "p_benign",
    "p_malignant",
    "label",
    "lesion_source",
    "model",
    "error",
]


def columns(predictor: Predictor) -> list[str]:
    """The CSV columns of ``predictor``'s rows (before the optional ones)."""
    return THREE_CLASS_COLUMNS if predictor.is_three_class else COLUMNS


def heatmap_names(files: list[str], folder: str | Path, method: str = "gradcam") -> dict[str, Path]:
    """One heatmap file per input, never two for the same name: ``STEM_METHOD.png``, or, where stems collide
    (``a/scan.png`` and ``b/scan.png``), the path below the inputs' common folder joined with ``__``."""
    folder = Path(folder)
    stems: dict[str, int] = {}
    for f in files:
        stems[Path(f).stem] = stems.get(Path(f).stem, 0) + 1
    common = Path(_common_parent(files))
    names = {}
    for f in files:
        p = Path(f)
        if stems[p.stem] == 1:
            names[f] = folder / f"{p.stem}_{method}.png"
        else:
            rel = p.resolve().relative_to(common) if common != Path() else p
            names[f] = folder / ("__".join(rel.with_suffix("").parts) + f"_{method}.png")
    return names


def _chart_name(heatmap: Path) -> Path:
    """Where a feature model's contributions chart goes beside its map: ``STEM_features.png``."""
    return heatmap.with_name(heatmap.name.rsplit("_", 1)[0] + "_features.png")


def _common_parent(files: list[str]) -> str:
    try:
        return os.path.commonpath([str(Path(f).resolve().parent) for f in files]) if files else ""
    except ValueError:  # different drives
        return ""


def predict_files(
    predictor: Predictor,
    items: list[InputItem],
    *,
    batch_size: int = 16,
    heatmaps: dict[str, Path] | None = None,
    method: str = "default",
    progress: bool = True,
) -> list[dict]:
    """Predict every item (an image and, for lesion models, its mask or box); returns one row per item (errors
    included), in input order. Rows of feature models carry ``contributions``: each feature group's Shapley
    contribution to the log-odds of malignancy (:mod:`liverus.engine.contributions`).

    Args:
        heatmaps: destination of each file's map figure (see :func:`heatmap_names`), or None. For feature models
            the contributions chart goes beside it (``STEM_features.png``).
        method: the map drawn (:meth:`~liverus.engine.predictor.Predictor.check_method`).
    """
    from tqdm import tqdm

    rows: dict[int, dict] = {}
    bar = tqdm(total=len(items), unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(items), batch_size):
        good, pre, originals = [], [], []
        for i in range(start, min(start + batch_size, len(items))):
            item = items[i]
            if item.problem:
                rows[i] = _error_row(item.path, item.problem)
                continue
            try:
                img = read_image(item.path)
                lesion = read_mask(item.mask, img.shape) if item.mask else None
                pre.append(predictor.prepare(img, lesion=lesion, box=item.box))
                originals.append(img)
                good.append(i)
            except (DataError, ValueError) as exc:
                rows[i] = _error_row(item.path, exc.problem if isinstance(exc, DataError) else str(exc))
        if pre:
            scored = _score(predictor, pre)
            for i, (pp, img, (probs, share, problem)) in zip(good, zip(pre, originals, scored, strict=True),
                                                             strict=True):  # fmt: skip
                if problem is not None:
                    rows[i] = _error_row(items[i].path, problem)
                    continue
                item = items[i]
                p = float(probs[-1])
                source = pp.lesion_source if predictor.needs_lesion else "not used (whole image)"
                row = {"path": printable(item.path), "status": "ok", **_answer(predictor, probs),
                       "lesion_source": source, "model": predictor.name, "error": "", "lesion_id": item.lesion_id,
                       "patient_id": item.patient_id}  # fmt: skip
                if share is not None:
                    row["contributions"] = share
                if heatmaps is not None:
                    fig = predictor.heatmap_figure(pp, img, p, method, lesion_source=source)
                    dest = heatmaps[item.path]
                    row["heatmap"] = str(save_overlay(dest, fig))
                    if share is not None:
                        chart = predictor.contributions_chart(pp, p)[1]
                        save_overlay(_chart_name(dest), chart)
                rows[i] = row
        bar.update(min(batch_size, len(items) - start))
    bar.close()
    return [rows[i] for i in range(len(items))]


def _answer(predictor: Predictor, probs: np.ndarray) -> dict:
    """A row's answer from one image's class probabilities: the probability of malignancy, the label at the stored
    threshold and the operating points it reaches; for a three-class model every class's probability and the most
    probable class."""
    p = float(probs[-1])
    if predictor.is_three_class:
        answer = {f"p_{name}": round(float(q), 6) for name, q in zip(predictor.classes, probs, strict=True)}
        return {**answer, "label": predictor.label_of(probs)}
    return {
        "p_malignant": round(p, 6),
        "label": predictor.card.label(p),
        "threshold": round(predictor.threshold, 6),
        # The named operating points this probability reaches (rule_out, youden, rule_in).
        "operating_points": ";".join(predictor.card.crossed(p)),
    }


def _score(predictor: Predictor, pre: list) -> list[tuple[np.ndarray | None, dict | None, str | None]]:
    """``(class probabilities, contributions, problem)`` per prepared image. A batch is scored at once; when the
    model refuses one of its images (a lesion too small for radiomics, say), each is scored alone, so that only that
    image gets the error and the others their answers."""

    def batch(part: list) -> list[tuple[np.ndarray, dict | None, None]]:
        probs = predictor.class_probabilities(part)
        shares = predictor.contributions(part).as_dicts() if predictor.has_contributions else [None] * len(part)
        return [(p, s, None) for p, s in zip(probs, shares, strict=True)]

    try:
        return batch(pre)
    except (DataError, ValueError) as exc:
        if len(pre) == 1:
            return [(None, None, exc.problem if isinstance(exc, DataError) else str(exc))]
    return [answer for one in pre for answer in _score(predictor, [one])]


def aggregated_rows(rows: list[dict], predictor: Predictor) -> dict[str, list[dict]]:
    """One row per lesion and per patient (``liverus.evaluation.aggregate``: a lesion's probability is the mean
    log-odds of its images, a patient's the highest of their lesions'), from the images answered; empty where the
    inputs name no lesions (patients)."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok or predictor.is_three_class:  # a lesion's or patient's answer is a probability of malignancy
        return {}
    p = np.array([r["p_malignant"] for r in ok])
    meta = [{"lesion_id": r.get("lesion_id", ""), "patient_id": r.get("patient_id", "")} for r in ok]
    pr = Predictions([r["path"] for r in ok], np.zeros(len(ok), int), p, np.zeros(len(ok), int), meta)
    out = {}
    for level in LEVELS:
        agg = aggregate_predictions(pr, level, predictor.threshold)
        if agg is None:
            continue
        out[level] = [
            {
                level: key.split(":", 1)[1].removeprefix("/") if level == "lesion" else key.split(":", 1)[1],
                "patient_id": m["patient_id"],
                "n_images": int(m["n_images"]),
                "n_lesions": int(m["n_lesions"]),
                "p_malignant": round(float(q), 6),
                "label": predictor.card.label(q),
                "operating_points": ";".join(predictor.card.crossed(q)),
            }
            for key, q, m in zip(agg.paths, agg.p, agg.meta, strict=True)
        ]
    return out


def _error_row(path: str, problem: str) -> dict:
    return {"path": printable(path), "status": "error", "error": problem}


def run_predict(args: argparse.Namespace) -> int:
    """``liverus predict``: check where everything goes, predict every input, write the results (and the per-lesion
    and per-patient files) and print a summary. Returns: the exit code (1 when an input failed, unless
    ``--skip-bad``)."""
    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {out.name}")
    check_new_file(out, "--out")
    box = parse_box(args.box)
    input_errors: list[tuple[str, str]] = []
    items = input_items(args.inputs, mask=args.mask, box=box, errors=input_errors)
    predictor = Predictor.from_path(args.model, segmenter=args.segmenter, box_average=args.box_average)
    heatmaps = None
    method = getattr(args, "heatmap_method", "default")
    if args.heatmaps:
        heatmaps, method = _heatmap_files(args.heatmaps, predictor, [it.path for it in items], method)
    ids = any(it.lesion_id or it.patient_id for it in items) and not predictor.is_three_class
    siblings = {level: out.with_name(f"{out.stem}_{level}s.csv") for level in LEVELS} if ids else {}
    if out.suffix.lower() == ".csv":
        for level, path in siblings.items():
            check_new_file(path, f"--out's per-{level} file")
    rows = [_error_row(p, q) for p, q in input_errors] + predict_files(
        predictor, items, batch_size=args.batch_size, heatmaps=heatmaps, method=method
    )
    grouped = aggregated_rows(rows, predictor) if ids else {}
    if out.suffix.lower() == ".json":
        _write_json(out, predictor, rows, grouped)
    else:
        extra = ["lesion_id", "patient_id"] if ids else []
        extra += ["contributions"] if predictor.has_contributions else []
        extra += ["heatmap"] if heatmaps is not None else []
        _write_csv(out, rows, columns(predictor) + extra, grouped, siblings)
    _print_summary(out, rows, grouped, siblings, predictor)
    bad = [r for r in rows if r["status"] == "error"]
    return 1 if bad and not args.skip_bad else 0


def _heatmap_files(
    folder: str | Path, predictor: Predictor, files: list[str], method: str
) -> tuple[dict[str, Path], str]:
    """Each file's map destination in ``folder`` (made here), checked before any work: a PyTorch model, a folder
    that is not a file, a map the model can draw, and no map or contributions chart already there.

    Returns:
        ``(the destinations, the map method the model draws for method)``.

    Raises:
        ValueError: naming what is wrong.
    """
    if not predictor.methods:
        raise ValueError("--heatmaps needs the PyTorch model.pt (ONNX exports carry no maps)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--heatmaps {folder} is a file; give a folder")
    method = predictor.check_method(method)
    heatmaps = heatmap_names(files, folder, method)
    charts = [_chart_name(p) for p in heatmaps.values()] if predictor.has_contributions else []
    taken = [str(p) for p in [*heatmaps.values(), *charts] if p.exists()]
    if taken:
        raise ValueError(f"{len(taken)} heatmap file(s) already exist, first: {taken[0]}; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    return heatmaps, method


def _write_json(out: Path, predictor: Predictor, rows: list[dict], grouped: dict[str, list[dict]]) -> None:
    """One JSON file: the model, its operating points with their expected rates, every row and the grouped ones."""
    points = {
        name: {"threshold": t, **predictor.card.operating_point_rates.get(name, {})}
        for name, t in predictor.card.operating_points.items()
    }
    atomic_write_json(
        out,
        {
            "model": predictor.name,
            "backend": predictor.backend,
            "classes": list(predictor.classes),
            "operating_points": points,
            "predictions": rows,
            **{f"{level}s": v for level, v in grouped.items()},
        },
    )


def _write_csv(
    out: Path, rows: list[dict], fields: list[str], grouped: dict[str, list[dict]], siblings: dict[str, Path]
) -> None:
    """The rows as CSV (the columns ``fields``), and each level's grouped rows in its sibling file."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    # One cell per image: "group=+0.41;group=-0.12", largest magnitude first.
    w.writerows(
        {**r, "contributions": ";".join(f"{k}={v:+.4f}" for k, v in r["contributions"].items())}
        if "contributions" in r
        else r
        for r in rows
    )
    atomic_write_text(out, buf.getvalue())
    for level, answers in grouped.items():
        sub = io.StringIO()
        w = csv.DictWriter(sub, fieldnames=list(answers[0]))
        w.writeheader()
        w.writerows(answers)
        atomic_write_text(siblings[level], sub.getvalue())


def _print_summary(
    out: Path, rows: list[dict], grouped: dict[str, list[dict]], siblings: dict[str, Path], predictor: Predictor
) -> None:
    """What was written where, each failed input (on stderr) and the spread of the probabilities."""
    for level, answers in grouped.items():
        print(f"{len(answers)} {level}(s): one answer each (mean log-odds of a lesion's images; a patient's highest "
              f"lesion){' -> ' + printable(siblings[level]) if out.suffix.lower() == '.csv' else ''}")  # fmt: skip
    bad = [r for r in rows if r["status"] == "error"]
    print(f"{len(rows) - len(bad)} image(s) predicted, {len(bad)} failed -> {printable(out)}")
    for r in bad:
        print(f"  failed: {r['path']}: {r['error']}", file=sys.stderr)
    probs = [r["p_malignant"] for r in rows if r["status"] == "ok"]
    if probs and predictor.is_three_class:
        labels = [r["label"] for r in rows if r["status"] == "ok"]
        print("  most probable class: " + ", ".join(f"{c} {labels.count(c)}" for c in predictor.classes))
    elif probs:
        print(
            f"  p(malignant): mean {np.mean(probs):.3f}, {sum(p >= predictor.threshold for p in probs)} above the "
            f"threshold {predictor.threshold:.3f}"
        )
