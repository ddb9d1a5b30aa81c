"""Metrics against scikit-learn, DeLong against an independent O(n*m) implementation, calibration, bad input,
reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from liverus.evaluation import EvaluationError, binary_metrics, bootstrap_ci, choose_threshold, multiclass_metrics
from liverus.evaluation.analysis import Predictions, compare_models, evaluate_binary, subgroup_table
from liverus.evaluation.stats import (
    apply_temperature,
    calibration_summary,
    delong_ci,
    delong_test,
    expected_calibration_error,
    fit_temperature,
    mcnemar_test,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0, 1)
    return y, p


def test_binary_metrics_match_sklearn(scored):
    y, p = scored
    m = binary_metrics(y, p, 0.45)
    pred = (p >= 0.45).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    P = rng.dirichlet([1, 1, 1], 200)
    P[np.arange(200), y] += 0.5
    P /= P.sum(1, keepdims=True)
    m = multiclass_metrics(y, P, ("normal", "benign", "malignant"))
    assert m["macro"]["auc"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, P.argmax(1)))
    assert m["per_class"]["benign"]["sensitivity"] == pytest.approx(skm.recall_score(y, P.argmax(1), average=None)[1])


def test_thresholds_youden_and_target_sensitivity(scored):
    y, p = scored
    t = choose_threshold(y, p, "youden")
    fpr, tpr, thr = skm.roc_curve(y, p)
    j = tpr - fpr
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(j.max())
    t95 = choose_threshold(y, p, "sensitivity", 0.95)
    assert binary_metrics(y, p, t95)["sensitivity"] >= 0.95
    assert binary_metrics(y, p, t95 + 1e-6)["sensitivity"] < 0.95 or t95 == p.max()
    with pytest.raises(ValueError):
        choose_threshold(y, p, "magic")


def _delong_naive(y, p):
    """Straight from DeLong et al. (1988): placement values by explicit pairwise comparison, O(n*m)."""
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    return auc, var, v10, v01


def test_delong_matches_naive_implementation_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.25, 120), 0, 1), 1)  # heavy ties
    auc, lo, hi = delong_ci(y, p)
    auc_n, var_n, _, _ = _delong_naive(y, p)
    assert auc == pytest.approx(auc_n) and auc == pytest.approx(skm.roc_auc_score(y, p))
    z = 1.959963984540054
    assert lo == pytest.approx(max(0, auc_n - z * math.sqrt(var_n)))
    assert hi == pytest.approx(min(1, auc_n + z * math.sqrt(var_n)))


def test_delong_paired_test_matches_naive_covariance():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 150)
    a = np.clip(0.4 * y + rng.normal(0.3, 0.2, 150), 0, 1)
    b = np.clip(0.2 * y + 0.5 * a + rng.normal(0.1, 0.2, 150), 0, 1)
    res = delong_test(y, a, b)
    auc_a, _, v10a, v01a = _delong_naive(y, a)
    auc_b, _, v10b, v01b = _delong_naive(y, b)
    m, n = len(v10a), len(v01a)
    cov10 = np.cov(np.vstack([v10a, v10b]))
    cov01 = np.cov(np.vstack([v01a, v01b]))
    S = cov10 / m + cov01 / n
    var = S[0, 0] + S[1, 1] - 2 * S[0, 1]
    z = (auc_a - auc_b) / math.sqrt(var)
    from scipy.stats import norm

    assert res["diff"] == pytest.approx(auc_a - auc_b)
    assert res["z"] == pytest.approx(z)
    assert res["p_value"] == pytest.approx(2 * norm.sf(abs(z)))
    assert delong_test(y, a, a)["p_value"] == 1.0


def test_mcnemar_exact():
    y = np.array([1] * 20)
    a = np.array([1] * 15 + [0] * 5)
    b = np.array([1] * 5 + [0] * 15)
    r = mcnemar_test(y, a, b)
    assert r["a_right_b_wrong"] == 10 and r["a_wrong_b_right"] == 0
    assert r["p_value"] == pytest.approx(2 * 0.5**10)


def test_bootstrap_ci_contains_point_estimate_and_is_seeded(scored):
    y, p = scored
    ci = bootstrap_ci(y, p, 0.5, n_resamples=300, seed=1)
    m = binary_metrics(y, p, 0.5)
    for k in ("auc", "sensitivity", "specificity", "ppv", "mcc"):
        assert ci[k][0] <= m[k] <= ci[k][1], k
    assert ci == bootstrap_ci(y, p, 0.5, n_resamples=300, seed=1)
    # Stratified: with 20 positives of 300 every resample still has positives, so sensitivity is always defined.
    y2 = np.r_[np.ones(20, int), np.zeros(280, int)]
    ci2 = bootstrap_ci(y2, np.linspace(0, 1, 300), 0.5, n_resamples=200)
    assert not math.isnan(ci2["sensitivity"][0])


def test_calibration_ece_brier_and_temperature():
    rng = np.random.default_rng(5)
    p_true = rng.uniform(0, 1, 4000)
    y = (rng.uniform(0, 1, 4000) < p_true).astype(int)
    assert expected_calibration_error(y, p_true) < 0.03
    over = apply_temperature(p_true, 0.4)  # over-confident version
    assert expected_calibration_error(y, over) > 0.08
    t = fit_temperature(y, over)
    assert t == pytest.approx(1 / 0.4, rel=0.15)
    assert expected_calibration_error(y, apply_temperature(over, t)) < 0.03
    s = calibration_summary(y, p_true)
    assert s["brier"] == pytest.approx(skm.brier_score_loss(y, p_true))
    assert len(s["reliability"]["mean_predicted"]) == 10


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([0, 1, 1], [0.1, 0.9], "mismatched lengths"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([], [], "no cases"),
        ([0, 2], [0.1, 0.2], "labels must be in"),
    ],
)
def test_bad_input_is_a_clear_error(y, p, match):
    with pytest.raises(EvaluationError, match=match):
        binary_metrics(y, p)


def test_one_class_only_is_marked_undefined_not_a_crash():
    m = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    assert math.isnan(m["auc"]) and "no benign" in m["undefined"]["auc"]
    assert math.isnan(m["specificity"]) and m["sensitivity"] == pytest.approx(2 / 3)
    assert math.isnan(delong_ci([1, 1], [0.1, 0.2])[0])
    with pytest.raises(EvaluationError, match="both classes"):
        delong_test([1, 1], [0.1, 0.2], [0.3, 0.4])
    # predictions of one class only: PPV undefined, marked
    m = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 0.9)
    assert math.isnan(m["ppv"]) and "ppv" in m["undefined"]


def _preds(y, p, meta=None):
    return Predictions(
        [f"/c{i}" for i in range(len(y))],
        np.asarray(y),
        np.asarray(p),
        (np.asarray(p) >= 0.5) * 1,
        meta or [{} for _ in y],
    )


def test_subgroups_and_paired_comparison(scored):
    y, p = scored
    meta = [
        {"orig_width": "1024", "orig_height": "768"} if i % 3 else {"orig_width": "720", "orig_height": "576"}
        for i in range(len(y))
    ]
    pr = _preds(y, p, meta)
    table = subgroup_table(pr, "size_group", 0.5)
    assert set(table) == {"1024x768", "other"}
    assert table["1024x768"]["n"] + table["other"]["n"] == len(y)
    sel = np.array([i % 3 != 0 for i in range(len(y))])
    assert table["1024x768"]["auc"] == pytest.approx(skm.roc_auc_score(y[sel], p[sel]))
    with pytest.raises(ValueError, match="not in the predictions"):
        subgroup_table(pr, "scanner", 0.5)
    worse = _preds(y, np.clip(p + np.random.default_rng(0).normal(0, 0.3, len(p)), 0, 1))
    comp = compare_models({"base": worse, "better": pr}, "base")
    assert comp["better"]["auc_diff"] > 0 and comp["better"]["delong_p"] < 0.05
    ev = evaluate_binary(pr, 0.5, n_boot=200, subgroups=["size_group"])
    assert ev["auc_delong"]["ci95"][0] < ev["metrics"]["auc"] < ev["auc_delong"]["ci95"][1]


def test_report_renders_self_contained_html(tmp_path, scored):
    from liverus.evaluation.report import figures_html, metrics_table_html, render_report

    y, p = scored
    pr = _preds(y, p)
    ev = evaluate_binary(pr, 0.5, n_boot=100)
    html = metrics_table_html({"m": ev}) + figures_html({"m": pr}, {"m": ev}, tmp_path / "figs")
    path = render_report(tmp_path / "r.html", "test report", [("Metrics", html)])
    text = path.read_text()
    assert "data:image/png;base64," in text and "ROC AUC" in text and "not a diagnosis" in text
    assert "<script src" not in text and "http" not in text.split("<body>")[1]


def test_temperature_scaling_reduces_nll_and_recalibration_slope():
    from liverus.evaluation.stats import apply_temperature, calibration_slope_intercept, fit_temperature

    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-3 * z))  # three times too confident
    t = fit_temperature(y, over)
    fixed = apply_temperature(over, t)

    def nll(p):
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    assert t == pytest.approx(3.0, rel=0.15) and nll(fixed) < nll(over)
    cal = calibration_slope_intercept(y, over)
    assert cal["slope"] == pytest.approx(1 / 3, rel=0.15)  # too extreme: slope below 1
    well = calibration_slope_intercept(y, 1 / (1 + np.exp(-z)))
    assert well["slope"] == pytest.approx(1.0, abs=0.12) and abs(well["intercept"]) < 0.1


def test_operating_points_on_a_known_roc():
    from liverus.evaluation.metrics import operating_points

    # Ten benign scores 0.0..0.9 and ten malignant 0.5..1.4 (scaled into [0, 1]).
    p = np.r_[np.arange(10) / 10, 0.5 + np.arange(10) / 10] / 1.4
    y = np.r_[np.zeros(10), np.ones(10)].astype(int)
    pts = operating_points(y, p)
    assert pts["rule_out"]["sensitivity"] >= 0.95 and pts["rule_in"]["specificity"] >= 0.90
    assert pts["rule_out"]["threshold"] == pytest.approx(0.5 / 1.4)  # the highest threshold keeping every malignant
    # Ten benign cases cannot promise a specificity of 0.90 with 95% confidence (10 of 10: lower bound 0.74): the
    # closest is the lowest threshold with no benign case above it, and the point says that its target is not held.
    assert pts["rule_in"]["threshold"] == pytest.approx(1.0 / 1.4) and pts["rule_in"]["specificity"] == 1.0
    assert not pts["rule_in"]["target_held"] and not pts["rule_out"]["target_held"]
    assert pts["rule_in"]["specificity_ci95"][0] == pytest.approx(0.025 ** (1 / 10))  # exact: (alpha / 2)^(1 / n)
    assert pts["youden"]["sensitivity"] + pts["youden"]["specificity"] - 1 == pytest.approx(0.5)
    # Without the confidence bound the point estimate decides (one benign above the rule-in point).
    assert choose_threshold(y, p, "specificity", 0.90) == pytest.approx(0.9 / 1.4)


def test_rule_out_and_rule_in_hold_at_their_lower_confidence_bound():
    from scipy.stats import beta

    from liverus.evaluation.metrics import operating_points, proportion_interval

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(400)].astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, 700) + 2.0 * y)))
    pts = operating_points(y, p)
    pos, neg = p[y == 1], p[y == 0]

    def lower(k: int, n: int) -> float:
        return float(beta.ppf(0.05, k, n - k + 1))

    out, inn = pts["rule_out"], pts["rule_in"]
    k = int((pos >= out["threshold"]).sum())
    assert lower(k, 400) >= 0.95 and out["target_held"]
    # The next higher threshold would not promise it: the point is the highest that does.
    higher = np.sort(pos[pos > out["threshold"]])[0]
    assert lower(int((pos >= higher).sum()), 400) < 0.95
    # So its sensitivity on these data sits above the target, by the margin the bound asks for.
    assert out["sensitivity"] > 0.96 and out["sensitivity_ci95"] == pytest.approx(list(proportion_interval(k, 400)))
    k = int((neg < inn["threshold"]).sum())
    assert lower(k, 300) >= 0.90 and inn["target_held"]
    lower_t = np.sort(p[p < inn["threshold"]])[-1]
    assert lower(int((neg < lower_t).sum()), 300) < 0.90
    assert out["threshold"] < pts["youden"]["threshold"] < inn["threshold"]


def test_corrected_resampled_ttest_against_a_hand_computation():
    from scipy.stats import t as t_dist

    from liverus.evaluation.stats import corrected_resampled_ttest

    d = [0.02, 0.05, -0.01, 0.03, 0.04, 0.00, 0.02, 0.06, 0.01, 0.03]  # 2 repeats x 5 folds
    mean = sum(d) / 10
    var = sum((x - mean) ** 2 for x in d) / 9
    se = ((1 / 10 + 100 / 400) * var) ** 0.5  # n_test / n_train = 1 / 4 for 5 folds
    want_t = mean / se
    got = corrected_resampled_ttest(d, n_train=400, n_test=100)
    assert got["t"] == pytest.approx(want_t) and got["df"] == 9 and got["n"] == 10
    assert got["p_value"] == pytest.approx(2 * t_dist.sf(abs(want_t), 9))
    naive = mean / (var / 10) ** 0.5
    assert abs(got["t"]) < abs(naive)  # the correction widens the interval


def test_net_benefit_by_hand():
    from liverus.evaluation.stats import net_benefit

    y = [1, 1, 0, 0, 0, 1, 0, 0]
    p = [0.9, 0.4, 0.35, 0.1, 0.6, 0.8, 0.2, 0.05]
    nb = net_benefit(y, p, [0.3])
    # At 0.3: called malignant 0.9, 0.4, 0.35, 0.6, 0.8 -> TP 3, FP 2; n = 8.
    assert nb["model"][0] == pytest.approx(3 / 8 - 2 / 8 * 0.3 / 0.7)
    assert nb["treat_all"][0] == pytest.approx(3 / 8 - 5 / 8 * 0.3 / 0.7)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        net_benefit(y, p, [1.0])


def test_faithfulness_table_says_so_when_heatmaps_are_below_chance():
    from liverus.evaluation.report import faithfulness_html

    good = {"n": 10, "pointing_game": 0.8, "energy_inside": 0.6, "lesion_area": 0.2}
    bad = {"n": 10, "pointing_game": 0.1, "energy_inside": 0.15, "lesion_area": 0.23}
    assert "Below chance" not in faithfulness_html({"a": {"gradcam": good, "attention": None}})
    text = faithfulness_html({"a": {"gradcam": good}, "b": {"gradcam": bad}})
    assert "Below chance" in text and "b (gradcam)" in text and "a (gradcam)" not in text.split("Below chance")[1]


def test_repeated_cv_reports_the_auc_inside_each_size_group_per_repeat():
    from liverus.evaluation.study import _subgroup_aucs, _subgroup_lines

    rng = np.random.default_rng(0)
    n = 120
    y = rng.integers(0, 2, n)
    big = np.arange(n) < 70
    meta = [{"orig_width": "1024", "orig_height": "768"} if b else {"orig_width": "720", "orig_height": "576"}
            for b in big]  # fmt: skip
    repeats = []
    for r in range(3):
        # The size shortcut: the large group is mostly malignant and scored high, whatever the lesion.
        p = np.clip(0.3 * y + 0.5 * big + rng.normal(0, 0.3 + 0.1 * r, n), 0, 1)
        repeats.append(Predictions([f"c{i}" for i in range(n)], y, p, (p > 0.5).astype(int), meta))
    out = _subgroup_aucs(repeats)["size_group"]
    assert set(out) == {"1024x768", "other"} and out["1024x768"]["n"] == 70
    for value, sel in (("1024x768", big), ("other", ~big)):
        want = [skm.roc_auc_score(y[sel], pr.p[sel]) for pr in repeats]
        np.testing.assert_allclose(out[value]["auc_per_repeat"], want)
        assert out[value]["mean"] == pytest.approx(np.mean(want)) and out[value]["sd"] == pytest.approx(
            np.std(want, ddof=1)
        )
    lines = _subgroup_lines({"subgroups": {"size_group": out}}, 2)
    assert lines[0].startswith("  size_group 1024x768 (n=70): ") and "mean" in lines[0]
    # A subgroup holding one class has no AUC and is left out, not reported as nan.
    one_class = [Predictions(pr.paths, np.where(big, 1, y), pr.p, pr.pred, meta) for pr in repeats]
    assert set(_subgroup_aucs(one_class)["size_group"]) == {"other"}


def test_repeated_subgroups_read_image_sizes_from_the_files_for_every_repeat(tmp_path):
    import cv2

    from liverus.evaluation.study import _subgroup_aucs

    rng = np.random.default_rng(1)
    n = 40
    y = np.tile([0, 1], n // 2)
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), np.zeros((30, 40) if i < 24 else (50, 60), np.uint8))
        paths.append(str(path))
    repeats = [Predictions(paths, y, rng.random(n), np.zeros(n, int), [{} for _ in range(n)]) for _ in range(3)]
    out = _subgroup_aucs(repeats)["image_size"]
    assert set(out) == {"40x30", "60x50"} and out["40x30"]["n"] == 24
    for r, pr in enumerate(repeats):
        assert out["60x50"]["auc_per_repeat"][r] == pytest.approx(skm.roc_auc_score(y[24:], pr.p[24:]))


def test_one_answer_per_lesion_is_the_mean_log_odds_and_per_patient_the_highest_lesion():
    from liverus.engine.predictions import Predictions
    from liverus.evaluation.aggregate import aggregate_predictions, mean_log_odds

    p = np.array([0.9, 0.6, 0.2, 0.3, 0.8])
    y = np.array([1, 1, 0, 0, 1])
    meta = [
        {"patient_id": "a", "lesion_id": "1"},
        {"patient_id": "a", "lesion_id": "1"},
        {"patient_id": "a", "lesion_id": "2"},
        {"patient_id": "b", "lesion_id": "1"},  # patient b's lesion 1 is not patient a's
        {"patient_id": "b", "lesion_id": ""},  # no lesion id: a lesion of its own
    ]
    pr = Predictions([f"i{i}" for i in range(5)], y, p, (p >= 0.5).astype(int), meta)
    lesions = aggregate_predictions(pr, "lesion", 0.5)
    assert lesions.paths == ["lesion:a/1", "lesion:a/2", "lesion:b/1", "lesion:image 5:i4"]
    logit = np.log(p / (1 - p))
    assert lesions.p[0] == pytest.approx(1 / (1 + np.exp(-(logit[0] + logit[1]) / 2)))
    assert mean_log_odds([0.9, 0.6]) == pytest.approx(lesions.p[0]) and lesions.y.tolist() == [1, 0, 0, 1]
    assert [m["n_images"] for m in lesions.meta] == ["2", "1", "1", "1"]
    patients = aggregate_predictions(pr, "patient", 0.5)
    assert patients.paths == ["patient:a", "patient:b"] and patients.y.tolist() == [1, 1]
    assert patients.p.tolist() == pytest.approx([lesions.p[0], 0.8]) and patients.pred.tolist() == [1, 1]
    assert [m["n_lesions"] for m in patients.meta] == ["2", "2"]
    # Without ids there is nothing to aggregate; a lesion whose images disagree on the label is a manifest error.
    # One image listed twice (two boxes: two lesions) without lesion ids: two lesions, the patient's highest wins.
    twice = Predictions(["s", "s"], np.array([0, 1]), np.array([0.1, 0.9]), np.array([0, 1]),
                        [{"patient_id": "c"}, {"patient_id": "c"}])  # fmt: skip
    (patient,) = aggregate_predictions(twice, "patient", 0.5).meta
    assert (
        aggregate_predictions(twice, "patient", 0.5).p.tolist() == pytest.approx([0.9]) and patient["n_lesions"] == "2"
    )
    plain = Predictions(pr.paths, y, p, pr.pred, [{} for _ in range(5)])
    assert aggregate_predictions(plain, "lesion", 0.5) is None
    clash = Predictions(pr.paths, np.array([1, 0, 0, 0, 1]), p, pr.pred, meta)
    with pytest.raises(ValueError, match="lesion 'a/1' has images labelled both"):
        aggregate_predictions(clash, "lesion", 0.5)


def test_macro_average_precision_has_a_bootstrap_interval_around_it():
    from liverus.evaluation.metrics import macro_bootstrap_ci, multiclass_metrics
    from liverus.evaluation.report import multiclass_evaluation

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 40, 50])
    perfect = np.eye(3)[y] * 0.8 + 0.1
    ci = macro_bootstrap_ci(y, perfect, n_resamples=200)
    assert ci["auc"] == (1.0, 1.0) and ci["pr_auc"] == (1.0, 1.0)
    noisy = np.eye(3)[y] + rng.normal(0, 0.8, (len(y), 3))
    noisy = np.exp(noisy) / np.exp(noisy).sum(1, keepdims=True)
    point = multiclass_metrics(y, noisy, ("normal", "benign", "malignant"))["macro"]
    ci = macro_bootstrap_ci(y, noisy, n_resamples=300)
    for k in ("auc", "pr_auc"):
        low, high = ci[k]
        assert low < point[k] < high and 0.02 < high - low < 0.4
    # Scores that ignore the class: the macro average precision sits near the mean prevalence (1/3), not above.
    ci = macro_bootstrap_ci(y, rng.dirichlet(np.ones(3), len(y)), n_resamples=300)
    assert ci["pr_auc"][0] < 0.42 and ci["auc"][0] < 0.5 < ci["auc"][1]
    ev = multiclass_evaluation(noisy, y, ("normal", "benign", "malignant"), n_boot=100)
    assert set(ev["macro_ci95"]) == {"auc", "pr_auc"}
    assert "macro_ci95" not in multiclass_evaluation(noisy, y, ("normal", "benign", "malignant"), n_boot=0)
