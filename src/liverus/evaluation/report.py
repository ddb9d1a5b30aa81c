"""Self-contained HTML reports (figures embedded) plus ``metrics.json`` and per-case predictions.

* :func:`report_for_run`: after ``liverus train`` (validation, and test when the run had one);
* :func:`evaluate_checkpoint`: ``liverus evaluate`` on any labelled data with a model's stored threshold;
* the ``liverus cv`` / ``compare`` reports (pooled out-of-fold results, paired tests, per-fold spread) are built in
  :mod:`liverus.evaluation.study` from the helpers here.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from liverus.data import (
    CaseCache,
    UltrasoundDataset,
    any_box_only,
    box_variants,
    lesion_source_counts,
    load_cases,
    load_task_cases,
    prepare_cases,
    select_task,
)
from liverus.engine.forward import average_probabilities, eval_batch_size, predict_probs
from liverus.engine.predictions import Predictions, read_predictions, write_predictions
from liverus.engine.runtime import inference_amp
from liverus.evaluation.aggregate import LEVELS, aggregate_predictions
from liverus.evaluation.analysis import evaluate_binary
from liverus.evaluation.faithfulness import (
    deletion_insertion_for_model,
    faithfulness_for_model,
    summarize_deletion_insertion,
)
from liverus.evaluation.model_card import write_model_card
from liverus.models import load_model
from liverus.utils import STAGES, atomic_write_json, atomic_write_text

__all__ = [
    "report_for_run",
    "cases_of_run",
    "default_subgroups",
    "data_html",
    "img_html",
    "table_html",
    "subgroup_html",
    "faithfulness_html",
    "deletion_insertion_html",
    "figures_html",
    "evaluate_checkpoint",
    "render_report",
    "data_summary",
    "fmt",
    "metrics_table_html",
]

DISCLAIMER = (
    "Research software. Not a medical device and not a diagnosis: results must be interpreted by a "
    "qualified radiologist together with all clinical information."
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f3f5f7}td:first-child,th:first-child{text-align:left}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:.9em}.figs img{max-width:48%;margin:.3em;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
"""


