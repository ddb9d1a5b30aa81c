"""``MODEL_REPORT.md`` and ``model_card.json`` of a trained model, filled from what the run knows and mapped to the
reporting items of TRIPOD+AI (Collins et al., BMJ 2024) and CLAIM 2024 (Tejani et al., Radiology: AI 2024).

Nothing is invented: items that only a person can state (the clinical setting, the reference standard, ethics
approval, the intended population) are marked ``TO BE COMPLETED BY A PERSON``. (The typed metadata stored inside the
weights file is :class:`liverus.models.ModelCard`; this module reports on a whole run.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from liverus.data import check_disjoint, load_splits
from liverus.evaluation.rendering import render
from liverus.models import count_parameters, load_model
from liverus.utils import atomic_write_json, atomic_write_text, to_plain

__all__ = ["write_model_report", "PERSON"]

PERSON = "TO BE COMPLETED BY A PERSON"
KNOWN_SOURCES = {
    "aul": (
        "AUL (Annotated Ultrasound Liver images), Xu et al., https://doi.org/10.5281/zenodo.7272660; "
        "Briefings in Bioinformatics 24(1): bbac569, 2023, https://doi.org/10.1093/bib/bbac569",
        "CC BY 4.0",
    )
}


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(v, ci) -> str:
    return f"{_fmt(v)} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(v)


def write_model_report(run_dir: str | Path, metrics: dict, cases: list, data_summary: dict | None) -> Path:
    """Write ``MODEL_REPORT.md`` and ``model_card.json`` into a finished run folder.

    Args:
        run_dir: the run folder (``model.pt``, ``config.yaml``, ``splits.json``, ``provenance.json``).
        metrics: what the run report computed (``metrics.json``: per part evaluation, faithfulness, calibration).
        cases: the run's cases (for the group-disjointness check of its splits).
        data_summary: counts per class and the shortcut check (:func:`~liverus.evaluation.report.data_summary`).

    Returns:
        The Markdown file's path.
    """
    run = Path(run_dir)
    model, card = load_model(run / "model.pt")
    # Plain Python values only (metrics carry NumPy scalars), so that JSON and YAML both take them.
    items = to_plain(_report_items(run, model, card, metrics, cases, data_summary))
    atomic_write_json(run / "model_card.json", items)
    path = run / "MODEL_REPORT.md"
    atomic_write_text(path, render("model_report.md.j2", model_name=card.model_name, person=PERSON, items=items))
    return path


def _group_disjointness(splits: Path, split_bytes: bytes, cases: list) -> str:
    """The verdict of the group-disjointness check of the run's splits; a failed check is reported, not hidden."""
    if not split_bytes:
        return "not checked (no splits.json)"
    try:
        for fold in load_splits(splits, cases)["folds"]:
            check_disjoint(cases, fold)
    except Exception as exc:
        return f"FAILED: {exc}"
    return "passed: no group (patient / scan / near-duplicate group) is on two sides"


def _performance(metrics: dict) -> dict:
    """Each evaluated part (validation, test) with its intervals, as text for the report."""
    performance = {}
    for part, ev in ((k, v) for k, v in metrics.items() if k in ("val", "test")):
        m, b = ev["metrics"], ev["ci95_bootstrap"]
        performance[part] = {
            "n": ev["n"],
            "n_malignant": ev["n_malignant"],
            "auc": _ci(ev["auc_delong"]["auc"], ev["auc_delong"]["ci95"]),
            "sensitivity": _ci(m["sensitivity"], b.get("sensitivity")),
            "specificity": _ci(m["specificity"], b.get("specificity")),
            "ece": _fmt(ev["calibration"].get("ece")),
            "brier": _fmt(ev["calibration"].get("brier")),
            "calibration_slope": _fmt(ev["calibration"].get("slope")),
            "calibration_intercept": _fmt(ev["calibration"].get("intercept")),
            "subgroups": ev.get("subgroups", {}),
        }
    return performance


