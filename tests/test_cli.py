"""The command line end to end: models, data audit/phantom/split, train + report, evaluate, cv and compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

FAST = [
    "data.image_size=64",
    "data.augment=none",
    "optim.batch_size=8",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "runtime.tensorboard=false",
]


def liverus(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liverus.cli", *args], capture_output=True, text=True, timeout=timeout)


def _sets(items):
    return [a for o in items for a in ("--set", o)]


@pytest.mark.slow
def test_models_lists_every_model_with_params_and_macs():
    from liverus.models import list_models

    p = liverus("models", "--size", "64")
    assert p.returncode == 0, p.stderr
    for name in list_models():
        assert name in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("custom_resnet50 "))
    assert "42,908,836" in line


def test_data_tools(tmp_path, aul_root):
    p = liverus("data", "audit", str(aul_root), "--json", str(tmp_path / "audit.json"))
    assert p.returncode == 0, p.stderr
    assert "WARNING SHORTCUT" in p.stdout
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["counts"]["malignant"] == 342
    ph = tmp_path / "ph"
    assert liverus("data", "phantom", "--out", str(ph), "--patients", "12", "--size", "96").returncode == 0
    again = liverus("data", "phantom", "--out", str(ph), "--patients", "12")
    assert again.returncode == 2 and "exists" in again.stderr
    p = liverus("data", "split", str(ph), "--out", str(tmp_path / "s.json"), "--folds", "2")
    assert p.returncode == 0, p.stderr
    assert len(json.loads((tmp_path / "s.json").read_text())["folds"]) == 2


def test_bad_config_and_missing_data_are_clear_errors(tmp_path):
    p = liverus("train", "--out", str(tmp_path / "r"), "--set", "optim.lrr=1")
    assert p.returncode == 2 and "unknown key optim.lrr" in p.stderr
    p = liverus("train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "nope"))
    assert p.returncode == 2 and "nope" in p.stderr and "does not exist" in p.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    p = liverus(
        "train",
        "--out",
        str(out),
        "--model",
        "custom_efficientnet_lite0",
        *_sets([*FAST, "data.phantom_patients=20", "data.phantom_size=96"]),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p.stdout


def test_train_writes_report_and_metrics(trained):
    out, stdout = trained
    assert "report:" in stdout
    html = (out / "report.html").read_text()
    for needle in ("ROC AUC", "Sensitivity", "Specificity", "DeLong", "data:image/png;base64", "Configuration"):
        assert needle in html, needle
    metrics = json.loads((out / "metrics.json").read_text())
    assert "val" in metrics and "ci95_bootstrap" in metrics["val"] and "faithfulness" in metrics
    t = metrics["temperature_scaling"]
    assert t["temperature"] > 0 and t["val"]["ece_after"] <= t["val"]["ece_before"] + 1e-9
    assert {"slope", "intercept"} <= set(metrics["val"]["calibration"])


def test_train_writes_a_model_report_with_every_item_it_claims(trained):
    import hashlib

    from liverus.evaluation.model_report import PERSON

    out, _ = trained
    card = json.loads((out / "model_card.json").read_text())
    md = (out / "MODEL_REPORT.md").read_text()
    for key, value in card.items():
        assert value not in (None, "", {}, []), key  # every item is filled, or marked for a person
        assert f"## {key.replace('_', ' ')}" in md, key
    assert PERSON in card["ethics_and_consent (TRIPOD+AI 9)"] and PERSON in md
    training = card["training (TRIPOD+AI 12d, 12e; CLAIM 22-25)"]
    assert training["group_disjointness_check"].startswith("passed") and training["seed"] == 0
    assert training["splits_sha256"] == hashlib.sha256((out / "splits.json").read_bytes()).hexdigest()
    model = card["model (TRIPOD+AI 12c; CLAIM 17-19)"]
    assert model["model_file_sha256"] == hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()
    assert model["parameters"] > 1_000_000 and model["weights"]["kind"] == "random"
    assert model["build_arguments"]["in_chans"] == 1  # what the file is rebuilt with, readable beside the weights
    perf = card["performance_with_95pct_intervals (TRIPOD+AI 23a; CLAIM 29-32)"]["val"]
    assert "[" in perf["auc"] and perf["calibration_slope"] != "" and perf["n"] > 0
    points = card["operating_points (TRIPOD+AI 12f)"]["named"]
    assert set(points) == {"youden", "rule_out", "rule_in"}
    assert "acquisition shortcut" in card["known_failure_modes (TRIPOD+AI 26; CLAIM 38)"][0]
    # Metrics straight from the evaluation carry NumPy scalars (subgroup tables): the report still writes.
    import numpy as np

    from liverus.evaluation.model_report import write_model_report
    from liverus.evaluation.report import cases_of_run

    metrics = json.loads((out / "metrics.json").read_text())
    metrics["val"]["subgroups"] = {"image_size": {"96x96": {"auc": np.float64(0.5), "n": np.int64(3)}}}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    write_model_report(out, metrics, cases_of_run(cfg, out), None)
    assert "96x96" in (out / "MODEL_REPORT.md").read_text()


def test_evaluate_uses_stored_threshold_and_never_overwrites(trained, tmp_path):
    out, _ = trained
    threshold = json.loads((out / "result.json").read_text())["threshold"]
    dest = tmp_path / "ev"
    p = liverus(
        "evaluate", str(out / "model.pt"), "--data", str(out / "phantom"), "--out", str(dest), "--bootstrap", "200",
        "--map-faithfulness", "3",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    m = json.loads((dest / "metrics.json").read_text())
    assert m["threshold"] == pytest.approx(threshold)
    assert (dest / "report.html").is_file() and (dest / "predictions.csv").is_file()
    # Every map of the attention CNN checked against random maps on three cases.
    maps = m["map_faithfulness"]
    assert set(maps) == {"occlusion", "gradcam", "attention"} and all(r["n"] == 3 for r in maps.values())
    for r in maps.values():
        assert 0 <= r["deletion"] <= 1 and 0 <= r["insertion"] <= 1 and isinstance(r["beats_random"], bool)
        assert r["margin_ci95"][0] <= r["margin_over_random"] <= r["margin_ci95"][1]
    assert "Map faithfulness (against the model)" in (dest / "report.html").read_text()
    p = liverus("evaluate", str(out / "model.pt"), "--data", str(out / "phantom"), "--out", str(dest))
    assert p.returncode == 2 and "already holds" in p.stderr


@pytest.mark.slow
def test_compare_runs_every_model_on_the_same_folds_and_resumes(tmp_path):
    study = tmp_path / "study"
    args = [
        "compare",
        "--out",
        str(study),
        "--folds",
        "2",
        "--models",
        "baseline_efficientnet_lite0",
        "custom_efficientnet_lite0",
        *_sets([*FAST, "data.phantom_patients=40", "data.phantom_size=96"]),
    ]
    p = liverus(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((study / "summary.json").read_text())
    assert set(summary["pooled"]) == {"baseline_efficientnet_lite0", "custom_efficientnet_lite0"}
    assert "delong_p" in summary["comparisons"]["custom_efficientnet_lite0"]
    n = {m: summary["pooled"][m]["n"] for m in summary["pooled"]}
    assert len(set(n.values())) == 1  # every model scored every case once
    splits = json.loads((study / "splits.json").read_text())["folds"]
    for model in summary["pooled"]:
        for i, fold in enumerate(splits):
            run_split = json.loads((study / model / f"fold{i}" / "splits.json").read_text())["folds"][0]
            assert sorted(run_split["test"]) == sorted(fold["val"])
            assert not set(run_split["train"]) & set(fold["val"])
    assert (study / "report.html").is_file() and f"report: {study / 'report.html'}" in p.stdout
    report = (study / "report.html").read_text()
    # Each model's own config is shown (not the study's default model name), and the data counted are those scored.
    assert "name: baseline_efficientnet_lite0" in report and "name: custom_efficientnet_lite0" in report
    assert "name: custom_resnet50" not in report
    from liverus.evaluation.study import summary_markdown

    md = summary_markdown(summary)
    assert md.count("| custom_efficientnet_lite0 |") >= 2 and "DeLong p" in md
    # The final-recipe threshold is the Youden point of the pooled out-of-fold probabilities, recomputed here.
    from liverus.evaluation.analysis import read_predictions
    from liverus.evaluation.metrics import choose_threshold

    for model in summary["pooled"]:
        pr = read_predictions([study / model / f"fold{i}" / "predictions_test.csv" for i in range(len(splits))])
        recipe = summary["final_recipe"][model]
        assert recipe["threshold"] == pytest.approx(choose_threshold(pr.y, pr.p))
        results = [json.loads((study / model / f"fold{i}" / "result.json").read_text()) for i in range(len(splits))]
        assert recipe["best_epochs"] == [r["best_epoch"] for r in results]
        assert recipe["fold_thresholds"] == [r["threshold"] for r in results]
        assert f"model.threshold={recipe['threshold']:.4f}" in p.stdout
    # compare-studies reproduces the within-study paired test when both members come from this study.
    out_json = study.parent / "cross.json"
    p = liverus(
        "compare-studies",
        f"base={study}:baseline_efficientnet_lite0",
        f"attn={study}:custom_efficientnet_lite0",
        "--json",
        str(out_json),
        "--bootstrap",
        "200",
        "--figures",
        str(study.parent / "cross_figs"),
    )
    assert p.returncode == 0, p.stderr
    for fig in ("roc.png", "reliability.png"):
        assert cv2.imread(str(study.parent / "cross_figs" / fig)) is not None
    cross = json.loads(out_json.read_text())["comparisons"]["attn"]
    within = summary["comparisons"]["custom_efficientnet_lite0"]
    assert cross["auc_diff"] == pytest.approx(within["auc_diff"]) and cross["delong_p"] == pytest.approx(
        within["delong_p"]
    )
    assert "attn" in p.stdout and "base" in p.stdout
    for bad, msg in [
        ([f"{study}:custom_efficientnet_lite0"], "at least two"),
        ([f"a={study}:custom_efficientnet_lite0", f"a={study}:baseline_efficientnet_lite0"], "twice"),
        ([f"a={study}:custom_efficientnet_lite0", "b=nowhere"], "STUDY_DIR:MODEL"),
        ([f"a={study}:custom_efficientnet_lite0", f"b={study}:no_such_model"], "no finished cross-validation"),
    ]:
        p = liverus("compare-studies", *bad)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
    members = [f"{study}:baseline_efficientnet_lite0", f"{study}:custom_efficientnet_lite0"]
    p = liverus("compare-studies", *members, "--json", str(out_json))
    assert p.returncode == 2 and "already exists" in p.stderr
    # Without --resume an existing study is refused; with it, finished runs are reused (nothing retrained).
    assert liverus(*args).returncode == 2
    before = (study / "custom_efficientnet_lite0" / "fold0" / "model.pt").stat().st_mtime_ns
    p = liverus(*args, "--resume")
    assert p.returncode == 0, p.stderr
    assert (study / "custom_efficientnet_lite0" / "fold0" / "model.pt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_cv_single_model(tmp_path):
    p = liverus(
        "cv",
        "--out",
        str(tmp_path / "cv"),
        "--folds",
        "2",
        "--model",
        "baseline_efficientnet_lite0",
        *_sets([*FAST, "data.phantom_patients=36", "data.phantom_size=96"]),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "baseline_efficientnet_lite0" in p.stdout
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert len(summary["per_fold"]["baseline_efficientnet_lite0"]["auc"]["per_fold"]) == 2


@pytest.mark.slow
def test_demo_command_is_wired(tmp_path):
    # The full demo takes minutes; here its pipeline runs with one epoch on a small phantom.
    from liverus.demo import DEMO_OVERRIDES

    assert any(o.startswith("optim.epochs=") for o in DEMO_OVERRIDES)
    p = liverus("demo", "--out", str(tmp_path / "d"), "--epochs", "1", timeout=1200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "baseline_resnet50" in p.stdout and "custom_resnet50" in p.stdout and "report:" in p.stdout
    assert Path(tmp_path / "d" / "report.html").is_file()
    # A first-time user sees what the demo showed and where the report is, not recipe hints or "±n/a" columns.
    assert "final model on every case" not in p.stdout and "±n/a" not in p.stdout


@pytest.mark.slow
def test_repeated_cv_draws_new_group_disjoint_folds_and_compares_validly(tmp_path, monkeypatch):
    from liverus.data import check_disjoint, load_cases, load_splits
    from liverus.training import apply_overrides, load_config
    from liverus.training.experiments import run_study

    cfg = apply_overrides(load_config(), [*FAST, "data.phantom_patients=36", "data.phantom_size=96"])
    models = ["baseline_efficientnet_lite0", "custom_efficientnet_lite0"]
    study = tmp_path / "rep"
    monkeypatch.delenv("LIVERUS_CACHE", raising=False)  # the default: the study's own cache
    summary = run_study(cfg, study, models=models, k=2, repeats=2, n_boot=50)
    # Every repeat uses the study's one cache (decoded images and features), not a second one per model folder.
    assert [p.relative_to(study) for p in study.rglob("cache") if p.is_dir()] == [Path("cache")]
    cases = load_cases(study / "phantom")
    a = load_splits(study / "splits.json", cases)["folds"]
    b = load_splits(study / "splits_repeat1.json", cases)["folds"]
    assert [sorted(f["val"]) for f in a] != [sorted(f["val"]) for f in b]  # new fold assignment
    for fold in a + b:
        check_disjoint(cases, fold)
    assert (study / models[1] / "repeat1" / "fold1" / "model.pt").is_file()
    rep = summary["repeated"]
    assert rep["repeats"] == 2 and len(rep["models"][models[1]]["auc_per_repeat"]) == 2
    c = rep["comparisons"][models[1]]
    assert c["folds"] == 4 and 0 <= c["corrected_t"]["p_value"] <= 1 and len(c["delong_p_per_repeat"]) == 2
    assert "repeated cross-validation: 2 repeats x 2 folds" in summary["text"]
    # Operating points chosen on each fold's validation part, checked on its held-out fold, per repeat.
    transfer = summary["operating_point_transfer"][models[1]]
    assert set(transfer) == {"youden", "rule_out", "rule_in"} and len(transfer["rule_out"]["per_repeat"]) == 2
    assert all(0 <= x["sensitivity"] <= 1 for x in transfer["rule_out"]["per_repeat"])
    # ... with the coverage of each target: repeats (pooled) and folds whose held-out rate reached it.
    out = transfer["rule_out"]
    assert out["folds"] == 4 and out["repeats_met"] == sum(x["met"] for x in out["per_repeat"])
    assert [x["met"] for x in out["per_repeat"]] == [x["sensitivity"] >= 0.95 for x in out["per_repeat"]]
    assert 0 <= out["folds_met"] <= 4 and "folds" not in transfer["youden"]
    with pytest.raises(ValueError, match=r"optim\.lr \(0\.0003 -> 0\.002\)"):
        run_study(apply_overrides(cfg, ["optim.lr=0.002"]), study, models=models, k=2, resume=True)
    again = run_study(cfg, study, models=models, k=2, repeats=2, resume=True, n_boot=50)  # nothing retrained
    assert again["repeated"]["models"] == rep["models"]


@pytest.mark.slow
def test_three_class_model_is_evaluated_end_to_end(tmp_path):
    run = tmp_path / "three"
    p = liverus(
        "train", "--out", str(run), "--model", "custom_efficientnet_lite0",
        *_sets([*FAST, "data.task=three_class", "data.phantom_patients=60", "data.phantom_size=96"]),
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    # The run's own report: its validation images, per class and macro (no malignancy threshold).
    printed = json.loads(p.stdout[: p.stdout.index("}") + 1], parse_constant=pytest.fail)
    assert "threshold" not in printed and 0 <= printed["val_macro_average_precision"] <= 1
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert set(val["per_class"]) == {"normal", "benign", "malignant"}
    assert round(val["macro"]["pr_auc"], 4) == printed["val_macro_average_precision"]
    rows = (run / "predictions_val.csv").read_text().splitlines()
    assert sum(map(sum, val["confusion_matrix"])) == val["n"] == len(rows) - 1
    html = (run / "report.html").read_text()
    assert f"Validation ({val['n']} images)" in html and "average precision" in html and "task: three_class" in html
    assert f"report: {run / 'report.html'}" in p.stdout
    p = liverus("evaluate", str(run / "model.pt"), "--data", str(run / "phantom"), "--out", str(tmp_path / "ev"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "macro AUC" in p.stdout and "macro average precision" in p.stdout
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())["evaluation"]
    assert set(ev["per_class"]) == {"normal", "benign", "malignant"}
    assert 0 <= ev["macro"]["auc"] <= 1 and 0 <= ev["macro"]["pr_auc"] <= 1
    assert len(ev["confusion_matrix"]) == 3 and sum(map(sum, ev["confusion_matrix"])) == ev["n"]
    assert set(ev["calibration"]) == {"normal", "benign", "malignant"}
    assert "average precision" in (tmp_path / "ev" / "report.html").read_text()


@pytest.mark.slow
def test_three_class_study_pools_out_of_fold_class_probabilities(tmp_path):
    from sklearn.metrics import roc_auc_score

    from liverus.engine.predictions import read_class_probabilities
    from liverus.evaluation.study import fold_runs
    from liverus.training import apply_overrides, load_config
    from liverus.training.experiments import run_study

    cfg = apply_overrides(
        load_config(),
        [*FAST, "data.task=three_class", "data.phantom_patients=120", "data.phantom_size=64", "data.group_by=source"],
    )
    study = tmp_path / "three"
    model = "custom_efficientnet_lite0"
    summary = run_study(cfg, study, models=[model], k=2, repeats=2)
    res = summary["results"][model]
    assert res["classes"] == ["normal", "benign", "malignant"] and len(res["repeats"]) == 2
    # Recompute repeat 1's macro AUC by hand from its held-out prediction files.
    paths, y, p, classes = read_class_probabilities([r / "predictions_test.csv" for r in fold_runs(study, model, 1)])
    assert len(set(paths)) == len(paths) == res["pooled"]["n"]  # every case scored once per repeat
    by_hand = np.mean([roc_auc_score(y == i, p[:, i]) for i in range(3)])
    assert res["repeats"][1]["macro_auc"] == pytest.approx(by_hand, abs=1e-9)
    lesion = y > 0
    bvm = roc_auc_score(y[lesion] == 2, p[lesion, 2] / (p[lesion, 1] + p[lesion, 2]))
    assert res["repeats"][1]["benign_vs_malignant_auc"] == pytest.approx(bvm, abs=1e-9)
    assert res["across_repeats"]["macro_auc"]["mean"] == pytest.approx(
        np.mean([r["macro_auc"] for r in res["repeats"]])
    )
    assert sum(map(sum, res["pooled"]["confusion_matrix"])) == res["pooled"]["n"]
    html = (study / "report.html").read_text()
    assert "average precision" in html and "Benign vs malignant" in html and "task: three_class" in html
    assert "macro AUC" in summary["text"]
    from liverus.evaluation.study import compare_studies

    with pytest.raises(ValueError, match="three_class study"):  # its probabilities are not one malignancy score
        compare_studies([f"a={study}:{model}", f"b={study}:{model}"])


def test_three_class_prediction_files_must_agree_on_classes(tmp_path):
    from liverus.engine.predictions import read_class_probabilities

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("path,label,target,p_normal,p_benign,p_malignant,predicted\nx.png,benign,1,0.2,0.5,0.3,benign\n")
    b.write_text("path,label,target,p_benign,p_malignant,predicted\ny.png,benign,0,0.6,0.4,benign\n")
    paths, y, p, classes = read_class_probabilities([a])
    assert classes == ("normal", "benign", "malignant") and p.shape == (1, 3) and y.tolist() == [1]
    with pytest.raises(ValueError, match="b.csv has classes"):
        read_class_probabilities([a, b])
    with pytest.raises(ValueError, match="missing.csv is missing"):
        read_class_probabilities([a, tmp_path / "missing.csv"])


def test_the_cli_reference_page_lists_every_command_with_its_options():
    from liverus.cli import build_parser
    from liverus.cli.reference import cli_reference_markdown, iter_commands

    parser = build_parser()
    page = cli_reference_markdown(parser)
    names = [" ".join(p) for p, _, _ in iter_commands(parser)]
    assert {"train", "cv", "predict", "evaluate", "serve", "export", "data audit", "segment train"} <= set(names)
    for name in names:
        assert f"## `liverus {name}`" in page
    # Each command's options as its --help prints them, an option added later included.
    for option in ("--box", "--box-average", "--lesion-from", "--config"):
        assert option in page
    parser._subparsers._group_actions[0].choices["predict"].add_argument("--brand-new-flag")
    assert "--brand-new-flag" in cli_reference_markdown(parser)


def test_a_box_reaching_past_the_left_edge_is_one_argument():
    from liverus.cli import _attach_box_values, build_parser

    argv = _attach_box_values(["predict", "img.png", "--model", "m.pt", "--out", "o", "--box", "-5,-5.5,40,40"])
    assert argv[-1] == "--box=-5,-5.5,40,40"
    assert build_parser().parse_args(argv).box == "-5,-5.5,40,40"
    assert _attach_box_values(["predict", "--box", "5,5,40,40"]) == ["predict", "--box", "5,5,40,40"]
    assert _attach_box_values(["predict", "--box", "-q"]) == ["predict", "--box", "-q"]  # not a box: argparse decides