def fmt(x, digits: int = 3) -> str:
    """A number for a table; NaN/None become 'n/a'."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(v, ci) -> str:
    if ci is None or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in ci):
        return fmt(v)
    return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def img_html(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def table_html(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


METRIC_NAMES = [
    ("auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("f1", "F1"),
    ("mcc", "MCC"),
]


def metrics_table_html(evals: dict[str, dict]) -> str:
    """One column per model: every metric with its 95% bootstrap interval (AUC also with DeLong's)."""
    names = list(evals)
    rows = []
    for key, label in METRIC_NAMES:
        rows.append([label] + [_ci(evals[n]["metrics"][key], evals[n]["ci95_bootstrap"].get(key)) for n in names])
    rows.append(
        ["AUC, DeLong 95% CI"] + [_ci(evals[n]["auc_delong"]["auc"], evals[n]["auc_delong"]["ci95"]) for n in names]
    )
    rows.append(["ECE (10 bins)"] + [fmt(evals[n]["calibration"].get("ece")) for n in names])
    rows.append(["Brier score"] + [fmt(evals[n]["calibration"].get("brier")) for n in names])
    rows.append(["Calibration slope (1 = ideal)"] + [fmt(evals[n]["calibration"].get("slope")) for n in names])
    rows.append(["Calibration intercept (0 = ideal)"] + [fmt(evals[n]["calibration"].get("intercept")) for n in names])
    rows.append(
        ["Threshold"] + [fmt(evals[n]["threshold"]) if evals[n]["threshold"] is not None else "per fold" for n in names]
    )
    rows.append(
        ["Cases (malignant / benign)"]
        + [f"{evals[n]['n']} ({evals[n]['n_malignant']} / {evals[n]['n_benign']})" for n in names]
    )
    return table_html(["metric (95% CI)", *names], rows)


def subgroup_html(evals: dict[str, dict]) -> str:
    parts = []
    for name, ev in evals.items():
        for col, table in ev.get("subgroups", {}).items():
            rows = [
                [
                    val,
                    t["n"],
                    t["n_malignant"],
                    _ci(t["auc"], t["auc_ci95"]),
                    fmt(t["sensitivity"]),
                    fmt(t["specificity"]),
                    t["note"],
                ]
                for val, t in table.items()
            ]
            parts.append(
                f"<h3>{html.escape(name)}: by {html.escape(col)}</h3>"
                + table_html([col, "n", "malignant", "AUC [DeLong 95% CI]", "sensitivity", "specificity", ""], rows)
            )
    return "".join(parts)


def faithfulness_html(faith: dict[str, dict]) -> str:
    """Table of heatmap faithfulness per model (pointing game, energy inside the lesion, chance level)."""
    rows = []
    for name, f in faith.items():
        for method in ("gradcam", "attention"):
            r = f.get(method)
            if r:
                rows.append(
                    [name, method, r["n"], fmt(r["pointing_game"]), fmt(r["energy_inside"]), fmt(r["lesion_area"])]
                )
    if not rows:
        return ""
    below = [
        f"{name} ({method})"
        for name, f in faith.items()
        for method in ("gradcam", "attention")
        if f.get(method) and f[method]["energy_inside"] < f[method]["lesion_area"]
    ]
    warning = (
        f"<p><strong>Below chance:</strong> the heatmaps of {', '.join(below)} put less of their energy inside the "
        "lesion than a uniform map would (energy inside &lt; lesion area): they do not show that the model looked at "
        "the lesion, and should not be read as if they did.</p>"
        if below
        else ""
    )
    return (
        "<p>Against the experts' lesion masks: <i>pointing game</i> = share of heatmaps whose peak lies inside the "
        "lesion; <i>energy inside</i> = mean share of heatmap mass inside the lesion; <i>lesion area</i> = mean lesion "
        "share of the image, the chance level of energy inside.</p>"
        + table_html(["model", "heatmap", "cases", "pointing game", "energy inside", "lesion area"], rows)
        + warning
    )


def deletion_insertion_html(summary: dict[str, dict]) -> str:
    """Table of :func:`~liverus.evaluation.faithfulness.summarize_deletion_insertion`: each map against random maps."""
    rows = []
    for method, r in summary.items():
        low, high = r["margin_ci95"]
        rows.append([method, r["n"], f"{fmt(r['deletion'])} ({fmt(r['random_deletion'])})",
                     f"{fmt(r['insertion'])} ({fmt(r['random_insertion'])})",
                     f"{r['margin_over_random']:+.3f} [{low:+.3f}, {high:+.3f}]",
                     "yes" if r["beats_random"] else "<strong>no</strong>"])  # fmt: skip
    return (
        "<p>Each map's cells hidden (blurred) in the map's order: the probability of the predicted class should fall "
        "fast (<i>deletion</i>, lower is better) and, revealed from a hidden view, rise fast (<i>insertion</i>, "
        "higher is better); random maps of the same images in brackets. <i>Margin</i>: (insertion - deletion) over "
        "the random maps', with a 95% bootstrap interval over images; a map beats random when the interval's lower "
        "end is above 0.05. A map that does not should not be read as showing what drove the score.</p>"
        + table_html(
            ["map", "cases", "deletion (random)", "insertion (random)", "margin [95% CI]", "beats random"], rows
        )  # fmt: skip
    )


def data_summary(cases) -> dict:
    """Counts per class and the image-size shortcut check, for the report's data section."""
    from collections import Counter

    from liverus.data.audit import image_size, shortcut_check

    sizes = []
    for c in cases:
        try:
            sizes.append(image_size(c.path))
        except Exception:
            sizes.append((0, 0))
    return {
        "counts": dict(Counter(c.label for c in cases)),
        "n_groups": len({c.group_key for c in cases}),
        "shortcut": shortcut_check(cases, sizes),
    }


def data_html(summary: dict | None) -> str:
    if not summary:
        return ""
    rows = [[k, v] for k, v in sorted(summary["counts"].items())]
    out = table_html(["class", "images"], rows) + f"<p>{summary['n_groups']} groups (patients / scans).</p>"
    sc = summary.get("shortcut") or {}
    if sc.get("auc") is not None:
        out += (
            f"<p>Shortcut check: image size, aspect ratio and numeric metadata alone predict malignancy with "
            f"cross-validated AUC <b>{sc['auc']:.3f}</b> (0.5 = no shortcut).</p>"
        )
        if sc.get("warning"):
            out += f'<div class="warn">{html.escape(sc["warning"])}</div>'
    return out


def render_report(path: Path, title: str, sections: list[tuple[str, str]], subtitle: str = "") -> Path:
    """Write a self-contained HTML page from ``(heading, html)`` sections."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{c}" for h, c in sections if c)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='note'>{html.escape(subtitle)}"
        f"</p><div class='warn'>{html.escape(DISCLAIMER)}</div>{body}</body></html>"
    )
    atomic_write_text(path, page)
    return path


def figures_html(
    preds: dict[str, Predictions],
    evals: dict[str, dict],
    fig_dir: Path,
    metrics_csvs: dict[str, Path] | None = None,
) -> str:
    from liverus.evaluation import plots

    aucs = {n: (e["auc_delong"]["auc"], *e["auc_delong"]["ci95"]) for n, e in evals.items()}
    usable = {n: p for n, p in preds.items() if len(np.unique(p.y)) == 2}
    figs = []
    if usable:
        figs.append(plots.roc_plot(usable, fig_dir / "roc.png", aucs=aucs))
        figs.append(plots.pr_plot(usable, fig_dir / "pr.png"))
        figs.append(plots.reliability_plot(usable, fig_dir / "reliability.png"))
        figs.append(plots.decision_curve_plot(usable, fig_dir / "decision_curve.png"))
    for n, e in evals.items():
        figs.append(
            plots.confusion_plot(
                e["confusion_matrix"],
                ("benign", "malignant"),
                fig_dir / f"confusion_{n}.png",
                title=f"Confusion: {n}",
            )
        )
    if metrics_csvs:
        existing = {k: v for k, v in metrics_csvs.items() if Path(v).is_file()}
        if existing:
            figs.append(plots.training_curves_plot(existing, fig_dir / "training_curves.png"))
    return '<div class="figs">' + "".join(img_html(f) for f in figs) + "</div>"


def cases_of_run(config: dict, folder: str | Path) -> list:
    """The task's cases of a run or study folder, grouped as it was trained, from its config dict (``data.source``,
    or the phantom the folder holds when no source was given)."""
    data = config["data"]
    source = data["source"] or Path(folder) / "phantom"
    return load_task_cases(source, data["task"], data.get("group_by", "source"))[0]


@STAGES.timed("reports and figures")
def report_for_run(run_dir: str | Path, *, n_boot: int = 2000, subgroups: Sequence[str] = ()) -> Path | None:
    """Evaluate a finished training run (validation, and test when present) and write ``report.html`` and
    ``metrics.json`` into it. Returns the report path (None for three-class runs, which keep ``result.json``)."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if cfg["data"]["task"] != "binary":
        return None
    result = json.loads((run_dir / "result.json").read_text())
    threshold = result["threshold"]
    preds, evals = {}, {}
    for part in ("val", "test"):
        f = run_dir / f"predictions_{part}.csv"
        if f.is_file():
            preds[part] = read_predictions([f])
            cols = [c for c in subgroups if c] or default_subgroups(preds[part])
            evals[part] = evaluate_binary(preds[part], threshold, n_boot=n_boot, subgroups=cols)
    temperature = _temperature_section(preds)
    faith, all_cases = {}, {}
    try:
        all_cases = {c.path: c for c in cases_of_run(cfg, run_dir)}
        for part, pr in preds.items():
            faith[part] = faithfulness_for_model(
                run_dir / "model.pt", [all_cases[p] for p in pr.paths if p in all_cases]
            )
    except Exception as exc:  # a report without this section beats no report
        faith = {"error": str(exc)}
    metrics = {"threshold": threshold, **evals, "faithfulness": faith, "temperature_scaling": temperature}
    atomic_write_json(run_dir / "metrics.json", metrics)
    summary = data_summary(list(all_cases.values())) if all_cases else None
    write_model_card(run_dir, metrics, list(all_cases.values()), summary)
    sections = [
        (
            "Metrics",
            "<p>Threshold chosen on the validation split (Youden's J) and applied unchanged.</p>"
            + metrics_table_html(evals),
        ),
        ("Figures", figures_html(preds, evals, run_dir / "figures", {"run": run_dir / "metrics.csv"})),
        ("Subgroups", subgroup_html(evals)),
        ("Calibration: temperature scaling", _temperature_html(temperature)),
        ("Heatmap faithfulness", faithfulness_html({k: v for k, v in faith.items() if k != "error"})),
        ("Data", data_html(summary)),
        ("Configuration", f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"),
    ]
    return render_report(
        run_dir / "report.html", f"liverus run: {cfg['model']['name']}", sections, subtitle=str(run_dir)
    )


def _temperature_section(preds: dict[str, Predictions]) -> dict:
    """Temperature scaling fitted on the validation predictions; its effect on calibration where it is scored."""
    from liverus.evaluation.stats import apply_temperature, calibration_summary, fit_temperature

    val = preds.get("val")
    if val is None or len(np.unique(val.y)) < 2:
        return {}
    t = fit_temperature(val.y, val.p)
    out = {"temperature": t, "fitted_on": "val"}
    for part, pr in preds.items():
        before, after = calibration_summary(pr.y, pr.p), calibration_summary(pr.y, apply_temperature(pr.p, t))
        out[part] = {
            "ece_before": before["ece"],
            "ece_after": after["ece"],
            "brier_before": before["brier"],
            "brier_after": after["brier"],
        }
    return out


def _temperature_html(t: dict) -> str:
    if not t:
        return ""
    rows = [
        [part, fmt(v["ece_before"]), fmt(v["ece_after"]), fmt(v["brier_before"]), fmt(v["brier_after"])]
        for part, v in t.items()
        if isinstance(v, dict)
    ]
    return (
        f"<p>Temperature T = {t['temperature']:.3f} fitted on the validation split (T &gt; 1: the model was "
        "over-confident). It rescales probabilities without changing the ranking (AUC). On the validation split "
        "itself the improvement is optimistic; the test row, where present, is the honest one.</p>"
        + table_html(["split", "ECE before", "ECE after", "Brier before", "Brier after"], rows)
    )


def default_subgroups(pr: Predictions, max_groups: int = 12) -> list[str]:
    """The image-size subgroup column, for any dataset: AUL's ``size_group`` from its manifest, else an
    ``image_size`` (WxH) column derived from the files' headers and added to ``pr.meta``, when there are between 2
    and ``max_groups`` sizes (the audit's shortcut warning tells users to check metrics inside each size)."""
    from liverus.data.audit import derived_columns, image_size

    if not pr.meta:
        return []
    if "size_group" in derived_columns(pr.meta[0]):
        return ["size_group"]
    sizes = []
    for path in pr.paths:
        try:
            w, h = image_size(path)
            sizes.append(f"{w}x{h}")
        except Exception:  # an unreadable file was already reported where it was scored
            sizes.append("unknown")
    if not 2 <= len(set(sizes)) <= max_groups:
        return []
    for meta, size in zip(pr.meta, sizes, strict=True):
        meta["image_size"] = size
    return ["image_size"]


def evaluate_checkpoint(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    subgroup: Sequence[str] = (),
    skip_bad: bool = False,
    n_boot: int = 2000,
    lesion_from: str | None = None,
    box_jitter: float | None = None,
    box_loosen: float | None = None,
    box_average: int | None = None,
    map_faithfulness: int = 0,
) -> dict:
    """``liverus evaluate``: score labelled data with a trained model at its stored threshold and write
    ``predictions.csv``, ``metrics.json`` and ``report.html`` to ``out``.

    For lesion models, ``lesion_from="box"`` scores them as a user would use them: from a box around each expert
    mask (grown by ``box_loosen``, each edge moved by up to ``box_jitter`` of the box size, seeded per image), not
    from the outline itself; ``None`` keeps what the model was trained with. ``box_average`` (default: the model's
    card) averages each lesion's probability over that many boxes around the one derived. ``map_faithfulness`` > 0
    checks every map the model has against random maps on a seeded sample of that many cases (deletion and
    insertion, :func:`~liverus.evaluation.faithfulness.deletion_insertion_for_model`).

    Raises:
        ValueError: if the output folder holds an earlier evaluation (never overwritten silently).
    """
    import torch
    from torch.utils.data import DataLoader

    out = Path(out)
    if (out / "metrics.json").exists():
        raise ValueError(f"{out} already holds an evaluation (metrics.json); choose another --out")
    model, card = load_model(model_path)
    cases, _ = select_task(load_cases(data), card.task)
    pre = card.require_preprocess(model_path)
    changes = dict(lesion_from=lesion_from, box_jitter=box_jitter, box_loosen=box_loosen, box_average=box_average)
    pre = dataclasses.replace(pre, **{k: v for k, v in changes.items() if v is not None})
    # Box-only cases are scored as a user's box is at inference: averaged over the card's box_average boxes.
    from_box = pre.lesion_from == "box" or any_box_only(cases)
    caches = [CaseCache(variant) for variant in box_variants(pre, from_box=from_box)]
    cases, skipped = prepare_cases(cases, caches[0], skip_bad=skip_bad)
    out.mkdir(parents=True, exist_ok=True)
    if skipped:
        atomic_write_json(out / "skipped.json", [{"path": p, "problem": q} for p, q in skipped])
    # Batches and precision as the training run scored its validation and test cases: one numerical path.
    cpu = torch.device("cpu")
    scored = [
        predict_probs(model, DataLoader(UltrasoundDataset(cases, card.classes, cache), batch_size=eval_batch_size(1)),
                      card, device=cpu, amp=inference_amp(card.precision, cpu))
        for cache in caches
    ]  # fmt: skip
    probs, tg = average_probabilities([p for p, _ in scored]), scored[0][1]
    threshold = card.threshold
    write_predictions(out / "predictions.csv", cases, probs, tg, card.classes, threshold)
    if not card.is_binary:
        return _evaluate_multiclass(model_path, data, out, card, probs, tg, skipped, n_boot=n_boot)
    pr = read_predictions([out / "predictions.csv"])
    cols = list(subgroup) or default_subgroups(pr)
    ev = evaluate_binary(pr, threshold, n_boot=n_boot, subgroups=cols)
    # One answer per lesion (mean log-odds of its images) and per patient, where the manifest names them.
    per_level = {}
    for level in LEVELS:
        agg = aggregate_predictions(pr, level, threshold)
        if agg is not None and len(set(agg.y.tolist())) == 2:
            per_level[level] = evaluate_binary(agg, threshold, n_boot=n_boot)
    faith = faithfulness_for_model(model_path, cases)
    maps = (
        summarize_deletion_insertion(
            [deletion_insertion_for_model(model_path, cases, max_cases=map_faithfulness, all_views=True)]
        )
        if map_faithfulness > 0
        else None
    )
    atomic_write_json(
        out / "metrics.json",
        {
            "faithfulness": faith,
            "map_faithfulness": maps,
            "model": str(model_path),
            "data": str(data),
            "threshold": threshold,
            "lesion": {
                "from": pre.lesion_from,
                "sources": lesion_source_counts(cases),
                "box_jitter": pre.box_jitter,
                "box_loosen": pre.box_loosen,
                "box_average": len(caches),
            },
            "skipped": skipped,
            "evaluation": ev,
            **{f"per_{level}": v for level, v in per_level.items()},
        },
    )
    name = model.model_name
    sections = [
        (
            "Metrics",
            f"<p>Stored threshold {threshold:.4f} applied unchanged. {_lesion_words(pre, cases)}</p>"
            + metrics_table_html({name: ev}),
        ),
        ("Figures", figures_html({name: pr}, {name: ev}, out / "figures")),
        (
            "Per lesion and per patient",
            (
                "<p>A lesion's probability is the mean log-odds of its images; a patient's, the highest of their "
                "lesions' (malignant when any lesion is).</p>"
                + metrics_table_html({f"{name} per {level}": v for level, v in per_level.items()})
            )
            if per_level
            else "",
        ),
        ("Subgroups", subgroup_html({name: ev})),
        ("Heatmap faithfulness", faithfulness_html({name: faith})),
        ("Map faithfulness (against the model)", deletion_insertion_html(maps) if maps else ""),
        ("Data", data_html(data_summary(cases))),
    ]
    render_report(out / "report.html", f"liverus evaluation: {name}", sections, subtitle=f"{model_path} on {data}")
    m = ev["metrics"]
    text = (
        f"{name} on {len(cases)} cases: AUC {_ci(m['auc'], ev['auc_delong']['ci95'])}, sensitivity "
        f"{_ci(m['sensitivity'], ev['ci95_bootstrap']['sensitivity'])}, specificity "
        f"{_ci(m['specificity'], ev['ci95_bootstrap']['specificity'])}"
        + "".join(
            f"\nper {level} ({v['n']}): AUC {_ci(v['metrics']['auc'], v['auc_delong']['ci95'])}"
            for level, v in per_level.items()
        )
        + f"\nreport: {out / 'report.html'}"
    )
    return {"evaluation": ev, "text": text}


def _lesion_words(pre, cases=()) -> str:
    if pre.crop != "roi" and not pre.lesion_channel:
        return ""
    counts = lesion_source_counts(list(cases))
    if counts.get("box"):
        return (
            f"Lesions of {counts['box']} of {sum(counts.values())} cases from the boxes in the manifest alone "
            f"(outlined inside the box by {pre.box_mask}, as at inference; each probability averages "
            f"{pre.box_average} boxes)" + (f"; {counts['mask']} from their masks." if counts.get("mask") else ".")
        )
    if pre.lesion_from == "box":
        return (
            f"Lesions from boxes around the expert masks (grown {pre.box_loosen:.0%}, edges jittered up to "
            f"{pre.box_jitter:.0%}; mask channel from {pre.box_mask}), as a user would draw them."
            + (
                f" Each probability averages {pre.box_average} boxes (edges moved up to {pre.box_shift:.0%})."
                if pre.box_average > 1
                else ""
            )
        )
    return "Lesions from the expert masks (an optimistic stand-in for what a user draws; see --lesion-from box)."


def multiclass_evaluation(
    probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], *, n_boot: int = 2000
) -> dict:
    """Three (or more) classes: one-vs-rest AUC and average precision per class, their macro means (macro average
    precision is UltraBench's AUL metric) with stratified bootstrap 95% intervals (``macro_ci95``; ``n_boot`` 0
    skips them), the confusion matrix at the arg-max, and calibration per class (one-vs-rest ECE, Brier, slope and
    intercept)."""
    from liverus.evaluation.metrics import macro_bootstrap_ci, multiclass_metrics
    from liverus.evaluation.stats import calibration_summary

    ev = multiclass_metrics(targets, probs, classes)
    if n_boot > 0:
        ev["macro_ci95"] = {k: list(v) for k, v in macro_bootstrap_ci(targets, probs, n_resamples=n_boot).items()}
    ev["calibration"] = {}
    for i, name in enumerate(classes):
        yi = (targets == i).astype(int)
        if 0 < yi.sum() < len(yi):
            cal = calibration_summary(yi, probs[:, i])
            ev["calibration"][name] = {k: cal[k] for k in ("ece", "brier", "slope", "intercept")}
    return ev


