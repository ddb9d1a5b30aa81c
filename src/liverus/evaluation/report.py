"""Self-contained HTML reports (figures embedded) plus ``metrics.json`` and per-case predictions.

* :func:`report_for_run`: after ``liverus train`` (validation, and test when the run had one);
* :func:`evaluate_checkpoint`: ``liverus evaluate`` on any labelled data with a model's stored threshold;
* the ``liverus cv`` / ``compare`` reports (pooled out-of-fold results, paired tests, per-fold spread) are built in
  :mod:`liverus.evaluation.study` from the helpers here.

The numbers are computed here into plain dicts (what ``metrics.json`` holds); the pages are the Jinja2 templates of
``liverus/evaluation/templates`` (:mod:`liverus.evaluation.rendering`). The ``*_html`` helpers render the templates'
pieces for modules that assemble their own pages.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from markupsafe import Markup

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
from liverus.engine.averaging import average_probabilities
from liverus.engine.forward import eval_batch_size, predict_probs
from liverus.engine.predictions import Predictions, read_predictions, write_predictions
from liverus.engine.runtime import inference_amp
from liverus.evaluation.aggregate import LEVELS, aggregate_predictions
from liverus.evaluation.analysis import evaluate_binary
from liverus.evaluation.faithfulness import (
    deletion_insertion_for_model,
    faithfulness_for_model,
    summarize_deletion_insertion,
)
from liverus.evaluation.model_report import write_model_report
from liverus.evaluation.rendering import ci, fmt, html_macro, write_page
from liverus.models import load_model
from liverus.utils import STAGES, atomic_write_json

__all__ = [
    "report_for_run",
    "cases_of_run",
    "default_subgroups",
    "table_html",
    "faithfulness_html",
    "figures_html",
    "report_figures",
    "evaluate_checkpoint",
    "render_report",
    "data_summary",
    "fmt",
    "metrics_table_html",
]


def table_html(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A table with one escaped cell per value."""
    return html_macro("table")(headers, rows)


def metrics_table_html(evals: dict[str, dict]) -> str:
    """One column per model: every metric with its 95% bootstrap interval (AUC also with DeLong's)."""
    return html_macro("metrics_table")(evals)


def faithfulness_html(faith: dict[str, dict]) -> str:
    """Table of heatmap faithfulness per model (pointing game, energy inside the lesion, chance level)."""
    return html_macro("faithfulness")(faith)


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


def render_report(path: Path, title: str, sections: list[tuple[str, str]], subtitle: str = "") -> Path:
    """Write a self-contained HTML page from ``(heading, html)`` sections (a section without content is left out)."""
    # The sections are HTML that the caller built (from the helpers above): written as they are, not escaped again.
    trusted = [(heading, Markup(content)) for heading, content in sections]
    return write_page(path, "report.html.j2", title=title, subtitle=subtitle, sections=trusted)


def report_figures(
    preds: dict[str, Predictions],
    evals: dict[str, dict],
    fig_dir: Path,
    metrics_csvs: dict[str, Path] | None = None,
) -> list[Path]:
    """The figures of a binary report: ROC, PR, reliability and decision curves (models scored on both classes), a
    confusion matrix per model and, given ``metrics.csv`` files, the training curves."""
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
    return figs


def figures_html(
    preds: dict[str, Predictions],
    evals: dict[str, dict],
    fig_dir: Path,
    metrics_csvs: dict[str, Path] | None = None,
) -> str:
    """The :func:`report_figures`, drawn into ``fig_dir`` and embedded side by side."""
    return html_macro("figures")(report_figures(preds, evals, fig_dir, metrics_csvs))


def cases_of_run(config: dict, folder: str | Path) -> list:
    """The task's cases of a run or study folder, grouped as it was trained, from its config dict (``data.source``,
    or the phantom the folder holds when no source was given)."""
    data = config["data"]
    source = data["source"] or Path(folder) / "phantom"
    return load_task_cases(source, data["task"], data.get("group_by", "source"))[0]


