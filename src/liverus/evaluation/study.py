"""Study summaries: pooled out-of-fold results, paired tests, subgroups, heatmap faithfulness, the final-recipe
inputs and the HTML report of ``liverus cv`` / ``compare``, and ``compare-studies`` across study folders.

A study folder holds ``study.json``, ``splits.json`` and one run folder per model and fold (``MODEL/foldI``); this
module reads them and writes ``summary.json``, ``figures/`` and ``report.html``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from liverus.engine.predictions import Predictions, read_predictions
from liverus.evaluation import plots
from liverus.evaluation.analysis import compare_models, cv_summary, evaluate_binary, subgroup_table
from liverus.evaluation.faithfulness import faithfulness_for_model, pooled_faithfulness
from liverus.evaluation.metrics import binary_metrics, choose_threshold
from liverus.evaluation.rendering import fmt, render, write_page
from liverus.evaluation.report import cases_of_run, data_summary, default_subgroups
from liverus.models import is_feature_model
from liverus.utils import STAGES, atomic_write_json

__all__ = [
    "fold_runs",
    "repeat_dir",
    "n_repeats",
    "repeated_cv_summary",
    "study_predictions",
    "summarize_study",
    "summary_markdown",
    "final_recipe_inputs",
    "compare_studies",
    "model_configs",
    "skipped_files",
]


def final_recipe_inputs(pred: Predictions, results: list[dict]) -> dict:
    """What a model trained on every case (``data.val_fraction: 0``) needs from the cross-validation.

    Without a validation split the final model cannot choose its own threshold or epoch, so both come from the study:
    the Youden threshold of the pooled out-of-fold probabilities (every case scored by a model that never saw it;
    501 cases on AUL instead of one fold's ~80 validation cases) and each fold's best epoch, with how much validation
    AUC the last epoch lost against the best one (if little, training the full schedule is safe).

    Args:
        pred: the model's pooled out-of-fold predictions.
        results: each fold's ``result.json``.

    Returns:
        ``threshold`` (pooled out-of-fold Youden), ``sensitivity``/``specificity`` at it (in-sample for the
        threshold, so slightly optimistic), ``fold_thresholds``, ``best_epochs``, ``epochs_run`` and
        ``last_epoch_val_auc_drop`` (mean over folds of best minus last validation AUC).
    """
    thr = choose_threshold(pred.y, pred.p)
    at = binary_metrics(pred.y, pred.p, thr)
    drops = []
    for r in results:
        aucs = [h.get("val_auc") for h in r.get("history", [])]
        aucs = [a for a in aucs if a is not None and math.isfinite(a)]
        if aucs:
            drops.append(max(aucs) - aucs[-1])
    return {
        "threshold": thr,
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "fold_thresholds": [r.get("threshold") for r in results],
        "best_epochs": [r.get("best_epoch") for r in results],
        "epochs_run": [r.get("epochs_run") for r in results],
        "last_epoch_val_auc_drop": float(sum(drops) / len(drops)) if drops else math.nan,
    }


def _study_faithfulness(out: Path, labels: list[str], cases: list, max_cases: int) -> dict:
    """Heatmap faithfulness of each fold's model on its own held-out cases, pooled per model."""
    by_path = {c.path: c for c in cases}
    if not any(c.mask or c.polygon for c in cases) or max_cases <= 0:
        return {}
    result = {}
    for label in labels:
        runs = fold_runs(out, label)
        parts = []
        for r in runs:
            with open(r / "predictions_test.csv") as fh:
                held = [by_path[row["path"]] for row in csv.DictReader(fh) if row["path"] in by_path]
            parts.append(faithfulness_for_model(r / "model.pt", held, max_cases=max(1, max_cases // len(runs))))
        result[label] = pooled_faithfulness(parts)
    return result


@STAGES.timed("reports and figures")
def summarize_study(
    out: Path, labels: list[str], *, baseline: str, subgroup: list[str], n_boot: int = 2000, max_cases: int = 100
) -> dict:
    """Pool each model's out-of-fold predictions and write ``summary.json`` and ``report.html``."""
    out = Path(out)
    preds, evals, per_fold, wall, recipe = _pool_models(out, labels, subgroup, n_boot)
    comparisons = compare_models(preds, baseline) if baseline in preds and len(preds) > 1 else {}
    study = json.loads((out / "study.json").read_text())
    cases = cases_of_run(study["config"], out)
    # The data section counts what was analysed: the cases that were scored, after task filtering and skips.
    scored = set().union(*(set(p.paths) for p in preds.values()))
    analysed = [c for c in cases if c.path in scored]
    skipped = skipped_files(out)
    faith = _study_faithfulness(out, labels, cases, max_cases)
    repeated = repeated_cv_summary(out, labels, baseline) if n_repeats(out) > 1 else None
    summary = {
        "faithfulness": faith,
        "models": labels,
        "baseline": baseline,
        "repeated": repeated,
        "pooled": evals,
        "per_fold": per_fold,
        "comparisons": comparisons,
        "wall_time_s": wall,
        "final_recipe": recipe,
        "operating_point_transfer": {label: operating_point_transfer(out, label) for label in labels},
    }
    atomic_write_json(out / "summary.json", summary)
    summary["text"] = _study_text(summary, len(fold_runs(out, labels[0])))
    write_page(
        out / "report.html",
        "study.html.j2",
        title="liverus study: " + ", ".join(labels),
        subtitle=str(out),
        figure_paths=_study_figures(out, labels, preds, evals, per_fold),
        data_summary=data_summary(analysed),
        skipped_files=skipped,
        model_configs=model_configs(out, labels, study["config"]),
        faithfulness_by_model=faith,
        **{k: summary[k] for k in _REPORTED},
    )
    summary["report"] = str(out / "report.html")
    return summary


# What the study report shows of the summary, under the summary's own keys.
_REPORTED = (
    "models",
    "baseline",
    "pooled",
    "comparisons",
    "per_fold",
    "repeated",
    "operating_point_transfer",
    "final_recipe",
    "wall_time_s",
)


def _pool_models(out: Path, labels: list[str], subgroup: list[str], n_boot: int) -> tuple[dict, ...]:
    """Per model: its pooled out-of-fold predictions and their evaluation, the per-fold test metrics, the wall time
    of all folds and the final-recipe inputs."""
    preds: dict[str, Predictions] = {}
    evals, per_fold, wall, recipe = {}, {}, {}, {}
    for label in labels:
        runs = fold_runs(out, label)
        preds[label] = study_predictions(out, label)
        cols = subgroup or default_subgroups(preds[label])
        evals[label] = evaluate_binary(preds[label], None, n_boot=n_boot, subgroups=cols)
        results = [json.loads((r / "result.json").read_text()) for r in runs]
        per_fold[label] = cv_summary(
            [{k: v for k, v in (r["test_metrics"] or {}).items() if isinstance(v, int | float)} for r in results]
        )
        wall[label] = sum(r["wall_time_s"] for r in results)
        recipe[label] = final_recipe_inputs(preds[label], results)
    return preds, evals, per_fold, wall, recipe


def _study_text(summary: dict, n_folds: int) -> str:
    """The table ``liverus cv`` / ``compare`` print: pooled AUC, operating point, fold spread and tests per model,
    the final-recipe commands and, for repeated cross-validation, each repeat's AUC."""
    labels, evals, per_fold = summary["models"], summary["pooled"], summary["per_fold"]
    recipe, repeated = summary["final_recipe"], summary["repeated"]
    lines = [
        f"{'model':34s} {'pooled AUC [95% CI]':24s} {'sens':>6s} {'spec':>6s} {'fold AUC mean±sd':>17s} "
        f"{'DeLong p':>9s} {'ECE':>6s}"
    ]
    for label in labels:
        e = evals[label]
        a = e["auc_delong"]
        pf = per_fold[label].get("auc", {"mean": math.nan, "sd": math.nan})
        p = summary["comparisons"].get(label, {}).get("delong_p")
        lines.append(
            f"{label:34s} {fmt(a['auc'])} [{fmt(a['ci95'][0])}, {fmt(a['ci95'][1])}]    "
            f"{fmt(e['metrics']['sensitivity']):>6s} {fmt(e['metrics']['specificity']):>6s} "
            f"{fold_spread(pf):>17s} {fmt(p) if p is not None else 'ref':>9s} "
            f"{fmt(e['calibration']['ece']):>6s}"
        )
    if n_folds > 1:  # a single split (the demo) has no pooled out-of-fold threshold to offer
        lines.append("")
        lines += [
            f"{label}: final model on every case: --set data.val_fraction=0 (its inner cross-validation chooses the "
            f"threshold; the pooled out-of-fold Youden threshold is {recipe[label]['threshold']:.4f})"
            if is_feature_model(label.partition("@")[0])
            else f"{label}: final model on every case: --set data.val_fraction=0 --set model.threshold="
            f"{recipe[label]['threshold']:.4f} (pooled out-of-fold Youden threshold; or model.ensemble: K)"
            for label in labels
        ]
    if repeated:
        lines += ["", f"repeated cross-validation: {repeated['repeats']} repeats x {n_folds} folds"]
        lines.append(f"{'model':34s} {'pooled AUC per repeat':32s} {'mean ± SD':>14s} {'corrected t p':>14s}")
        for label in labels:
            m, c = repeated["models"][label], repeated["comparisons"].get(label)
            per = ", ".join(fmt(a) for a in m["auc_per_repeat"])
            lines.append(
                f"{label:34s} {per:32s} {fmt(m['mean']):>6s} ± {fmt(m['sd']):<5s} "
                f"{fmt(c['corrected_t']['p_value'], 4) if c else 'ref':>14s}"
            )
            lines += _subgroup_lines(m, 2)
    return "\n".join(lines)


def _study_figures(out: Path, labels: list[str], preds: dict, evals: dict, per_fold: dict) -> list[Path]:
    """ROC, reliability, PR, per-fold AUC and training curves of every model, drawn into ``out/figures``."""
    fig_dir = out / "figures"
    aucs = {n: (e["auc_delong"]["auc"], *e["auc_delong"]["ci95"]) for n, e in evals.items()}
    figs = [
        plots.roc_plot(preds, fig_dir / "roc.png", aucs=aucs),
        plots.reliability_plot(preds, fig_dir / "reliability.png"),
        plots.pr_plot(preds, fig_dir / "pr.png"),
        plots.fold_plot({n: per_fold[n].get("auc", {}).get("per_fold", []) for n in labels}, fig_dir / "folds.png"),
    ]
    curves = {f"{n} f{r.name[4:]}": r / "metrics.csv" for n in labels for r in fold_runs(out, n)}
    curves = {k: v for k, v in curves.items() if v.is_file()}  # fitted feature models have no epochs
    figs.append(plots.training_curves_plot(curves, fig_dir / "training_curves.png"))
    return figs


def model_configs(out: Path, labels: list[str], base: dict) -> dict[str, dict]:
    """Each model's own config (its first fold's ``config.yaml``), since models differ from the study's base."""
    configs = {}
    for label in labels:
        runs = fold_runs(out, label)
        configs[label] = yaml.safe_load((runs[0] / "config.yaml").read_text()) if runs else base
    return configs


def skipped_files(out: Path) -> list[dict]:
    """The files a study skipped as unreadable (``skipped.json``; none when it has no such file)."""
    return json.loads((out / "skipped.json").read_text()) if (out / "skipped.json").is_file() else []


def operating_point_transfer(study: Path, model: str) -> dict:
    """Whether operating points chosen on validation hold on unseen cases: each fold model's own rule-out, Youden and
    rule-in thresholds (from its card, chosen on its validation part) applied to its held-out fold, pooled per repeat,
    and the coverage of each point's target: in how many repeats (pooled) and folds the held-out rate reached it.

    Returns:
        ``{point: {"target": ..., "per_repeat": [{"sensitivity", "specificity", "met"}, ...], "repeats_met",
        "folds_met", "folds"}}`` (``met`` and the counts only for points with a target rate).
    """
    from liverus.evaluation.metrics import OPERATING_POINTS
    from liverus.models import load_card

    def rates(y: np.ndarray, pred: np.ndarray) -> dict:
        return {
            "sensitivity": float(pred[y == 1].mean()) if (y == 1).any() else math.nan,
            "specificity": float((~pred[y == 0]).mean()) if (y == 0).any() else math.nan,
        }

    out: dict = {}
    for r in range(n_repeats(study)):
        hits: dict[str, list] = {}
        for run in fold_runs(study, model, r):
            card = load_card(run / "model.pt")
            pr = read_predictions([run / "predictions_test.csv"])
            for name, t in card.operating_points.items():
                hits.setdefault(name, []).append((pr.y, pr.p >= t))
        for name, parts in hits.items():
            method, target, meaning = OPERATING_POINTS[name]
            entry = out.setdefault(name, {"target": meaning, "per_repeat": []})
            pooled = rates(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
            if method in ("sensitivity", "specificity"):  # a target rate to cover
                pooled["met"] = bool(pooled[method] >= target)
                folds = [rates(a, b)[method] >= target for a, b in parts]
                entry["folds_met"] = entry.get("folds_met", 0) + sum(folds)
                entry["folds"] = entry.get("folds", 0) + len(folds)
                entry["repeats_met"] = entry.get("repeats_met", 0) + int(pooled["met"])
            entry["per_repeat"].append(pooled)
    return out


def fold_spread(pf: dict) -> str:
    """``mean±sd`` of per-fold values, or the one value of a single split (no spread to show)."""
    if len(pf.get("per_fold", [])) <= 1:
        return fmt(pf["mean"])
    return f"{fmt(pf['mean'])}±{fmt(pf['sd'])}"


def repeat_dir(study: Path, model: str, repeat: int = 0) -> Path:
    """Where a model's runs of one repeat live: ``MODEL/`` for the first, ``MODEL/repeatR/`` for the others."""
    return Path(study) / model if repeat == 0 else Path(study) / model / f"repeat{repeat}"


def n_repeats(study: Path) -> int:
    """How many repeats a study folder holds (``study.json``)."""
    return int(json.loads((Path(study) / "study.json").read_text()).get("repeats", 1))


def fold_runs(study: Path, model: str, repeat: int = 0) -> list[Path]:
    """A study model's fold run folders of one repeat, in fold order (fold10 after fold9)."""
    return sorted(repeat_dir(study, model, repeat).glob("fold*"), key=lambda p: int(p.name[4:]))


def study_predictions(study: Path, model: str, repeat: int = 0) -> Predictions:
    """The model's pooled out-of-fold predictions of one repeat (one file per fold, in fold order)."""
    runs = fold_runs(study, model, repeat)
    files = [r / "predictions_test.csv" for r in runs]
    if not runs or not all(f.is_file() for f in files):
        where = repeat_dir(study, model, repeat)
        raise ValueError(f"{where} holds no finished cross-validation (fold*/predictions_test.csv)")
    return read_predictions(files)


def repeated_cv_summary(study: Path, labels: list[str], baseline: str) -> dict:
    """Per model: pooled AUC of each repeat, their mean and SD; against the baseline: DeLong's test per repeat and the
    corrected resampled t-test over the per-fold AUC differences of all repeats (valid for repeated CV)."""
    return _repeated_summary({label: (study, label) for label in labels}, baseline, n_repeats(study))


def fuse_predictions(parts: list[Predictions]) -> Predictions:
    """Late fusion: the mean of several models' probabilities for the same cases (aligned to the first's order), with
    the first model's fold indices. Decisions are left at 0.5 (a fused model has no validated threshold)."""
    ref = parts[0]
    p = np.mean([pr.align(ref.paths).p for pr in parts], axis=0)
    return Predictions(list(ref.paths), ref.y, p, (p >= 0.5).astype(int), ref.meta, ref.fold)


def _fold_aucs(pred: Predictions) -> list[float]:
    from sklearn.metrics import roc_auc_score

    out = []
    for f in np.unique(pred.fold):
        sel = pred.fold == f
        out.append(float(roc_auc_score(pred.y[sel], pred.p[sel])) if len(set(pred.y[sel])) == 2 else math.nan)
    return out


def _repeated_summary(
    members: dict[str, tuple[Path, str]], baseline: str, repeats: int, fused: dict[str, list[str]] | None = None
) -> dict:
    """:func:`repeated_cv_summary` for models that may live in different studies sharing their fold sets
    (``members``: label -> (study folder, model name)), plus late fusions of them (``fused``: label -> member
    labels), scored per fold from their pooled predictions."""
    from liverus.evaluation.stats import corrected_resampled_ttest, delong_ci, delong_test

    # Each model's pooled predictions of each repeat, read once; the fold index of every row gives the fold sizes.
    preds = {
        (label, r): study_predictions(st, model, r) for label, (st, model) in members.items() for r in range(repeats)
    }
    fold_auc = {}
    for label, (st, model) in members.items():
        fold_auc[label] = [
            (json.loads((run / "result.json").read_text()).get("test_metrics") or {}).get("auc", math.nan)
            for r in range(repeats)
            for run in fold_runs(st, model, r)
        ]
    for label, parts in (fused or {}).items():
        for r in range(repeats):
            preds[label, r] = fuse_predictions([preds[m, r] for m in parts])
        fold_auc[label] = [a for r in range(repeats) for a in _fold_aucs(preds[label, r])]
    per_model, sizes = {}, []
    for label in [*members, *(fused or {})]:
        aucs = [delong_ci(preds[label, r].y, preds[label, r].p)[0] for r in range(repeats)]
        per_model[label] = {
            **_over_repeats(aucs),
            "subgroups": _subgroup_aucs([preds[label, r] for r in range(repeats)]),
        }
    for r in range(repeats):
        ref = preds[baseline, r]
        sizes += [(len(ref) - int(n), int(n)) for n in np.bincount(ref.fold)]
    comparisons = {}
    if sizes:
        n_train, n_test = float(np.mean([a for a, _ in sizes])), float(np.mean([b for _, b in sizes]))
        for label in [*members, *(fused or {})]:
            if label == baseline:
                continue
            diffs = np.asarray(fold_auc[label]) - np.asarray(fold_auc[baseline])
            per_repeat = []
            for r in range(repeats):
                ref = preds[baseline, r]
                other = preds[label, r].align(ref.paths)
                per_repeat.append(delong_test(ref.y, other.p, ref.p)["p_value"])
            comparisons[label] = {
                "corrected_t": corrected_resampled_ttest(diffs, n_train, n_test),
                "delong_p_per_repeat": per_repeat,
                "folds": len(diffs),
                "train_test_sizes": [n_train, n_test],
            }
    return {"repeats": repeats, "models": per_model, "comparisons": comparisons}


def _subgroup_aucs(preds: list[Predictions]) -> dict:
    """The AUC inside each image-size subgroup (AUL's ``size_group``), per repeat, with mean and SD: where the
    acquisition predicts the label, these are the numbers the pooled AUC cannot inflate."""
    out: dict = {}
    # Each repeat's predictions get the column (an image-size column read from the files lands in their own meta).
    columns = [set(default_subgroups(pr)) for pr in preds]
    for col in sorted(set.intersection(*columns)) if columns else []:
        tables = [subgroup_table(pr, col, None) for pr in preds]
        for value in sorted(set.intersection(*(set(t) for t in tables))):
            aucs = [t[value]["auc"] for t in tables]
            if np.isnan(aucs).all():  # one class only in this subgroup
                continue
            out.setdefault(col, {})[value] = {**_over_repeats(aucs), "n": tables[0][value]["n"]}
    return out


def _over_repeats(aucs: list[float]) -> dict:
    """One AUC per repeat, with their mean and sample SD (NaN for a single repeat)."""
    arr = np.asarray(aucs, dtype=float)
    return {
        "auc_per_repeat": arr.tolist(),
        "mean": float(np.nanmean(arr)),
        "sd": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else math.nan,
    }


def _subgroup_lines(m: dict, indent: int) -> list[str]:
    """Text lines of one model's per-repeat subgroup AUCs."""
    return [
        f"{'':{indent}s}{col} {value} (n={g['n']}): {', '.join(fmt(a) for a in g['auc_per_repeat'])}  "
        f"mean {fmt(g['mean'])} ± {fmt(g['sd'])}"
        for col, groups in m.get("subgroups", {}).items()
        for value, g in groups.items()
    ]


def _finished_repeats(study: Path, model: str) -> int:
    """The leading repeats of a study model whose every fold has held-out predictions."""
    done = 0
    k = len(json.loads((Path(study) / "splits.json").read_text())["folds"])
    for r in range(n_repeats(study)):
        runs = fold_runs(study, model, r)
        if len(runs) != k or not all((run / "predictions_test.csv").is_file() for run in runs):
            break
        done += 1
    return done


def _same_fold_sets(studies: list[Path], repeats: int) -> bool:
    """Whether the studies' repeats hold the same held-out folds (same data, grouping and seed, or shared splits)."""

    def folds(study: Path, r: int) -> list[frozenset]:
        f = study / ("splits.json" if r == 0 else f"splits_repeat{r}.json")
        if not f.is_file():
            return []
        return [frozenset(fold.get("test", fold.get("val", []))) for fold in json.loads(f.read_text())["folds"]]

    return all(len({tuple(folds(st, r)) for st in studies}) == 1 and folds(studies[0], r) for r in range(repeats))


def compare_studies(
    members: list[str],
    *,
    baseline: str | None = None,
    n_boot: int = 2000,
    figures: str | Path | None = None,
    fuse: list[str] = (),
) -> dict:
    """Paired comparison of models from different studies on the same cases (e.g. whole scan vs lesion ROI).

    Studies that share folds (the same data and seed, or ``data.splits``) score every case once each, so their pooled
    out-of-fold predictions can be compared case by case: DeLong's test for correlated AUCs and McNemar's test at
    each fold's own threshold, exactly as within one study. Studies with the same repeats on the same fold sets also
    get the repeated-CV summary (AUC per repeat, mean ± SD, corrected resampled t-test) under ``repeated``.

    Args:
        members: ``LABEL=STUDY_DIR:MODEL`` (``STUDY_DIR:MODEL`` uses ``MODEL`` as the label).
        baseline: the reference label (default: the first member).
        n_boot: bootstrap resamples for the pooled metrics.
        figures: optional folder for ``roc.png`` (overlay with bootstrap bands) and ``reliability.png``.
        fuse: late fusions to add as members, ``LABEL=A+B`` (the mean of members A's and B's probabilities per case,
            on the same folds: no fitting, so no leakage).

    Returns:
        ``pooled`` (per label), ``comparisons`` (against the baseline), ``figures`` and a ``text`` table.

    Raises:
        ValueError: for a malformed member, a non-binary study, a study without predictions, duplicate labels or
            different case sets.
    """
    preds, where = _read_members(members)
    labels = list(preds)
    baseline = baseline or labels[0]
    ref = set(preds[baseline].paths)
    for label, pr in preds.items():
        if set(pr.paths) != ref:
            raise ValueError(
                f"{label!r} and {baseline!r} were scored on different cases; use studies with the same data"
            )
    fused = _add_fusions(preds, fuse)
    labels = list(preds)
    evals = {label: evaluate_binary(pr, None, n_boot=n_boot) for label, pr in preds.items()}
    comparisons = compare_models(preds, baseline)
    # Repeated CV on shared fold sets: every repeat's AUC, and the corrected resampled t-test across the studies.
    # An interrupted study counts with the repeats it finished (every repeat's folds must match the others').
    repeated = None
    r = min(_finished_repeats(st, model) for st, model in where.values())
    if r > 1 and _same_fold_sets([st for st, _ in where.values()], r):
        repeated = _repeated_summary(where, baseline, r, fused)
    figs = []
    if figures is not None:
        aucs = {n: (e["auc_delong"]["auc"], *e["auc_delong"]["ci95"]) for n, e in evals.items()}
        figs = [
            str(plots.roc_plot(preds, Path(figures) / "roc.png", aucs=aucs)),
            str(plots.reliability_plot(preds, Path(figures) / "reliability.png")),
        ]
    return {
        "members": members,
        "baseline": baseline,
        "pooled": evals,
        "comparisons": comparisons,
        "repeated": repeated,
        "figures": figs,
        "text": _compare_text(labels, evals, comparisons, repeated),
    }


def _read_members(members: list[str]) -> tuple[dict[str, Predictions], dict[str, tuple[Path, str]]]:
    """Each ``LABEL=STUDY_DIR:MODEL`` member's pooled out-of-fold predictions, and where they come from."""
    preds: dict[str, Predictions] = {}
    where: dict[str, tuple[Path, str]] = {}
    for m in members:
        label, sep, rest = m.rpartition("=")
        study, colon, model = rest.rpartition(":")
        if not colon or not study or not model:
            raise ValueError(f"{m!r}: expected LABEL=STUDY_DIR:MODEL")
        label = label if sep else model
        if label in preds:
            raise ValueError(f"label {label!r} is given twice; name members LABEL=STUDY_DIR:MODEL")
        task = json.loads((Path(study) / "study.json").read_text())["config"]["data"]["task"]
        if task != "binary":
            raise ValueError(f"{study} is a {task} study; compare-studies compares binary (benign vs malignant) ones")
        preds[label] = study_predictions(Path(study), model)
        where[label] = (Path(study), model)
    if len(preds) < 2:
        raise ValueError("compare at least two members")
    return preds, where


def _add_fusions(preds: dict[str, Predictions], fuse: list[str]) -> dict[str, list[str]]:
    """Add each ``NEW_LABEL=A+B`` late fusion to ``preds``; returns the fused labels' members."""
    fused: dict[str, list[str]] = {}
    for spec in fuse:
        label, _, rest = spec.partition("=")
        parts = rest.split("+")
        if not label or len(parts) < 2 or any(p not in preds for p in parts) or label in preds:
            raise ValueError(f"--fuse {spec!r}: expected NEW_LABEL=A+B with A, B among {sorted(preds)}")
        fused[label] = parts
        preds[label] = fuse_predictions([preds[p] for p in parts])
    return fused


def _compare_text(labels: list[str], evals: dict, comparisons: dict, repeated: dict | None) -> str:
    """The table ``liverus compare-studies`` prints: each member against the baseline, and the repeats if any."""
    lines = [f"{'member':34s} {'pooled AUC [95% CI]':24s} {'sens':>6s} {'spec':>6s} {'ΔAUC [95% CI]':>24s} {'p':>7s}"]
    for label in labels:
        a, m, c = evals[label]["auc_delong"], evals[label]["metrics"], comparisons.get(label)
        diff = f"{fmt(c['auc_diff'])} [{fmt(c['auc_diff_ci95'][0])}, {fmt(c['auc_diff_ci95'][1])}]" if c else "ref"
        lines.append(
            f"{label:34s} {fmt(a['auc'])} [{fmt(a['ci95'][0])}, {fmt(a['ci95'][1])}]    "
            f"{fmt(m['sensitivity']):>6s} {fmt(m['specificity']):>6s} {diff:>24s} "
            f"{fmt(c['delong_p'], 4) if c else '':>7s}"
        )
    if repeated is not None:
        head = f"{'member':34s} {'pooled AUC per repeat':36s} {'mean ± SD':>14s} {'corrected t p':>14s}"
        lines += ["", f"repeated cross-validation: {repeated['repeats']} repeats on shared fold sets", head]
        for label in labels:
            m = repeated["models"][label]
            per = ", ".join(fmt(a) for a in m["auc_per_repeat"])
            c = repeated["comparisons"].get(label)
            p = fmt(c["corrected_t"]["p_value"], 4) if c else "ref"
            lines.append(f"{label:34s} {per:36s} {fmt(m['mean']) + ' ± ' + fmt(m['sd']):>14s} {p:>14s}")
            lines += _subgroup_lines(m, 2)
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """Markdown tables of a study summary (pooled metrics, paired tests, image-size subgroups) for docs."""
    # The tables end without a line break, as docs paste them.
    return render("study_summary.md.j2", summary=summary).removesuffix("\n")