def multiclass_html(ev: dict, classes: Sequence[str]) -> str:
    rows = [
        [c, fmt(m["auc"]), fmt(m["pr_auc"]), fmt(m["sensitivity"]), fmt(m["specificity"]),
         fmt(ev["calibration"].get(c, {}).get("ece")), fmt(ev["calibration"].get(c, {}).get("slope"))]
        for c, m in ev["per_class"].items()
    ]  # fmt: skip
    ci = ev.get("macro_ci95", {})

    def macro(k: str) -> str:
        return fmt(ev["macro"][k]) + (f" [{fmt(ci[k][0])}, {fmt(ci[k][1])}]" if k in ci else "")

    rows.append(["macro", *[macro(k) for k in ("auc", "pr_auc", "sensitivity", "specificity")], "", ""])
    matrix = [[c, *r] for c, r in zip(classes, ev["confusion_matrix"], strict=True)]
    cm = table_html(["true \\ predicted", *classes], matrix)
    return (
        "<p>One-vs-rest per class; the predicted class is the most probable one. Macro = the mean over classes, "
        "with a 95% interval from a bootstrap stratified by class; macro average precision is the metric UltraBench "
        "reports for AUL's normal / benign / malignant task.</p>"
        + table_html(["class", "AUC", "average precision", "sensitivity", "specificity", "ECE", "cal. slope"], rows)
        + f"<p>Accuracy {fmt(ev['accuracy'])}, balanced accuracy {fmt(ev['balanced_accuracy'])}.</p>"
        + cm
    )