@STAGES.timed("reports and figures")
def report_for_run(run_dir: str | Path, *, n_boot: int = 2000, subgroups: Sequence[str] = ()) -> Path | None:
    """Evaluate a finished training run (validation, and test when present) and write ``report.html`` and
    ``metrics.json`` into it (and, for a binary run, ``MODEL_REPORT.md`` and ``model_card.json``). Returns the
    report path, or None for a three-class run that scored no held-out images (``data.val_fraction: 0`` and no test
    split: there is nothing to report on)."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if cfg["data"]["task"] != "binary":
        return _multiclass_run_report(run_dir, cfg, n_boot=n_boot)
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
    write_model_report(run_dir, metrics, list(all_cases.values()), summary)
    return _write_run_page(
        run_dir,
        cfg,
        "run.html.j2",
        evals=evals,
        figure_paths=report_figures(preds, evals, run_dir / "figures", {"run": run_dir / "metrics.csv"}),
        temperature_scaling=temperature,
        faith={k: v for k, v in faith.items() if k != "error"},
        data_summary=summary,
    )


def _write_run_page(run_dir: Path, cfg: dict, template: str, **context) -> Path:
    """A run's ``report.html``: the model's name as its title, the run folder below it, the config at the end."""
    return write_page(
        run_dir / "report.html",
        template,
        title=f"liverus run: {cfg['model']['name']}",
        subtitle=str(run_dir),
        config=cfg,
        **context,
    )


def _multiclass_run_report(run_dir: Path, cfg: dict, *, n_boot: int) -> Path | None:
    """:func:`report_for_run` of a three-class run: per class and macro metrics of its validation (and test)
    predictions, with the confusion matrices."""
    from liverus.engine.predictions import read_class_probabilities
    from liverus.evaluation import plots

    parts = {part: run_dir / f"predictions_{part}.csv" for part in ("val", "test")}
    parts = {part: f for part, f in parts.items() if f.is_file()}
    if not parts:
        return None
    evals, figure_paths, classes = {}, [], ()
    for part, f in parts.items():
        _, targets, probs, classes = read_class_probabilities([f])
        evals[part] = multiclass_evaluation(probs, targets, classes, n_boot=n_boot)
        figure_paths.append(
            plots.confusion_plot(
                evals[part]["confusion_matrix"], classes, run_dir / "figures" / f"confusion_{part}.png", title=part
            )
        )
    atomic_write_json(run_dir / "metrics.json", {"classes": list(classes), **evals})
    return _write_run_page(
        run_dir, cfg, "run_multiclass.html.j2", evals=evals, classes=classes, figure_paths=figure_paths
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


@dataclasses.dataclass
class _Scored:
    """Labelled cases scored by a model: what :func:`evaluate_checkpoint` evaluates."""

    cases: list
    probs: np.ndarray
    targets: np.ndarray
    skipped: list
    pre: object  # the preprocessing the cases were scored with (the card's, with the caller's box changes)
    n_boxes: int  # boxes averaged per lesion (1: one box, or a mask)


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
    out = Path(out)
    if (out / "metrics.json").exists():
        raise ValueError(f"{out} already holds an evaluation (metrics.json); choose another --out")
    model, card = load_model(model_path)
    changes = dict(lesion_from=lesion_from, box_jitter=box_jitter, box_loosen=box_loosen, box_average=box_average)
    scored = _score_labelled(model, card, model_path, data, out, changes, skip_bad=skip_bad)
    if not card.is_binary:
        return _evaluate_multiclass(model_path, data, out, card, scored, n_boot=n_boot)
    threshold, cases, name = card.threshold, scored.cases, model.model_name
    pr = read_predictions([out / "predictions.csv"])
    ev = evaluate_binary(pr, threshold, n_boot=n_boot, subgroups=list(subgroup) or default_subgroups(pr))
    per_level = _per_level(pr, threshold, n_boot)
    faith = faithfulness_for_model(model_path, cases)
    maps = (
        summarize_deletion_insertion(
            [deletion_insertion_for_model(model_path, cases, max_cases=map_faithfulness, all_views=True)]
        )
        if map_faithfulness > 0
        else None
    )
    pre = scored.pre
    lesion = {"from": pre.lesion_from, "sources": lesion_source_counts(cases), "box_jitter": pre.box_jitter,
              "box_loosen": pre.box_loosen, "box_average": scored.n_boxes}  # fmt: skip
    atomic_write_json(
        out / "metrics.json",
        {"faithfulness": faith, "map_faithfulness": maps, "model": str(model_path), "data": str(data),
         "threshold": threshold, "lesion": lesion, "skipped": scored.skipped, "evaluation": ev,
         **{f"per_{level}": v for level, v in per_level.items()}},
    )  # fmt: skip
    write_page(
        out / "report.html",
        "evaluation.html.j2",
        title=f"liverus evaluation: {name}",
        subtitle=f"{model_path} on {data}",
        name=name,
        threshold=threshold,
        lesion_words=_lesion_words(pre, cases),
        evaluation=ev,
        figure_paths=report_figures({name: pr}, {name: ev}, out / "figures"),
        per_level={f"{name} per {level}": v for level, v in per_level.items()},
        faith=faith,
        map_faithfulness=maps,
        data_summary=data_summary(cases),
    )
    return {"evaluation": ev, "text": _evaluation_text(name, cases, ev, per_level, out / "report.html")}


def _score_labelled(model, card, model_path, data, out: Path, changes: dict, *, skip_bad: bool) -> _Scored:
    """Score the task's cases of ``data`` as the training run scored its validation and test cases, and write
    ``predictions.csv`` (and ``skipped.json``) to ``out``. ``changes``: box settings replacing the card's."""
    import torch
    from torch.utils.data import DataLoader

    cases, _ = select_task(load_cases(data), card.task)
    pre = card.require_preprocess(model_path)
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
    write_predictions(out / "predictions.csv", cases, probs, tg, card.classes, card.threshold)
    return _Scored(cases, probs, tg, skipped, pre, len(caches))