def _known_failure_modes(card, shortcut: dict) -> list[str]:
    """What is known to make this model's probability wrong, from the shortcut check and how it reads its input."""
    return [
        (
            f"acquisition shortcut: image size and metadata alone predict malignancy with AUC "
            f"{_fmt(shortcut.get('auc'))}; check the subgroup table before trusting the overall AUC"
            if shortcut.get("auc") is not None
            else "acquisition shortcut: not checked"
        ),
        "lesion-ROI models need a lesion box or mask at inference; a box far from the lesion gives a meaningless "
        "probability"
        if card.preprocess is not None and card.preprocess.crop == "roi"
        else "whole-image model: burned-in text and annotations inside the scan area are not removed",
        f"external validation: {PERSON}",
    ]


def _report_items(run: Path, model, card, metrics: dict, cases: list, data_summary: dict | None) -> dict:
    """Every reporting item, keyed by its name and the TRIPOD+AI / CLAIM items it answers."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    prov = json.loads((run / "provenance.json").read_text()) if (run / "provenance.json").is_file() else {}
    split_bytes = (run / "splits.json").read_bytes() if (run / "splits.json").is_file() else b""
    source = str(cfg["data"]["source"] or "built-in synthetic phantom (liverus.data.phantom)")
    known = next((v for k, v in KNOWN_SOURCES.items() if k in source.lower()), None)
    wi = model.weights_info
    shortcut = (data_summary or {}).get("shortcut") or {}
    return {
        "title_and_version (TRIPOD+AI 1; CLAIM 1)": f"{card.model_name}, liverus {card.version}",
        "intended_use (TRIPOD+AI 3c, 27; CLAIM 3)": (
            "Research software: estimate whether a focal liver lesion on a B-mode ultrasound image is malignant, as "
            "decision support read by a radiologist. Not a medical device; not for diagnosis on its own. "
            f"Clinical setting and intended population: {PERSON}."
        ),
        "data_source (TRIPOD+AI 5a; CLAIM 7)": source + (f" ({known[0]})" if known else ""),
        "data_licence": known[1] if known else PERSON,
        "eligibility (TRIPOD+AI 5b, 20a; CLAIM 8)": (
            f"task {card.task}: classes {', '.join(card.classes)}; other labels excluded. Files that could not be "
            f"read: {'listed in skipped.json' if (run / 'skipped.json').is_file() else 'none'}."
        ),
        "counts (TRIPOD+AI 20b; CLAIM 21)": (data_summary or {}).get("counts", {}),
        "reference_standard (TRIPOD+AI 6a; CLAIM 14-16)": f"labels as given by the data source; {PERSON}",
        "ethics_and_consent (TRIPOD+AI 9)": PERSON,
        "preprocessing (CLAIM 9, 10)": {**vars(card.preprocess), "normalization": list(card.normalization)}
        if card.preprocess
        else "none recorded",
        "model (TRIPOD+AI 12c; CLAIM 17-19)": {
            "architecture": card.model_name,
            "members": card.members,
            "parameters": count_parameters(model),
            "input_channels": card.in_chans,
            # What rebuilds the model from its file (views, lesion_size, flip_features, ...): the input it expects.
            "build_arguments": dict(getattr(model, "build_kwargs", {}) or {}),
            "weights": {"kind": wi.kind, "source": wi.source, "sha256": wi.sha256 or "n/a"},
            "model_file_sha256": hashlib.sha256((run / "model.pt").read_bytes()).hexdigest(),
        },
        "training (TRIPOD+AI 12d, 12e; CLAIM 22-25)": {
            "config": cfg,
            "seed": prov.get("seed", cfg.get("runtime", {}).get("seed")),
            "splits_sha256": hashlib.sha256(split_bytes).hexdigest() if split_bytes else "n/a",
            "group_disjointness_check": _group_disjointness(run / "splits.json", split_bytes, cases),
            "packages": prov.get("packages", {}),
            "git_commit": prov.get("git_commit", "unknown"),
            "tree_was_dirty": str(prov.get("git_commit", "")).endswith("-dirty"),
        },
        "operating_points (TRIPOD+AI 12f)": {
            "label_threshold": card.threshold,
            "how": card.threshold_method,
            "named": card.operating_points,
            "expected_on_new_cases": card.operating_point_rates,
            "precision": card.precision,
        },
        "performance_with_95pct_intervals (TRIPOD+AI 23a; CLAIM 29-32)": _performance(metrics),
        "heatmap_faithfulness (CLAIM 33)": metrics.get("faithfulness", {}),
        "known_failure_modes (TRIPOD+AI 26; CLAIM 38)": _known_failure_modes(card, shortcut),
    }