def _evaluate_multiclass(model_path, data, out: Path, card, probs, tg, skipped, n_boot: int = 2000) -> dict:
    from liverus.evaluation import plots

    ev = multiclass_evaluation(probs, tg, card.classes, n_boot=n_boot)
    atomic_write_json(
        out / "metrics.json", {"model": str(model_path), "data": str(data), "skipped": skipped, "evaluation": ev}
    )
    fig = plots.confusion_plot(ev["confusion_matrix"], card.classes, out / "figures" / "confusion.png")
    sections = [
        ("Metrics", multiclass_html(ev, card.classes)),
        ("Figures", '<div class="figs">' + img_html(fig) + "</div>"),
    ]
    render_report(
        out / "report.html", f"liverus evaluation: {card.model_name}", sections, subtitle=f"{model_path} on {data}"
    )
    text = (
        f"{card.model_name} on {ev['n']} cases ({', '.join(card.classes)}): macro AUC "
        f"{_ci(ev['macro']['auc'], ev.get('macro_ci95', {}).get('auc'))}, macro average precision "
        f"{_ci(ev['macro']['pr_auc'], ev.get('macro_ci95', {}).get('pr_auc'))}, accuracy {fmt(ev['accuracy'])}\n"
        f"report: {out / 'report.html'}"
    )
    return {"evaluation": ev, "text": text}