def _per_level(pr: Predictions, threshold: float, n_boot: int) -> dict[str, dict]:
    """One answer per lesion (mean log-odds of its images) and per patient, where the manifest names them and both
    classes occur."""
    per_level = {}
    for level in LEVELS:
        agg = aggregate_predictions(pr, level, threshold)
        if agg is not None and len(set(agg.y.tolist())) == 2:
            per_level[level] = evaluate_binary(agg, threshold, n_boot=n_boot)
    return per_level


def _evaluation_text(name: str, cases: list, ev: dict, per_level: dict[str, dict], report: Path) -> str:
    """What ``liverus evaluate`` prints: AUC, sensitivity and specificity with intervals, per level, the report."""
    m = ev["metrics"]
    return (
        f"{name} on {len(cases)} cases: AUC {ci(m['auc'], ev['auc_delong']['ci95'])}, sensitivity "
        f"{ci(m['sensitivity'], ev['ci95_bootstrap']['sensitivity'])}, specificity "
        f"{ci(m['specificity'], ev['ci95_bootstrap']['specificity'])}"
        + "".join(
            f"\nper {level} ({v['n']}): AUC {ci(v['metrics']['auc'], v['auc_delong']['ci95'])}"
            for level, v in per_level.items()
        )
        + f"\nreport: {report}"
    )


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


def _evaluate_multiclass(model_path, data, out: Path, card, scored: _Scored, n_boot: int = 2000) -> dict:
    """``liverus evaluate`` of a three-class model: per-class and macro metrics, the confusion matrix."""
    from liverus.evaluation import plots

    ev = multiclass_evaluation(scored.probs, scored.targets, card.classes, n_boot=n_boot)
    atomic_write_json(
        out / "metrics.json",
        {"model": str(model_path), "data": str(data), "skipped": scored.skipped, "evaluation": ev},
    )
    fig = plots.confusion_plot(ev["confusion_matrix"], card.classes, out / "figures" / "confusion.png")
    write_page(
        out / "report.html",
        "evaluation_multiclass.html.j2",
        title=f"liverus evaluation: {card.model_name}",
        subtitle=f"{model_path} on {data}",
        evaluation=ev,
        classes=card.classes,
        figure_paths=[fig],
    )
    text = (
        f"{card.model_name} on {ev['n']} cases ({', '.join(card.classes)}): macro AUC "
        f"{ci(ev['macro']['auc'], ev.get('macro_ci95', {}).get('auc'))}, macro average precision "
        f"{ci(ev['macro']['pr_auc'], ev.get('macro_ci95', {}).get('pr_auc'))}, accuracy {fmt(ev['accuracy'])}\n"
        f"report: {out / 'report.html'}"
    )
    return {"evaluation": ev, "text": text}
