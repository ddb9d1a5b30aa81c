"""The report and page templates: each renders from plain data, HTML escapes what users' files name, Markdown does not,
and every template ships as package data."""

from __future__ import annotations

import fnmatch
import math
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

import liverus
from liverus.engine.predictions import Predictions
from liverus.evaluation.analysis import cv_summary, evaluate_binary
from liverus.evaluation.rendering import environment, render, write_page
from liverus.evaluation.report import render_report, table_html
from liverus.evaluation.study import summary_markdown

ROOT = Path(liverus.__file__).resolve().parent
EVIL = "<b>evil</b>"  # a model label as a user's config or manifest could name it
ESCAPED = "&lt;b&gt;evil&lt;/b&gt;"


@pytest.fixture(scope="module")
def evaluation() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 80), 0, 1)
    meta = [{"kind": "cyst" if i % 2 else "solid"} for i in range(80)]
    pr = Predictions([f"/c{i}" for i in range(80)], y, p, (p >= 0.5) * 1, meta)
    return evaluate_binary(pr, 0.5, n_boot=20, subgroups=["kind"])


@pytest.fixture(scope="module")
def figure(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("figs") / "roc.png"
    cv2.imwrite(str(path), np.zeros((4, 4), np.uint8))
    return path


def _summary(evaluation: dict, labels: list[str]) -> dict:
    """A small study summary (the shape of summary.json) for the given model labels; the first is the baseline."""
    faith = {"n": 4, "pointing_game": 0.5, "energy_inside": 0.1, "lesion_area": 0.2}
    points = {"rule_out": {"target": "sensitivity >= 0.95", "per_repeat": [{"sensitivity": 0.9, "specificity": 0.4}]}}
    return {
        "models": labels,
        "baseline": labels[0],
        "pooled": {n: evaluation for n in labels},
        "per_fold": {n: cv_summary([{"auc": 0.7}, {"auc": 0.8}]) for n in labels},
        "comparisons": {
            n: {
                "auc_diff": 0.05,
                "auc_diff_ci95": [-0.1, 0.2],
                "delong_p": 0.4,
                "mcnemar": {"a_right_b_wrong": 3, "a_wrong_b_right": 2, "p_value": 0.9},
            }
            for n in labels[1:]
        },
        "repeated": {
            "repeats": 2,
            "models": {n: {"auc_per_repeat": [0.7, 0.8], "mean": 0.75, "sd": 0.07} for n in labels},
            "comparisons": {
                n: {"corrected_t": {"mean_diff": 0.01, "p_value": 0.5}, "delong_p_per_repeat": [0.3, 0.6]}
                for n in labels[1:]
            },
        },
        "operating_point_transfer": {n: points for n in labels},
        "final_recipe": {
            n: {
                "threshold": 0.42,
                "sensitivity": 0.8,
                "specificity": 0.6,
                "fold_thresholds": [0.4, 0.45],
                "best_epochs": [3, 5],
                "last_epoch_val_auc_drop": 0.01,
            }
            for n in labels
        },
        "faithfulness": {n: {"gradcam": faith} for n in labels},
        "wall_time_s": {n: 12.5 for n in labels},
    }


def _study_page(tmp_path: Path, summary: dict, figure: Path) -> str:
    keys = ("models", "baseline", "pooled", "comparisons", "per_fold", "repeated", "operating_point_transfer")
    path = write_page(
        tmp_path / "report.html",
        "study.html.j2",
        title="liverus study: " + ", ".join(summary["models"]),
        subtitle=str(tmp_path),
        figure_paths=[figure],
        data_summary={"counts": {"benign": 40, "malignant": 40}, "n_groups": 30, "shortcut": {"auc": 0.55}},
        skipped_files=[{"path": "/data/x.png", "problem": "truncated"}],
        model_configs={n: {"model": {"name": n}} for n in summary["models"]},
        faithfulness_by_model=summary["faithfulness"],
        final_recipe=summary["final_recipe"],
        wall_time_s=summary["wall_time_s"],
        **{k: summary[k] for k in keys},
    )
    return path.read_text()


def test_the_study_report_renders_every_section_from_a_summary(tmp_path, evaluation, figure):
    page = _study_page(tmp_path, _summary(evaluation, ["base", "other"]), figure)
    for heading in (
        "Pooled out-of-fold results",
        "Paired comparison against base",
        "Per-fold AUC",
        "Figures",
        "Repeated cross-validation",
        "Do the operating points transfer?",
        "Subgroups",
        "Final model on every case",
        "Heatmap faithfulness (held-out cases)",
        "Data",
        "Wall time",
        "Configuration",
    ):
        assert f"<h2>{heading}</h2>" in page, heading
    assert "not a diagnosis" in page and "data:image/png;base64," in page
    assert "<th>fold 0</th><th>fold 1</th>" in page and "0.750 ± 0.071" in page  # per-fold AUCs and their spread
    assert "Below chance:</strong> the heatmaps of base (gradcam), other (gradcam)" in page
    assert "1 file(s) skipped" in page and "<td>3 / 2</td>" in page  # McNemar's discordant pairs
    # The whitespace that keeps the templates readable is not in the page: tags follow each other as before.
    assert "<tr><td>ROC AUC</td>" in page and ">\n<" not in page.split("<style>")[0]


def test_a_section_without_content_is_left_out(tmp_path, evaluation, figure):
    summary = _summary(evaluation, ["only"])
    summary["repeated"] = None
    page = _study_page(tmp_path, summary, figure)
    assert "Paired comparison" not in page and "Repeated cross-validation" not in page
    assert "<h2>Per-fold AUC</h2>" in page


def test_html_escapes_labels_and_markdown_keeps_them(tmp_path, evaluation, figure):
    summary = _summary(evaluation, ["base", EVIL])
    page = _study_page(tmp_path, summary, figure)
    assert ESCAPED in page and EVIL not in page
    assert f"<h3>{ESCAPED}</h3><pre>" in page  # the model's config heading
    # Markdown is text for docs: written as the summary names it.
    md = summary_markdown(summary)
    assert f"| {EVIL} |" in md and ESCAPED not in md and not md.endswith("\n")
    # Pages assembled from fragments: the fragments' cells escaped, the fragments themselves not escaped twice.
    report = render_report(tmp_path / "r.html", f"title {EVIL}", [("Table", table_html(["model"], [[EVIL]]))])
    text = report.read_text()
    assert f"<title>title {ESCAPED}</title>" in text and f"<td>{ESCAPED}</td>" in text and "<table>" in text


def test_run_and_evaluation_reports_render(tmp_path, evaluation, figure):
    common = {"figure_paths": [figure], "data_summary": None, "faith": {}}
    run = write_page(
        tmp_path / "run.html",
        "run.html.j2",
        title="liverus run: m",
        evals={"val": evaluation},
        temperature_scaling={
            "temperature": 1.5,
            "fitted_on": "val",
            "val": dict.fromkeys(("ece_before", "ece_after", "brier_before", "brier_after"), 0.1),
        },
        config={"model": {"name": EVIL}},
        **common,
    ).read_text()
    assert "Temperature T = 1.500" in run and f"name: {ESCAPED}" in run and "<h2>Data</h2>" not in run
    maps = {
        "gradcam": {
            "n": 3,
            "deletion": 0.2,
            "random_deletion": 0.3,
            "insertion": 0.7,
            "random_insertion": 0.5,
            "margin_over_random": 0.3,
            "margin_ci95": [0.1, 0.5],
            "beats_random": True,
        },
    }
    ev = write_page(
        tmp_path / "ev.html",
        "evaluation.html.j2",
        title=f"liverus evaluation: {EVIL}",
        name=EVIL,
        threshold=0.5,
        lesion_words="Lesions from the expert masks.",
        evaluation=evaluation,
        per_level={f"{EVIL} per lesion": evaluation},
        map_faithfulness=maps,
        **common,
    ).read_text()
    assert "Stored threshold 0.5000 applied unchanged. Lesions from the expert masks.</p>" in ev
    assert "<h2>Per lesion and per patient</h2>" in ev and f"<th>{ESCAPED} per lesion</th>" in ev
    assert "+0.300 [+0.100, +0.500]" in ev and EVIL not in ev


def test_three_class_reports_render(tmp_path, figure):
    classes = ["normal", "benign", "malignant"]
    ev = {
        "per_class": {c: {"auc": 0.8, "pr_auc": 0.7, "sensitivity": 0.6, "specificity": 0.9} for c in classes},
        "calibration": {c: {"ece": 0.05, "slope": 1.1} for c in classes},
        "macro": {"auc": 0.8, "pr_auc": 0.7, "sensitivity": 0.6, "specificity": 0.9},
        "macro_ci95": {"auc": [0.7, 0.9]},
        "confusion_matrix": [[5, 1, 0], [1, 4, 1], [0, 2, 6]],
        "accuracy": 0.75,
        "balanced_accuracy": 0.74,
    }
    one = write_page(
        tmp_path / "one.html",
        "evaluation_multiclass.html.j2",
        title="t",
        evaluation=ev,
        classes=classes,
        figure_paths=[figure],
    ).read_text()
    assert "<td>0.800 [0.700, 0.900]</td>" in one and "<th>true \\ predicted</th>" in one
    run = write_page(
        tmp_path / "run.html",
        "run_multiclass.html.j2",
        title="t",
        evals={"val": {**ev, "n": 26}, "test": {**ev, "n": 9}},
        classes=classes,
        figure_paths=[figure],
        config={"model": {"name": EVIL}},
    ).read_text()
    assert "<h2>Validation (26 images)</h2>" in run and "<h2>Test (9 images)</h2>" in run
    assert run.count("<td>0.800 [0.700, 0.900]</td>") == 2 and ESCAPED in run and EVIL not in run
    row = {
        "macro_auc": 0.8,
        "macro_average_precision": 0.7,
        "balanced_accuracy": 0.74,
        "auc_per_class": dict.fromkeys(classes, 0.8),
        "benign_vs_malignant_auc": math.nan,
    }
    result = {
        "classes": classes,
        "pooled": ev,
        "benign_vs_malignant": {"auc": 0.9, "ci95": [0.8, 1.0], "n": 14},
        "repeats": [row, row],
    }
    study = write_page(
        tmp_path / "study.html",
        "multiclass_study.html.j2",
        title="t",
        results={EVIL: result},
        confusion_plots={EVIL: figure},
        data_summary=None,
        skipped_files=[],
        model_configs={},
    ).read_text()
    assert f"<h2>{ESCAPED}: every repeat</h2>" in study and "<th>AUC malignant</th>" in study
    assert "Benign vs malignant on the 14 lesion images" in study and "<td>1</td><td>0.800</td>" in study


def test_the_model_report_and_the_page_render():
    items = {"title_and_version": "m, liverus 1", "counts": {"benign": 2}, "failure_modes": ["a <b>"], "n": 3}
    md = render("model_report.md.j2", model_name="m", person="PERSON", items=items)
    assert md.startswith("# Model report: m\n\nGenerated by liverus from the run folder. PERSON marks items")
    assert "## title and version\n\nm, liverus 1\n" in md and "```yaml\nbenign: 2\n```" in md
    assert "- a <b>\n" in md and md.endswith("## n\n\n3\n")
    from liverus.serve.app import render_page

    page = render_page(EVIL, 3 * 2**20)
    assert f'<span id="model-name">{ESCAPED}</span>' in page and "up to 3 MB" in page and "not a diagnosis" in page


def test_every_template_is_rendered_here_and_ships_as_package_data():
    templates = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.j2")}
    pages = {f"evaluation/templates/{t}" for t in environment().list_templates() if not t.startswith("_")}
    rendered = {
        "evaluation/templates/" + name
        for name in (
            "report.html.j2",
            "run.html.j2",
            "evaluation.html.j2",
            "evaluation_multiclass.html.j2",
            "run_multiclass.html.j2",
            "study.html.j2",
            "multiclass_study.html.j2",
            "model_report.md.j2",
            "study_summary.md.j2",
        )
    } | {"serve/templates/index.html.j2"}
    assert pages <= rendered, f"a new template needs a test here: {sorted(pages - rendered)}"
    pyproject = tomllib.loads((ROOT.parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["liverus"]
    assert all(any(fnmatch.fnmatch(t, g) for g in globs) for t in templates), (sorted(templates), globs)
