"""Lesion-aware inputs and feature models: the mask channel, radiomics, box-derived lesions, fitted classifiers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from helpers import run_cli
from liverus.data import (
    Case,
    CaseCache,
    PreprocessConfig,
    box_to_mask,
    box_variants,
    lesion_box,
    load_cases,
    model_pixels,
    select_task,
)
from liverus.data.augment import apply_transform
from liverus.data.preprocess import shifted_box
from liverus.data.radiomics import ALL_FEATURE_NAMES, FEATURE_NAMES, RUN_LENGTH_NAMES, lesion_features
from liverus.engine.forward import average_probabilities, normalize_images
from liverus.engine.heatmaps import gradcam_heatmap
from liverus.engine.predictions import read_predictions
from liverus.models import (
    EnsembleClassifier,
    LesionFeatureModel,
    adapt_input_conv,
    build_model,
    load_model,
    save_model,
)
from liverus.training import ConfigError, apply_overrides, load_config


def _feature(feats: np.ndarray, name: str) -> float:
    return float(feats[ALL_FEATURE_NAMES.index(name)])


def _disc(size: int = 120, radius: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2).astype(np.uint8)


# --- radiomics against hand computations -----------------------------------------------------------------------


def test_disc_is_circular_solid_and_regular_and_a_square_is_less_circular():
    rng = np.random.default_rng(0)
    image = rng.integers(80, 120, (120, 120)).astype(np.uint8)
    disc = lesion_features(image, _disc())
    assert _feature(disc, "shape_circularity") == pytest.approx(1.0, abs=0.1)
    assert _feature(disc, "shape_solidity") == pytest.approx(1.0, abs=0.02)
    assert _feature(disc, "shape_margin_irregularity") < 0.03
    square = np.zeros((120, 120), np.uint8)
    square[30:90, 30:90] = 1
    # A square's circularity is pi/4 = 0.785 (4*pi*A/P^2 with P = 4a).
    assert _feature(lesion_features(image, square), "shape_circularity") == pytest.approx(np.pi / 4, abs=0.06)


def test_checkerboard_glcm_contrast_matches_hand_computation():
    # Alternating pixels of two levels inside the lesion quantise to grey levels 1 and 16: horizontal and vertical
    # neighbours differ by 15 (contrast 225), diagonal neighbours are equal (contrast 0); the mean over the four
    # angles is 112.5.
    yy, xx = np.mgrid[:64, :64]
    image = np.where((yy + xx) % 2 == 0, 50, 200).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 1
    feats = lesion_features(image, mask)
    assert _feature(feats, "texture_glcm_contrast_1") == pytest.approx(112.5, rel=1e-6)
    assert np.isfinite(feats).all() and feats.shape == (len(FEATURE_NAMES),)
    # With the run-length features: the default set first, unchanged.
    wide = lesion_features(image, mask, run_length=True)
    assert wide.shape == (len(ALL_FEATURE_NAMES),) and ALL_FEATURE_NAMES[: len(FEATURE_NAMES)] == FEATURE_NAMES
    np.testing.assert_array_equal(wide[: len(FEATURE_NAMES)], feats)


def _run_length_by_hand(runs_per_direction: list[list[tuple[int, int]]], n_pixels: int) -> dict[str, float]:
    """IBSI run-length features from the (level, length) runs of each direction, averaged over the directions."""
    per = []
    for runs in runs_per_direction:
        n = len(runs)
        lengths = np.array([r[1] for r in runs], float)
        levels = [r[0] for r in runs]
        per.append([
            (1 / lengths**2).sum() / n,
            np.log1p((lengths**2).sum() / n),
            sum(levels.count(g) ** 2 for g in set(levels)) / n**2,
            sum(list(lengths).count(k) ** 2 for k in set(lengths)) / n**2,
            n / n_pixels,
        ])  # fmt: skip
    return dict(zip(RUN_LENGTH_NAMES, np.mean(per, axis=0), strict=True))


def test_run_length_features_match_hand_computation_on_a_square_and_a_checkerboard():
    mask = np.zeros((40, 40), np.uint8)
    mask[10:18, 10:18] = 1  # an 8 x 8 lesion
    diagonal = [1, 2, 3, 4, 5, 6, 7, 8, 7, 6, 5, 4, 3, 2, 1]  # run lengths along either diagonal of a square
    # Uniform: along rows and columns 8 runs of 8, along each diagonal one run per diagonal.
    uniform = lesion_features(np.full((40, 40), 120, np.uint8), mask, run_length=True)
    expected = _run_length_by_hand([[(1, 8)] * 8, [(1, d) for d in diagonal]] * 2, 64)
    for name, value in expected.items():
        assert _feature(uniform, name) == pytest.approx(value, rel=1e-9), name
    # Checkerboard of two levels (quantised to 1 and 16): rows and columns are runs of one pixel; each diagonal
    # holds one level, so the diagonal runs are the square's diagonals, alternating in level.
    yy, xx = np.mgrid[:40, :40]
    board = lesion_features(np.where((yy + xx) % 2 == 0, 50, 200).astype(np.uint8), mask, run_length=True)
    row_runs = [(1 + 15 * ((r + c) % 2 == 0), 1) for r in range(8) for c in range(8)]
    diag_runs = [(1 + 15 * (k % 2 == 0), d) for k, d in enumerate(diagonal)]
    anti_runs = [(1 + 15 * (k % 2 == 1), d) for k, d in enumerate(diagonal)]
    expected = _run_length_by_hand([row_runs, diag_runs, row_runs, anti_runs], 64)
    for name, value in expected.items():
        assert _feature(board, name) == pytest.approx(value, rel=1e-9), name
    assert _feature(board, "texture_glrlm_short_run_emphasis") > _feature(uniform, "texture_glrlm_short_run_emphasis")
    assert _feature(board, "texture_glrlm_run_percentage") > _feature(uniform, "texture_glrlm_run_percentage")


def test_dark_rim_gives_negative_halo_and_bright_band_below_gives_posterior_enhancement():
    image = np.full((160, 160), 100, np.uint8)
    lesion = _disc(160, 30)
    rim = (np.asarray(_disc(160, 36)) - lesion).astype(bool)
    image[rim] = 40
    image[111:140, 50:110] = 180  # below the lesion only
    feats = lesion_features(image, lesion)
    assert _feature(feats, "ultrasound_halo_contrast") < -0.1
    assert _feature(feats, "ultrasound_posterior_enhancement") > 0.3


def test_radiomics_refuses_an_empty_mask():
    with pytest.raises(ValueError, match="lesion mask has 0 pixels"):
        lesion_features(np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8))


# --- the mask channel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [2, 4])
def test_adapted_stem_answers_a_zero_mask_like_the_rgb_stem(in_chans):
    torch.manual_seed(0)
    rgb = torch.randn(8, 3, 3, 3)
    gray = torch.rand(2, 1, 16, 16)
    expected = torch.nn.functional.conv2d(gray.expand(-1, 3, -1, -1), rgb)
    image = gray if in_chans == 2 else gray.expand(-1, 3, -1, -1)
    x = torch.cat([image, torch.zeros_like(gray)], dim=1)
    got = torch.nn.functional.conv2d(x, adapt_input_conv(rgb, in_chans))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapt_input_conv_rejects_five_channels():
    with pytest.raises(ValueError, match="in_chans"):
        adapt_input_conv(torch.randn(8, 3, 3, 3), 5)


@pytest.mark.parametrize("name", ["custom_efficientnet_lite0", "baseline_efficientnet_lite0"])
def test_mask_channel_model_shapes_and_gradient_reaches_the_mask_kernel(name):
    torch.manual_seed(0)
    model = build_model(name, in_chans=2).train()
    pixels = torch.randint(0, 256, (2, 2, 64, 64), dtype=torch.uint8)
    x = normalize_images(pixels, 0.5, 0.5, 2)
    assert x.shape == (2, 2, 64, 64)
    out = model(x)
    assert out.shape == (2, 2)
    out.sum().backward()
    stem = model.backbone.stem()
    assert stem.weight.shape[1] == 2
    assert stem.weight.grad[:, 1].abs().sum() > 0


@pytest.mark.parametrize("in_chans", [1, 2])
def test_a_stem_with_a_mask_channel_learns_at_the_head_rate(in_chans):
    from liverus.training.config import OptimConfig
    from liverus.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = build_model("custom_efficientnet_lite0", in_chans=in_chans)
    optim = OptimConfig(lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.0)
    stem = model.backbone.stem().weight
    group = next(g for g in param_groups(model, optim) if any(p is stem for p in g["params"]))
    assert group["lr"] == pytest.approx(1e-3 if in_chans == 2 else 1e-4)
    assert group["part"] == ("head" if in_chans == 2 else "backbone")
    grouped = [p for g in param_groups(model, optim) for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    if in_chans == 2:  # ten Adam steps move the zero-initialised mask kernel by about 10 x lr, not 10 x lr / 10
        opt = build_optimizer(model, optim)
        x = normalize_images(torch.randint(0, 256, (4, 2, 64, 64), dtype=torch.uint8), 0.5, 0.5, 2)
        model.train()
        for _ in range(10):
            opt.zero_grad()
            model(x)[:, 1].sum().backward()
            opt.step()
        assert stem[:, 1].detach().abs().max() > 5e-3


def test_normalize_keeps_the_mask_in_zero_one_and_rejects_a_missing_mask():
    pixels = np.zeros((1, 3, 8, 8), np.uint8)
    pixels[0, 0] = 128
    pixels[0, 2, 2:4, 2:4] = 1
    x = normalize_images(torch.from_numpy(model_pixels(pixels, True)), 0.5, 0.25, 4)
    assert x.shape == (1, 4, 8, 8)
    assert x[0, 3].sum() == 4 and set(x[0, 3].unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor((128 / 255 - 0.5) / 0.25))
    with pytest.raises(ValueError, match="lesion-mask channel"):
        normalize_images(torch.zeros(1, 1, 8, 8), 0.5, 0.25, 2)


def test_augmentation_moves_the_mask_with_the_image():
    import albumentations as A

    image = np.zeros((32, 32), np.uint8)
    image[:, :8] = 255
    lesion = (image > 0).astype(np.uint8)
    out, moved = apply_transform(A.Compose([A.HorizontalFlip(p=1)]), image, np.ones_like(image), 0, lesion=lesion)
    assert moved[:, -8:].all() and not moved[:, :8].any()
    assert np.array_equal(moved.astype(bool), out > 127)


# --- box-derived lesions -----------------------------------------------------------------------------------------


def test_box_jitter_is_seeded_and_stays_inside_the_image():
    lesion = np.zeros((100, 120), np.uint8)
    lesion[0:30, 90:120] = 1  # a lesion in the corner: jitter must not leave the image
    boxes = {lesion_box(lesion, loosen=0.1, jitter=0.2, seed=s) for s in range(20)}
    assert lesion_box(lesion, jitter=0.2, seed=3) == lesion_box(lesion, jitter=0.2, seed=3)
    assert len(boxes) > 10
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 100
    assert lesion_box(lesion) == (90.0, 0.0, 120.0, 30.0)


def test_averaged_boxes_are_seeded_by_the_box_stay_inside_the_image_and_start_with_the_box():
    box, shape = (90.0, 2.0, 120.0, 30.0), (100, 120)  # at the image's corner
    assert shifted_box(box, shape, shift=0.1, variant=0) == box
    shifted = [shifted_box(box, shape, shift=0.1, variant=k) for k in range(1, 9)]
    assert shifted == [shifted_box(box, shape, shift=0.1, variant=k) for k in range(1, 9)]  # one box, one answer
    assert len(set(shifted)) == 8
    for x0, y0, x1, y1 in shifted:
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 100
        assert max(abs(x0 - 90), abs(x1 - 120)) <= 3.0 + 1e-9 and max(abs(y0 - 2), abs(y1 - 30)) <= 2.8 + 1e-9
    assert shifted_box((20.0, 20.0, 60.0, 50.0), shape, shift=0.1, variant=1) != shifted_box(
        (21.0, 20.0, 60.0, 50.0), shape, shift=0.1, variant=1
    )


def test_box_average_settings_are_checked_and_only_the_box_used_keys_the_cache():
    for bad in ({"box_average": 0}, {"box_average": 17}, {"box_shift": 0.0}, {"box_shift": 0.6},
                {"box_average": 2, "box_variant": 2}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad)) if "box_variant" not in bad else "box_variant"):
            PreprocessConfig(**bad)
    base = PreprocessConfig(crop="roi", lesion_from="box")
    four = PreprocessConfig(crop="roi", lesion_from="box", box_average=4)
    assert base.key() == four.key()  # how many boxes are averaged does not change one box's preprocessing
    variants = box_variants(four)
    assert [v.box_variant for v in variants] == [0, 1, 2, 3] and variants[0].key() == base.key()
    assert len({v.key() for v in variants}) == 4
    assert box_variants(PreprocessConfig(crop="roi", box_average=4)) == (PreprocessConfig(crop="roi", box_average=4),)
    # The setting travels with the weights; a card written before it existed averages nothing.
    from liverus.models.card import ModelCard

    card = ModelCard(model_name="radiomics_svm", classes=("benign", "malignant"), in_chans=2,
                     normalization=(0.5, 0.25), preprocess=four)  # fmt: skip
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))).preprocess == four
    old = card.to_dict()
    for key in ("box_average", "box_shift", "box_variant"):
        del old["preprocess"][key]
    assert ModelCard.from_dict(old).preprocess.box_average == 1
    with pytest.raises(ConfigError, match="data.box_average"):
        apply_overrides(load_config(), ["data.box_average=0"]).validate()


def test_averaged_probabilities_are_the_mean_log_odds():
    p = np.array([[0.9, 0.6, 0.2], [0.5, 0.99, 0.7]])  # two boxes, three cases: p(malignant)
    got = average_probabilities([np.stack([1 - q, q], 1) for q in p])
    logit = np.log(p / (1 - p)).mean(0)
    np.testing.assert_allclose(got[:, 1], 1 / (1 + np.exp(-logit)), rtol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1, rtol=1e-6)
    one = np.array([[0.3, 0.7]], np.float32)
    assert average_probabilities([one]) is one


@pytest.mark.parametrize("method", ["box", "ellipse", "grabcut"])
def test_box_to_mask_stays_inside_the_box(method):
    rng = np.random.default_rng(0)
    image = rng.integers(90, 140, (128, 128)).astype(np.uint8)
    image[_disc(128, 20).astype(bool)] = 30  # a dark lesion
    box = (40.0, 40.0, 90.0, 88.0)
    mask = box_to_mask(image, box, method)
    assert mask.any()
    outside = np.ones_like(mask, bool)
    outside[40:88, 40:90] = False
    assert not mask[outside].any()
    if method == "grabcut":  # the dark disc, not the whole box
        disc = _disc(128, 20).astype(bool)
        assert (mask.astype(bool) & disc).sum() / (mask.astype(bool) | disc).sum() > 0.7


def test_lesion_from_box_uses_the_derived_box(phantom_dir):
    import csv

    with open(phantom_dir / "manifest.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["mask"])
    case = Case(str(phantom_dir / row["path"]), row["label"], row["group"], str(phantom_dir / row["mask"]))
    expert = CaseCache(PreprocessConfig(image_size=64, crop="roi", lesion_channel=True)).get(case)
    boxed = CaseCache(
        PreprocessConfig(image_size=64, crop="roi", lesion_channel=True, lesion_from="box", box_mask="box")
    ).get(case)
    assert expert[2].any() and boxed[2].any()
    assert boxed[2].sum() > expert[2].sum()  # the filled box covers more than the outline


# --- feature models ----------------------------------------------------------------------------------------------


def test_stored_svm_reproduces_scikit_learns_decision():
    rng = np.random.default_rng(0)
    n_feat = len(FEATURE_NAMES)
    x = rng.normal(size=(60, n_feat))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=60) > 0).astype(int)
    svc = SVC(C=1.0, gamma="scale").fit(x, y)
    model = build_model("radiomics_svm", in_chans=2)
    model.load_fitted(
        {
            "support": svc.support_vectors_,
            "dual_coef": svc.dual_coef_[0],
            "intercept": np.asarray(svc.intercept_[0]),
            "gamma": np.asarray(svc._gamma),
            "platt": np.array([1.0, 0.0]),
        }
    )
    got = model.decision(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, svc.decision_function(x), atol=1e-4)
    before = got.copy()
    model.pad_support(int(svc.support_vectors_.shape[0]) + 7)
    np.testing.assert_allclose(model.decision(torch.as_tensor(x, dtype=torch.float32)).double().numpy(), before,
                               atol=1e-5)  # fmt: skip


def _confounded(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (scanner, lesion) of cases whose scanner predicts the class: scanner 1 holds 85% malignant cases,
    scanner 0 15%; the lesion feature carries the class the same way on both scanners."""
    rng = np.random.default_rng(seed)
    scanner = rng.integers(0, 2, n)
    y = (rng.random(n) < np.where(scanner == 1, 0.85, 0.15)).astype(int)
    x = np.column_stack([scanner + rng.normal(scale=0.1, size=n), y + rng.normal(scale=1.0, size=n)])
    return x, y, scanner


def test_balancing_weights_stop_a_fitted_classifier_riding_the_scanner():
    from liverus.training.feature_fit import fit_classifier

    x, y, scanner = _confounded(n=400)
    groups = [str(i) for i in range(len(y))]
    cells = list(zip(y, scanner, strict=True))
    weights = np.array([1.0 / cells.count(c) for c in cells])  # balancing_weights' rule
    plain, _, plain_info, _ = fit_classifier(x, y, groups, "logistic")
    fair, chosen, info, _ = fit_classifier(x, y, groups, "logistic", sample_weight=weights)
    # Weighted, class and scanner are independent: the classifier leans on the lesion, no longer on the scanner.
    assert plain["coef"][0] > 2 * plain["coef"][1] > 0
    assert fair["coef"][1] > 0 and abs(fair["coef"][0]) < 0.2 * fair["coef"][1]
    assert "sample_weight_range" not in plain_info
    lo, hi = info["sample_weight_range"]
    assert lo < 1.0 < hi and np.isclose(hi / lo, weights.max() / weights.min(), rtol=1e-3)
    # Only the weights' ratios count (they are rescaled to mean 1 so that the C grid keeps its meaning).
    again = fit_classifier(x, y, groups, "logistic", sample_weight=weights * 37.0).params
    np.testing.assert_allclose(again["coef"], fair["coef"], rtol=1e-6)
    assert chosen["C"] in (0.01, 0.03, 0.1, 0.3, 1.0)
    for bad in (weights[:-1], -weights, np.where(np.arange(len(y)) == 3, np.nan, weights)):
        with pytest.raises(ValueError, match="sample_weight"):
            fit_classifier(x, y, groups, "logistic", sample_weight=bad)


def test_weighted_svm_equals_scikit_learns_weighted_fit():
    from liverus.training.feature_fit import fit_classifier

    classifier = "svm"

    rng = np.random.default_rng(1)
    n_feat = len(FEATURE_NAMES)
    x = rng.normal(size=(160, n_feat))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=2.0, size=160) > 0).astype(int)  # noisy: the margin is soft
    weights = np.where(y == 1, 3.0, 1.0)
    groups = [str(i // 2) for i in range(160)]  # pairs of rows share a group
    params, chosen, _, _ = fit_classifier(x, y, groups, classifier, sample_weight=weights)
    model = build_model(f"radiomics_{classifier}", in_chans=2)
    model.load_fitted({**params, "platt": np.array([1.0, 0.0])})
    w = weights * (len(weights) / weights.sum())
    ref = SVC(C=chosen["C"], gamma="scale").fit(x, y, sample_weight=w)
    unweighted = SVC(C=chosen["C"], gamma="scale").fit(x, y)
    got = model.decision(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, ref.decision_function(x.astype(np.float32)), atol=1e-4)
    assert np.abs(ref.decision_function(x) - unweighted.decision_function(x)).max() > 0.05  # the weights mattered


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
def test_inner_probabilities_are_out_of_fold_predictions_of_the_chosen_classifier(classifier):
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_predict

    from liverus.training.feature_fit import _inner_cv, fit_classifier

    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 4))
    y = (x[:, 0] + rng.normal(scale=1.5, size=150) > 0).astype(int)
    groups = [str(i // 3) for i in range(150)]  # triples share a group
    fit = fit_classifier(x, y, groups, classifier)
    base = {"logistic": LogisticRegression(max_iter=5000), "svm": SVC(kernel="rbf", gamma="scale")}
    cv = _inner_cv(y, groups, 0)
    if classifier == "svm":
        dv = cross_val_predict(SVC(gamma="scale", C=fit.chosen["C"]), x, y, groups=groups, cv=cv,
                               method="decision_function")  # fmt: skip
        a, b = fit.params["platt"]
        expected = 1 / (1 + np.exp(-(a * dv + b)))
    else:
        expected = cross_val_predict(clone(base[classifier]).set_params(**fit.chosen), x, y, groups=groups, cv=cv,
                                     method="predict_proba")[:, 1]  # fmt: skip
    np.testing.assert_allclose(fit.inner_probabilities, expected, atol=1e-6)
    # Out of fold: a model fitted on every case scores its own training cases differently.
    if classifier != "svm":
        in_sample = clone(base[classifier]).set_params(**fit.chosen).fit(x, y).predict_proba(x)[:, 1]
        assert np.abs(in_sample - fit.inner_probabilities).max() > 0.01
    # Too few groups for an inner cross-validation, or not asked for: no such probabilities, the same classifier.
    assert fit_classifier(x, y, ["one scan"] * 150, classifier).inner_probabilities is None
    unasked = fit_classifier(x, y, groups, classifier, inner_probabilities=False)
    assert unasked.inner_probabilities is None and unasked.chosen == fit.chosen
    for k, v in fit.params.items():
        np.testing.assert_array_equal(unasked.params[k], v)


def test_operating_points_come_from_validation_then_the_config_then_the_inner_cv():
    from types import SimpleNamespace

    from liverus.training.finalize import threshold_source

    with_val, without = SimpleNamespace(val=["a.png"]), SimpleNamespace(val=[])
    assert threshold_source(with_val, 0.3) == threshold_source(with_val, None) == "validation"
    assert threshold_source(without, 0.3) == "fixed"
    assert threshold_source(without, None) == "inner"


@pytest.mark.slow
def test_feature_model_without_validation_fits_every_case_and_takes_its_threshold_from_the_inner_cv(tmp_path):
    from liverus.evaluation.metrics import operating_points
    from liverus.training import train
    from liverus.training.feature_fit import _inner_cv

    run = tmp_path / "no_val"
    result = train(apply_overrides(load_config(), [*RADIOMICS_TINY, "data.val_fraction=0"]), run)
    split = json.loads((run / "splits.json").read_text())["folds"][0]
    from liverus.data import load_task_cases

    cases, _ = load_task_cases(run / "phantom", "binary", "source")
    assert split["val"] == [] and len(split["train"]) == len(cases)
    assert not (run / "predictions_val.csv").exists()
    model, card = load_model(run / "model.pt")
    assert "inner cross-validation" in card.threshold_method and f"{len(cases)} training" in card.threshold_method
    assert set(card.operating_points) == {"youden", "rule_out", "rule_in"}
    assert card.threshold == card.operating_points["youden"] == result.threshold
    # The threshold is the Youden point of the inner folds' probabilities, rebuilt here from the stored features.
    from liverus.training.feature_fit import extract_features

    by_path = {c.path: c for c in cases}
    train_cases = [by_path[p] for p in split["train"]]
    rad, _, y = extract_features(model, train_cases, card.classes, CaseCache(card.preprocess), card)
    x = (rad - model.radiomics_mean.numpy()) / model.radiomics_scale.numpy()
    from sklearn.model_selection import cross_val_predict

    groups = [c.group_key for c in train_cases]
    dv = cross_val_predict(SVC(gamma="scale", C=json.loads((run / "feature_fit.json").read_text())["C"]), x, y,
                           groups=groups, cv=_inner_cv(y, groups, 0), method="decision_function")  # fmt: skip
    a, b = model.platt.numpy()
    youden = operating_points(y, 1 / (1 + np.exp(-(a * dv + b))))["youden"]["threshold"]
    assert card.threshold == pytest.approx(youden, abs=1e-3)


@pytest.mark.slow
def test_test_lesion_from_gives_only_the_held_out_part_its_lesion_from_boxes(tmp_path):
    import csv
    import dataclasses

    from liverus.data import load_task_cases, train_val_test_split
    from liverus.engine.forward import predict_probs
    from liverus.training import train

    base = apply_overrides(load_config(), [*RADIOMICS_TINY, "data.box_jitter=0.2"])
    mask_run, box_run = tmp_path / "mask", tmp_path / "box"
    train(base, mask_run)  # makes the phantom; both runs then share its cases and one split with a test part
    cases, _ = load_task_cases(mask_run / "phantom", "binary", "source")
    split = train_val_test_split(cases, 0.2, 0.25, seed=0)
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, source=str(mask_run / "phantom")))
    train(cfg, tmp_path / "mask_split", cases=cases, split=split)
    boxed = apply_overrides(cfg, ["data.test_lesion_from=box"])
    train(boxed, box_run, cases=cases, split=split)

    def probs(run, part):
        with open(run / f"predictions_{part}.csv") as f:
            return np.array([float(r["p_malignant"]) for r in csv.DictReader(f)])

    np.testing.assert_array_equal(probs(tmp_path / "mask_split", "val"), probs(box_run, "val"))  # same fit
    assert np.abs(probs(tmp_path / "mask_split", "test") - probs(box_run, "test")).max() > 1e-3
    # The test part is scored as `evaluate --lesion-from box --box-jitter 0.2` would score it, from the same model.
    model, card = load_model(box_run / "model.pt")
    assert card.preprocess.lesion_from == "mask"  # the model was trained on masks; only its scoring used boxes
    by_path = {c.path: c for c in cases}
    test = [by_path[p] for p in split["test"]]
    cache = CaseCache(dataclasses.replace(card.preprocess, lesion_from="box", box_jitter=0.2))
    from torch.utils.data import DataLoader

    from liverus.data import UltrasoundDataset

    loader = DataLoader(UltrasoundDataset(test, card.classes, cache), batch_size=8)
    p, _ = predict_probs(model, loader, card, device=torch.device("cpu"))
    np.testing.assert_allclose(probs(box_run, "test"), p[:, 1], atol=1e-5)
    # Averaged over boxes, a run's test part and an ensemble's are what evaluate --box-average computes later.
    averaged = apply_overrides(boxed, ["data.box_average=2"])
    for name, overrides in (("avg", []), ("avg_ens", ["model.ensemble=2"])):
        train(apply_overrides(averaged, overrides), tmp_path / name, cases=cases, split=split)
        model, card = load_model(tmp_path / name / "model.pt")
        assert card.preprocess.box_average == 2 and card.preprocess.lesion_from == "mask"
        pre = dataclasses.replace(card.preprocess, lesion_from="box", box_jitter=0.2)
        per_box = [_scored(model, card, test, CaseCache(v)) for v in box_variants(pre)]
        logit = np.mean([np.log(q / (1 - q)) for q in per_box], 0)
        np.testing.assert_allclose(probs(tmp_path / name, "test"), 1 / (1 + np.exp(-logit)), atol=1e-5)
    np.testing.assert_array_equal(probs(tmp_path / "avg", "val"), probs(box_run, "val"))
    assert np.abs(probs(tmp_path / "avg", "test") - probs(box_run, "test")).max() > 1e-4
    with pytest.raises(ConfigError, match="test_lesion_from"):
        apply_overrides(load_config(), ["data.test_lesion_from=outline"]).validate()


@pytest.mark.slow
def test_balance_by_weighs_a_feature_models_fit_and_is_recorded(tmp_path, radiomics_run):
    from liverus.training import train

    run = tmp_path / "balanced"
    train(apply_overrides(load_config(), [*RADIOMICS_TINY, "data.balance_by=kind"]), run)
    fitted = json.loads((run / "feature_fit.json").read_text())
    plain = json.loads((radiomics_run / "feature_fit.json").read_text())
    assert "sample_weight_range" not in plain
    train_paths = json.loads((run / "splits.json").read_text())["folds"][0]["train"]
    plain_paths = json.loads((radiomics_run / "splits.json").read_text())["folds"][0]["train"]
    assert [p.split("/")[-2:] for p in train_paths] == [p.split("/")[-2:] for p in plain_paths]  # same split
    from liverus.data import load_task_cases

    cases, _ = load_task_cases(run / "phantom", "binary", "source")
    by_path = {c.path: c for c in cases}
    cells = [(by_path[p].label, by_path[p].meta["kind"]) for p in train_paths]
    raw = np.array([1.0 / cells.count(c) for c in cells])
    raw *= len(raw) / raw.sum()
    np.testing.assert_allclose(fitted["sample_weight_range"], [raw.min(), raw.max()], atol=1e-4)
    weighted, _ = load_model(run / "model.pt")
    unweighted, _ = load_model(radiomics_run / "model.pt")
    torch.testing.assert_close(weighted.radiomics_mean, unweighted.radiomics_mean)  # the scaling stays unweighted
    assert not torch.allclose(weighted.dual_coef[: len(unweighted.dual_coef)], unweighted.dual_coef)


def test_feature_model_arguments_and_unfitted_use_raise():
    with pytest.raises(ValueError, match="lesion_channel"):
        build_model("radiomics_svm", in_chans=1)
    with pytest.raises(ValueError, match="binary"):
        build_model("radiomics_logistic", in_chans=2, num_classes=3)
    with pytest.raises(ValueError, match="classifier"):
        LesionFeatureModel("forest")
    model = build_model("radiomics_svm", in_chans=2)
    with pytest.raises(RuntimeError, match="not been fitted"):
        model(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="no convolutional layers"):
        model.gradcam_layers()


def test_config_asks_for_the_lesion_channel():
    with pytest.raises(ConfigError, match="data.lesion_channel: true"):
        apply_overrides(load_config(), ["model.name=radiomics_svm"]).validate()


RADIOMICS_TINY = [
    "data.image_size=96",
    "data.crop=roi",
    "data.lesion_channel=true",
    "data.phantom_patients=30",
    "data.phantom_size=128",
    "data.augment=none",
    "model.name=radiomics_svm",
    "runtime.precision=bf16",  # asked for, but a feature model is scored in the fp32 it was fitted in
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


@pytest.fixture(scope="module")
def radiomics_run(tmp_path_factory):
    from liverus.training import train

    out = tmp_path_factory.mktemp("radiomics") / "run"
    train(apply_overrides(load_config(), RADIOMICS_TINY), out)
    return out


def test_feature_model_is_fitted_on_the_training_part_only(radiomics_run):
    from liverus.training.feature_fit import extract_features

    model, card = load_model(radiomics_run / "model.pt")
    splits = json.loads((radiomics_run / "splits.json").read_text())["folds"][0]
    from liverus.data import load_task_cases

    cases, _ = load_task_cases(radiomics_run / "phantom", "binary", "source")
    by_path = {c.path: c for c in cases}
    train_cases = [by_path[p] for p in splits["train"]]
    all_cases = train_cases + [by_path[p] for p in splits["val"]]
    cache = CaseCache(card.preprocess)
    rad_train, _, _ = extract_features(model, train_cases, card.classes, cache, card)
    rad_all, _, _ = extract_features(model, all_cases, card.classes, cache, card)
    np.testing.assert_allclose(model.radiomics_mean.numpy(), rad_train.mean(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(model.radiomics_mean.numpy(), rad_all.mean(0), rtol=1e-4, atol=1e-5)
    assert card.precision == "fp32" and card.precision_gap is None  # fitted on fp32 features, scored on them


@pytest.mark.slow
def test_box_copies_fit_on_each_training_case_from_its_mask_and_its_boxes(radiomics_run, tmp_path, monkeypatch):
    import dataclasses

    from liverus.data import load_task_cases
    from liverus.training import feature_fit, train
    from liverus.training.feature_fit import extract_features

    seen = {}
    real = feature_fit.fit_classifier

    def spy(x, y, groups, classifier, **kw):
        seen.update(x=x, y=y, groups=groups, weight=kw.get("sample_weight"))
        return real(x, y, groups, classifier, **kw)

    monkeypatch.setattr(feature_fit, "fit_classifier", spy)
    source = str(radiomics_run / "phantom")
    run = tmp_path / "copies"
    overrides = [*RADIOMICS_TINY, f"data.source={source}", "data.box_copy_jitter=0.3", "data.box_copies=2",
                 "data.balance_by=kind"]  # fmt: skip
    train(apply_overrides(load_config(), overrides), run)
    model, card = load_model(run / "model.pt")
    # Scored as trained: the copies only add training samples, and their jitter stays out of the card's box_jitter
    # (which `evaluate --lesion-from box` would apply).
    assert card.preprocess.lesion_from == "mask" and card.preprocess.box_jitter == 0
    assert json.loads((run / "feature_fit.json").read_text())["box_copies"] == 2
    cases, _ = load_task_cases(source, "binary", "source")
    by_path = {c.path: c for c in cases}
    train_cases = [by_path[p] for p in json.loads((run / "splits.json").read_text())["folds"][0]["train"]]
    n = len(train_cases)
    # Each case three times (its mask, its jittered box, a box moved from that), with its group and weight each time.
    assert len(seen["y"]) == 3 * n and seen["groups"] == [c.group_key for c in train_cases] * 3
    np.testing.assert_array_equal(seen["y"][:n], seen["y"][n : 2 * n])
    np.testing.assert_array_equal(seen["weight"][:n], seen["weight"][2 * n :])
    boxed = dataclasses.replace(card.preprocess, lesion_from="box", box_jitter=0.3, box_average=2)
    rads = [extract_features(model, train_cases, card.classes, CaseCache(pre), card)[0]
            for pre in (card.preprocess, *box_variants(boxed))]  # fmt: skip
    assert not np.allclose(rads[1], rads[2])  # the two box copies are different boxes
    np.testing.assert_allclose(model.radiomics_mean.numpy(), np.concatenate(rads).mean(0), rtol=1e-4, atol=1e-5)
    bad_settings = (("data.box_copies=-1", r"\[0, 16\]"), ("model.name=custom_resnet50", "is a CNN"),
                    ("data.box_copy_jitter=0.7", "box_copy_jitter"))  # fmt: skip
    for bad, match in bad_settings:
        with pytest.raises(ConfigError, match=match):
            apply_overrides(load_config(), [*RADIOMICS_TINY, "data.box_copies=1", bad]).validate()


def test_feature_model_round_trip_evaluate_and_predict_from_a_box(radiomics_run, tmp_path):
    model, card = load_model(radiomics_run / "model.pt")
    assert card.preprocess.lesion_channel and card.in_chans == 2
    save_model(model, tmp_path / "copy.pt", card)
    again, _ = load_model(tmp_path / "copy.pt")
    pixels = torch.zeros(2, 2, 96, 96, dtype=torch.uint8)
    pixels[:, 0] = 120
    pixels[:, 1, 30:60, 30:60] = 255
    pixels[1, 0, 30:60, 30:60] = 40
    x = normalize_images(pixels, *card.normalization, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
        ens = EnsembleClassifier([model, again])
        torch.testing.assert_close(ens(x).exp(), torch.softmax(model(x), 1), rtol=1e-5, atol=1e-5)
    phantom = radiomics_run / "phantom"
    p = run_cli("evaluate", str(radiomics_run / "model.pt"), "--data", str(phantom / "manifest.csv"),
                "--out", str(tmp_path / "eval"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "AUC" in p.stdout
    image = sorted((phantom / "malignant").glob("*.png"))[0]
    p = run_cli("predict", "--model", str(radiomics_run / "model.pt"), str(image), "--box", "30,30,90,90",
                "--out", str(tmp_path / "pred.csv"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert ",ok," in (tmp_path / "pred.csv").read_text()
    # A radiomics model exports too (its classifier in the graph, the radiomics computed beside it) and answers alike.
    p = run_cli("export", str(radiomics_run / "model.pt"), "--out", str(tmp_path / "m.onnx"))
    assert p.returncode == 0, p.stderr
    p = run_cli("predict", "--model", str(tmp_path / "m.onnx"), str(image), "--box", "30,30,90,90",
                "--out", str(tmp_path / "pred_onnx.csv"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    import csv

    rows = [next(csv.DictReader((tmp_path / name).read_text().splitlines())) for name in ("pred.csv", "pred_onnx.csv")]
    assert abs(float(rows[0]["p_malignant"]) - float(rows[1]["p_malignant"])) < 1e-4


def test_a_manifest_rows_problem_is_that_rows_error_and_the_other_rows_are_answered(radiomics_run, tmp_path):
    import csv

    import cv2

    phantom = radiomics_run / "phantom"
    images = sorted((phantom / "malignant").glob("*.png"))[:3]
    tiny = tmp_path / "tiny_mask.png"  # a mask that does not fit this image's lesion nor its box (two pixels)
    mask = np.zeros(cv2.imread(str(images[1]), cv2.IMREAD_GRAYSCALE).shape, np.uint8)
    mask[5, 5:7] = 255
    cv2.imwrite(str(tiny), mask)
    manifest = tmp_path / "hostile.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "mask", "box"])
        w.writerow([images[0], "", "30,30,90,90"])
        w.writerow([images[1], tiny, "30,30,90,90"])
        w.writerow([images[2], "", "30,30,90"])  # malformed box
        w.writerow([images[0], "", "35,35,85,85"])
    out = tmp_path / "pred.csv"
    p = run_cli("predict", str(manifest), "--model", str(radiomics_run / "model.pt"), "--out", str(out))
    assert p.returncode == 1, p.stderr  # some rows failed; none stopped the batch
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok"]
    assert "radiomics needs a lesion of at least" in rows[1]["error"]
    assert "line 4: the lesion box must be x0,y0,x1,y1" in rows[2]["error"]
    assert 0 <= float(rows[0]["p_malignant"]) <= 1 and 0 <= float(rows[3]["p_malignant"]) <= 1
    # The JSON output says what each operating point is expected to give on new cases, with its interval.
    p = run_cli("predict", str(manifest), "--model", str(radiomics_run / "model.pt"), "--out", str(tmp_path / "p.json"))
    points = json.loads((tmp_path / "p.json").read_text())["operating_points"]
    assert set(points) == {"youden", "rule_out", "rule_in"}
    low, high = points["rule_out"]["sensitivity_ci95"]
    assert low <= points["rule_out"]["sensitivity"] <= high and "95% confidence" in points["rule_out"]["target"]


def test_several_images_per_lesion_get_one_answer_in_predict_and_evaluate(radiomics_run, tmp_path):
    import csv

    from liverus.evaluation.aggregate import mean_log_odds

    # The phantom has one to three frames of each lesion; two lesions make a patient.
    phantom = radiomics_run / "phantom"
    rows = list(csv.DictReader((phantom / "manifest.csv").open()))
    lesions = sorted({r["group"] for r in rows})
    patient = {g: f"pt{i // 2}" for i, g in enumerate(lesions)}
    manifest = tmp_path / "lesions.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "mask", "lesion_id", "patient_id"])
        for r in rows:
            w.writerow([phantom / r["path"], r["label"], phantom / r["mask"] if r["mask"] else "", r["group"],
                        patient[r["group"]]])  # fmt: skip
    assert any(sum(r["group"] == g for r in rows) > 1 for g in lesions)  # several images of some lesion
    p = run_cli("evaluate", str(radiomics_run / "model.pt"), "--data", str(manifest), "--out", str(tmp_path / "ev"),
                "--bootstrap", "50")  # fmt: skip
    assert p.returncode == 0, p.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_lesions = len({r["group"] for r in rows if r["label"] != "normal"})
    assert metrics["per_lesion"]["n"] == n_lesions
    assert metrics["per_patient"]["n"] == len({patient[r["group"]] for r in rows if r["label"] != "normal"})
    assert "per lesion" in p.stdout and "Per lesion and per patient" in (tmp_path / "ev" / "report.html").read_text()
    # predict: one row per image, and one per lesion (the mean log-odds of its images) and per patient.
    out = tmp_path / "pred.csv"
    p = run_cli("predict", str(manifest), "--model", str(radiomics_run / "model.pt"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    images = list(csv.DictReader(out.open()))
    per_lesion = {r["lesion"]: r for r in csv.DictReader((tmp_path / "pred_lesions.csv").open())}
    per_patient = {r["patient"]: r for r in csv.DictReader((tmp_path / "pred_patients.csv").open())}
    for key, answer in per_lesion.items():
        pt, lesion = key.split("/")
        mine = [float(r["p_malignant"]) for r in images if r["lesion_id"] == lesion and r["patient_id"] == pt]
        assert int(answer["n_images"]) == len(mine)
        assert float(answer["p_malignant"]) == pytest.approx(mean_log_odds(mine), abs=2e-6)
    for pt, answer in per_patient.items():
        highest = max(float(r["p_malignant"]) for k, r in per_lesion.items() if k.startswith(pt + "/"))
        assert float(answer["p_malignant"]) == pytest.approx(highest, abs=1e-6)


def test_evaluate_scores_lesion_models_from_jittered_boxes(radiomics_run, tmp_path):
    phantom = radiomics_run / "phantom" / "manifest.csv"
    p = run_cli("evaluate", str(radiomics_run / "model.pt"), "--data", str(phantom), "--out", str(tmp_path / "box"),
                "--lesion-from", "box", "--box-jitter", "0.2", "--bootstrap", "50")  # fmt: skip
    assert p.returncode == 0, p.stderr
    metrics = json.loads((tmp_path / "box" / "metrics.json").read_text())
    assert set(metrics["lesion"].pop("sources")) == {"mask"}  # boxes derived from the masks, not given alone
    assert metrics["lesion"] == {"from": "box", "box_jitter": 0.2, "box_loosen": 0.0, "box_average": 1}
    assert "as a user would draw them" in (tmp_path / "box" / "report.html").read_text()
    # Averaged over three boxes: per case, the mean log-odds of its three boxes' probabilities.
    p = run_cli("evaluate", str(radiomics_run / "model.pt"), "--data", str(phantom), "--out", str(tmp_path / "avg"),
                "--lesion-from", "box", "--box-jitter", "0.2", "--box-average", "3", "--bootstrap", "50")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "avg" / "metrics.json").read_text())["lesion"]["box_average"] == 3
    assert "averages 3 boxes" in (tmp_path / "avg" / "report.html").read_text()
    model, card = load_model(radiomics_run / "model.pt")
    cases, _ = select_task(load_cases(phantom), card.task)
    pre = dataclasses.replace(card.preprocess, lesion_from="box", box_jitter=0.2, box_average=3)
    per_box = [_scored(model, card, cases, CaseCache(v)) for v in box_variants(pre)]
    assert np.abs(per_box[1] - per_box[0]).max() > 1e-3  # the boxes differ
    logit = np.mean([np.log(q / (1 - q)) for q in per_box], 0)
    want = dict(zip([c.path for c in cases], 1 / (1 + np.exp(-logit)), strict=True))
    got = read_predictions([tmp_path / "avg" / "predictions.csv"])
    np.testing.assert_allclose(got.p, [want[path] for path in got.paths], atol=2e-6)
    p = run_cli("evaluate", str(radiomics_run / "model.pt"), "--data", str(phantom), "--out", str(tmp_path / "bad"),
                "--lesion-from", "box", "--box-jitter", "0.9")  # fmt: skip
    assert p.returncode != 0 and "box_jitter" in p.stderr


def _scored(model, card, cases, cache) -> np.ndarray:
    """p(malignant) of ``cases`` preprocessed by ``cache``, scored as every path of the tool scores them."""
    from torch.utils.data import DataLoader

    from liverus.data import UltrasoundDataset
    from liverus.engine.forward import predict_probs

    loader = DataLoader(UltrasoundDataset(cases, card.classes, cache), batch_size=64)
    return predict_probs(model, loader, card, device=torch.device("cpu"))[0][:, 1].astype(np.float64)


def test_box_average_predicts_the_mean_log_odds_of_the_boxes_and_contributions_add_up(radiomics_run, tmp_path):
    from liverus.data import read_image
    from liverus.data.preprocess import preprocess
    from liverus.engine.predictor import Predictor

    image_path = sorted((radiomics_run / "phantom" / "malignant").glob("*.png"))[0]
    image, box = read_image(image_path), (30.0, 30.0, 90.0, 90.0)
    single, averaged = (
        Predictor.from_path(radiomics_run / "model.pt"),
        Predictor.from_path(radiomics_run / "model.pt", box_average=3),
    )
    pre = averaged.prepare(image, box=box)
    assert len(pre.variants) == 2 and pre.lesion_source == "user box, averaged over 3 boxes"
    per_box = [
        single.probabilities([preprocess(image, dataclasses.replace(averaged.preprocess_cfg, box_variant=k), box=box)])
        for k in range(3)
    ]
    assert per_box[0] == single.probabilities([single.prepare(image, box=box)])
    logit = float(np.mean([np.log(q / (1 - q)) for q in per_box]))
    prob = float(averaged.probabilities([pre, single.prepare(image, box=box)])[0])  # a batch: each its own boxes
    assert prob == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)
    found = averaged.contributions([pre])
    assert found.baseline[0] + found.values[0].sum() == pytest.approx(np.log(prob / (1 - prob)), abs=1e-4)
    # A mask is the lesion itself: nothing to average.
    lesion = np.zeros(image.shape, np.uint8)
    lesion[40:80, 40:80] = 1
    assert averaged.prepare(image, lesion=lesion).variants == ()
    # The command line says the same, and checks the number.
    p = run_cli("predict", "--model", str(radiomics_run / "model.pt"), str(image_path), "--box", "30,30,90,90",
                "--box-average", "3", "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "p.json").read_text())["predictions"][0]["p_malignant"] == pytest.approx(
        prob, abs=1e-5
    )
    p = run_cli("predict", "--model", str(radiomics_run / "model.pt"), str(image_path), "--box", "30,30,90,90",
                "--box-average", "40", "--out", str(tmp_path / "bad.json"))  # fmt: skip
    assert p.returncode != 0 and "box_average" in p.stderr


def test_radiomics_only_model_serves_and_explains_by_its_feature_groups_not_heatmaps(radiomics_run, tmp_path):
    from fastapi.testclient import TestClient

    from liverus.engine.predictor import Predictor
    from liverus.serve.app import create_app

    pred = Predictor.from_path(radiomics_run / "model.pt")
    assert not pred.has_heatmaps and pred.needs_lesion
    image = sorted((radiomics_run / "phantom" / "malignant").glob("*.png"))[0]
    with TestClient(create_app(pred)) as c:
        r = c.post(
            "/api/predict", files={"file": ("x.png", image.read_bytes(), "image/png")}, data={"box": "30,30,90,90"}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lesion_source"] == "user box"
    # No Grad-CAM (no convolutional layer), but an occlusion map, and the decision splits into the radiomics groups,
    # which add up to the model's log-odds, each placed among the training lesions of each class.
    assert body["heatmap_method"] == "occlusion" and body["heatmap"].startswith("data:image/png;base64,")
    assert "blue lowered it" in body["heatmap_caption"]
    context = body["training_lesions"]
    assert set(context) == set(body["contributions"])
    assert all(q == sorted(q) and len(q) == 3 for group in context.values() for q in group.values())
    assert set(body["contributions"]) == {"shape and margin", "echo pattern", "texture", "halo and posterior acoustics"}
    p_model, p_base = body["probability_malignant"], body["baseline_probability"]
    logit = np.log(p_model / (1 - p_model))
    assert abs(np.log(p_base / (1 - p_base)) + sum(body["contributions"].values()) - logit) < 1e-3
    p = run_cli("explain", str(image), "--box", "30,30,90,90", "--model", str(radiomics_run / "model.pt"),
                "--out", str(tmp_path / "ex"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert not list((tmp_path / "ex").glob("*_gradcam.png"))
    assert (tmp_path / "ex" / f"{image.stem}_occlusion.png").stat().st_size > 1000
    p = run_cli("explain", str(image), "--box", "30,30,90,90", "--model", str(radiomics_run / "model.pt"),
                "--method", "gradcam", "--out", str(tmp_path / "ex2"))  # fmt: skip
    assert p.returncode != 0 and "has no gradcam map; it has: occlusion" in p.stderr
    explained = json.loads((tmp_path / "ex" / f"{image.stem}_features.json").read_text())
    assert explained["contributions"] == body["contributions"] and explained["lesion_source"] == "user box"
    assert abs(explained["baseline_logit"] + sum(explained["contributions"].values()) - explained["logit"]) < 1e-3
    assert (tmp_path / "ex" / f"{image.stem}_features.png").stat().st_size > 1000
    p = run_cli("predict", "--model", str(radiomics_run / "model.pt"), str(image), "--box", "30,30,90,90",
                "--out", str(tmp_path / "pred.csv"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    import csv

    (row,) = csv.DictReader((tmp_path / "pred.csv").open())
    cells = dict(part.split("=") for part in row["contributions"].split(";"))
    assert {k: round(float(v), 4) for k, v in cells.items()} == body["contributions"]


@pytest.fixture(scope="module")
def radiomics_server(radiomics_run):
    from test_serve import _serve

    yield from _serve(radiomics_run / "model.pt")


def test_browser_shows_what_drove_a_feature_models_score(radiomics_server, radiomics_run):
    from playwright.sync_api import sync_playwright

    from test_serve import _chromium, _drag_box

    image = sorted((radiomics_run / "phantom" / "malignant").glob("*.png"))[0]
    with sync_playwright() as pw:
        browser = _chromium(pw)
        page = browser.new_page()
        page.goto(radiomics_server + "/")
        page.wait_for_selector("#box-panel:not(.hidden)", timeout=30_000)
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('preview').naturalWidth > 0", timeout=30_000)
        _drag_box(page, 0.2, 0.7)
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0", timeout=60_000)
        assert page.is_visible("#contributions") and page.is_visible("#heatmap")
        assert "Occlusion" in page.inner_text("#heatmap-caption")
        heads = page.eval_on_selector_all("#contribution-rows th", "hs => hs.map(h => h.innerText)")
        assert "looks like" in heads and "malignant training lesions" in heads
        rows = page.eval_on_selector_all("#contribution-rows tbody tr",
                                          "rs => rs.map(r => Array.from(r.cells).map(c => c.innerText))")  # fmt: skip
        names = [row[0].strip() for row in rows]
        assert sorted(names) == sorted(["shape and margin", "echo pattern", "texture", "halo and posterior acoustics"])
        assert all(row[3] in ("benign lesions", "malignant lesions") for row in rows)
        values = [float(row[2]) for row in rows]
        assert [abs(v) for v in values] == sorted((abs(v) for v in values), reverse=True)  # largest first
        assert "% malignant" in page.inner_text("#baseline")
        browser.close()


@pytest.mark.slow
def test_a_study_without_validation_fits_each_fold_on_its_whole_training_part(tmp_path):
    from liverus.training.experiments import run_study

    cfg = apply_overrides(load_config(), [*RADIOMICS_TINY, "data.image_size=64", "data.val_fraction=0"])
    summary = run_study(cfg, tmp_path / "s", models=["radiomics_svm"], k=2, repeats=1, n_boot=20)
    folds = json.loads((tmp_path / "s" / "splits.json").read_text())["folds"]
    for i, fold in enumerate(folds):
        run = tmp_path / "s" / "radiomics_svm" / f"fold{i}"
        used = json.loads((run / "splits.json").read_text())["folds"][0]
        assert used["val"] == [] and sorted(used["train"]) == sorted(fold["train"]) and used["test"] == fold["val"]
        card = load_model(run / "model.pt")[1]
        assert "inner cross-validation" in card.threshold_method
    assert "its inner cross-validation chooses the threshold" in summary["text"]
    assert "--set model.threshold" not in summary["text"]


@pytest.mark.slow
def test_compare_studies_gives_the_repeated_cv_test_of_a_single_study(tmp_path):
    from liverus.evaluation.study import compare_studies
    from liverus.training.experiments import run_study

    cfg = apply_overrides(load_config(), [*RADIOMICS_TINY, "data.image_size=64", "data.phantom_patients=30"])
    summary = run_study(cfg, tmp_path / "s", models=["radiomics_svm", "radiomics_logistic"], k=2, repeats=2,
                        n_boot=50)  # fmt: skip
    result = compare_studies([f"svm={tmp_path / 's'}:radiomics_svm", f"lr={tmp_path / 's'}:radiomics_logistic"],
                             n_boot=50, fuse=["both=svm+lr"])  # fmt: skip
    across, within = result["repeated"], summary["repeated"]
    assert across["repeats"] == 2
    assert across["models"]["lr"]["auc_per_repeat"] == within["models"]["radiomics_logistic"]["auc_per_repeat"]
    assert across["comparisons"]["lr"]["corrected_t"] == within["comparisons"]["radiomics_logistic"]["corrected_t"]
    # The late fusion is the mean of the two models' probabilities, case by case, in every repeat.
    from sklearn.metrics import roc_auc_score

    from liverus.evaluation.study import study_predictions

    for r in range(2):
        a, b = (
            study_predictions(tmp_path / "s", "radiomics_svm", r),
            study_predictions(tmp_path / "s", "radiomics_logistic", r),
        )
        want = roc_auc_score(a.y, (a.p + b.align(a.paths).p) / 2)
        assert across["models"]["both"]["auc_per_repeat"][r] == pytest.approx(want, abs=1e-9)
    assert "both" in result["pooled"] and "both" in across["comparisons"]


def _fitted(name: str, seed: int, **kwargs) -> LesionFeatureModel:
    torch.manual_seed(seed)
    model = build_model(name, in_chans=2, pca_dim=4, **kwargs).eval()
    rng = np.random.default_rng(seed)
    width = len(FEATURE_NAMES) + 4
    model.load_fitted({"coef": rng.normal(size=width) * 0.1, "intercept": np.asarray(0.2),
                       "radiomics_scale": np.ones(len(FEATURE_NAMES)) * 3.0,
                       "pca_components": rng.normal(size=(4, model.backbone.spec.out_channels)) * 0.01})  # fmt: skip
    return model


@pytest.mark.parametrize("same_backbone", [True, False])
def test_feature_ensemble_shares_features_only_where_members_agree(same_backbone):
    a = _fitted("radiomics_logistic_efficientnet_lite0", 0)
    b = _fitted("radiomics_logistic_efficientnet_lite0", 1)
    if same_backbone:
        b.backbone.load_state_dict(a.backbone.state_dict())
    pixels = torch.zeros(2, 2, 64, 64, dtype=torch.uint8)
    pixels[:, 0] = torch.randint(60, 200, (2, 64, 64), dtype=torch.uint8)
    pixels[:, 1, 20:44, 16:40] = 255
    x = normalize_images(pixels, 0.5, 0.5, 2)
    ens = EnsembleClassifier([a, b], temperatures=[1.0, 2.0]).eval()
    with torch.no_grad():
        want = (torch.softmax(a(x), 1) + torch.softmax(b(x) / 2.0, 1)) / 2
        torch.testing.assert_close(ens(x).exp(), want, rtol=1e-5, atol=1e-6)
    assert ens._shared_backbone() is same_backbone
    assert len(ens.gradcam_layers()) == (1 if same_backbone else 2)


def _first_pass_gradcam(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM of malignancy by hand: each target layer's *first* call (the untransformed lesion crop) paired with
    the gradient of that same output; pytorch-grad-cam's own scaling and averaging over layers."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    layers, first = model.gradcam_layers(), {}

    def keep_first(i):
        def hook(module, inputs, output):
            if i not in first:
                first[i] = output
                output.retain_grad()

        return hook

    handles = [layer.register_forward_hook(keep_first(i)) for i, layer in enumerate(layers)]
    with torch.enable_grad():
        model(x.detach().requires_grad_(True))[:, 1].sum().backward()
    for h in handles:
        h.remove()
    size = (x.shape[-1], x.shape[-2])
    cams = []
    for i in range(len(layers)):
        act, grad = first[i].detach(), first[i].grad
        cams.append(scale_cam_image((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1).clamp_min(0).numpy(), size))
    return scale_cam_image(np.maximum(np.mean(cams, axis=0), 0))


@pytest.mark.parametrize("members", ["one", "shared backbone", "own backbones"])
def test_gradcam_of_multi_pass_feature_models_pairs_each_layer_with_its_first_pass(members):
    # Mirror, turns and the whole-scan view run each backbone several times per image; members with their own
    # backbones run one after another. Each target layer's map must come from its own first call (the lesion crop
    # as the user sees it) and that call's gradient, not from whichever recorded call has the same index.
    from liverus.models.features import DEEP_FEATURE_MEMO

    kwargs = {"flip_features": True, "rotate_features": 10}
    a = _fitted("radiomics_logistic_efficientnet_lite0", 0, **kwargs)
    b = _fitted("radiomics_logistic_efficientnet_lite0", 1, **kwargs)
    if members == "shared backbone":
        b.backbone.load_state_dict(a.backbone.state_dict())
    model = a if members == "one" else EnsembleClassifier([a, b], temperatures=[1.0, 2.0]).eval()
    assert len(model.gradcam_layers()) == (2 if members == "own backbones" else 1)
    pixels = torch.zeros(2, 2, 64, 64, dtype=torch.uint8)
    pixels[:, 0] = torch.randint(60, 200, (2, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pixels[:, 1, 20:44, 16:40] = 255
    x = normalize_images(pixels, 0.5, 0.5, 2)
    DEEP_FEATURE_MEMO.clear()
    want = _first_pass_gradcam(model, x)  # every pass with its autograd graph
    assert want.std() > 0.05  # a map with structure, so the comparison can fail
    np.testing.assert_allclose(gradcam_heatmap(model, x), want, atol=1e-4)  # inside gradcam_context
    # Grad-CAM's context keeps the graph of each target layer's first call only, and changes no output.
    with_graph = []
    hooks = [layer.register_forward_hook(lambda m, i, o: with_graph.append(o.requires_grad))
             for layer in model.gradcam_layers()]  # fmt: skip
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        full = model(xg)
        assert all(with_graph) and len(with_graph) == 6 * len(model.gradcam_layers())  # (crop, two turns) x mirror
        with_graph.clear()
        with model.gradcam_context():
            mapped = model(xg)
        assert sum(with_graph) == len(model.gradcam_layers()) and len(with_graph) == 6 * len(model.gradcam_layers())
    for h in hooks:
        h.remove()
    torch.testing.assert_close(mapped, full)
    assert not a._mapped_pass_only  # the context is left as it was found
    DEEP_FEATURE_MEMO.clear()


def test_deep_features_are_remembered_per_image_weights_and_arithmetic(monkeypatch):
    from liverus.models.features import DEEP_FEATURE_MEMO

    model = _fitted("radiomics_logistic_efficientnet_lite0", 0)
    passes = []  # batch sizes that went through the backbone (counted without a hook: a hook disables the memo)
    real, batched = model._pooled, model._batched_mean
    monkeypatch.setattr(model, "_pooled", lambda image: passes.append(image.shape[0]) or real(image))
    monkeypatch.setattr(model, "_batched_mean", lambda image, t: passes.append(image.shape[0]) or batched(image, t))
    DEEP_FEATURE_MEMO.clear()
    pixels = torch.zeros(3, 2, 64, 64, dtype=torch.uint8)
    pixels[:, 0] = torch.randint(60, 200, (3, 64, 64), dtype=torch.uint8)
    pixels[:, 1, 20:44, 16:40] = 255
    x = normalize_images(pixels, 0.5, 0.5, 2)
    with torch.no_grad():
        want = real(x[:, :1])
        first = model.deep_features(x[:2])
        mixed = model.deep_features(x[[2, 0, 1]])  # two remembered, one new: only the new one is computed
    assert passes == [2, 1] and DEEP_FEATURE_MEMO.hits == 2
    torch.testing.assert_close(first, want[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, want[[2, 0, 1]], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.deep_features(x[:1])  # other arithmetic: computed again
    with torch.no_grad():
        next(model.backbone.parameters()).mul_(2)
        changed = model.deep_features(x[:1])  # other weights: computed again, and different
    assert passes == [2, 1, 1, 1]
    assert not torch.equal(changed, want[:1])
    model.backbone.register_forward_hook(lambda m, a, o: None)  # as Grad-CAM does: the backbone must run
    with torch.no_grad():
        model.deep_features(x[:1])
    with torch.enable_grad():
        model.backbone._forward_hooks.clear()
        model.deep_features(x[:1])  # with gradients (Grad-CAM): never from the memo
    assert passes == [2, 1, 1, 1, 1, 1]
    DEEP_FEATURE_MEMO.clear()


def test_flip_features_are_the_mean_over_the_mirror_and_travel_with_the_file(tmp_path):
    from liverus.models.features import DEEP_FEATURE_MEMO

    DEEP_FEATURE_MEMO.clear()
    torch.manual_seed(0)
    plain = build_model("radiomics_svm_efficientnet_lite0", in_chans=2).eval()
    flip = build_model("radiomics_svm_efficientnet_lite0", in_chans=2, flip_features=True).eval()
    flip.backbone.load_state_dict(plain.backbone.state_dict())
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        a, mirrored = plain.deep_features(x), plain.deep_features(x.flip(3))
        averaged = flip.deep_features(x)  # same weights and pixels as `a`: the memo must not answer it
        # (A randomly initialised backbone's pooled features are ~1e-8: compared relatively.)
        torch.testing.assert_close(averaged, (a + mirrored) / 2, rtol=1e-4, atol=0)
        assert (averaged - a).abs().max() > 0.05 * a.abs().max()
        # Mirror-invariant by construction; the plain features are not.
        torch.testing.assert_close(flip.deep_features(x.flip(3)), averaged, rtol=1e-4, atol=0)
    # The option is part of the model: it is rebuilt from the file.
    flip.load_fitted({"support": np.zeros((3, len(FEATURE_NAMES) + 32)), "dual_coef": np.ones(3)})
    save_model(flip, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.flip_features and loaded.build_kwargs["flip_features"] is True
    # Grad-CAM runs the backbone twice (image, mirror) and maps the unmirrored pass onto the image.
    heat = gradcam_heatmap(loaded.eval(), x[:1])
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
    DEEP_FEATURE_MEMO.clear()


def test_rotate_and_zoom_features_average_the_lesion_crop_over_turns_and_zooms_and_travel_with_the_file(tmp_path):
    import torchvision.transforms.v2.functional as TF

    from liverus.models.features import DEEP_FEATURE_MEMO

    DEEP_FEATURE_MEMO.clear()
    torch.manual_seed(0)
    kwargs = {"in_chans": 2, "flip_features": True, "views": 2}
    plain = build_model("radiomics_svm_efficientnet_lite0", **kwargs).eval()
    moved = build_model("radiomics_svm_efficientnet_lite0", **kwargs, rotate_features=10, zoom_features=0.1).eval()
    moved.backbone.load_state_dict(plain.backbone.state_dict())
    assert moved.lesion_transforms() == ((10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1))
    x = torch.randn(2, 4, 64, 64)  # lesion crop and mask, whole scan and its mask
    width = plain.backbone.spec.out_channels
    with torch.no_grad():
        expected = [plain.deep_features(x)]
        for angle, scale in ((10, 1.0), (-10, 1.0), (0, 0.9), (0, 1.1)):
            turned = x.clone()
            turned[:, :1] = TF.affine(x[:, :1], angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                                      interpolation=TF.InterpolationMode.BILINEAR)  # fmt: skip
            expected.append(plain.deep_features(turned))
        averaged = moved.deep_features(x)  # the same pixels and weights as expected[0]: not from the memo
        # (A randomly initialised backbone's pooled features are ~1e-8: compared relatively.)
        lesion_mean = torch.stack([e[:, :width] for e in expected]).mean(0)
        torch.testing.assert_close(averaged[:, :width], lesion_mean, rtol=1e-4, atol=0)
        assert (averaged[:, :width] - expected[0][:, :width]).abs().max() > 0.05 * expected[0].abs().max()
        # The whole-scan view is neither turned nor zoomed.
        torch.testing.assert_close(averaged[:, width:], expected[0][:, width:], rtol=1e-4, atol=0)
        # A second call is answered from the memo, with the same numbers.
        torch.testing.assert_close(moved.deep_features(x), averaged)
    # Part of the model: rebuilt from the file; a model without them keeps its build arguments as they were.
    assert "rotate_features" not in plain.build_kwargs
    moved.load_fitted({"support": np.zeros((3, len(FEATURE_NAMES) + 64)), "dual_coef": np.ones(3)})
    save_model(moved, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert (loaded.rotate_features, loaded.zoom_features) == (10.0, 0.1)
    torch.testing.assert_close(loaded(x), moved(x))
    # Grad-CAM maps the untransformed pass (the first) onto the image.
    heat = gradcam_heatmap(loaded.eval(), x[:1])
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
    DEEP_FEATURE_MEMO.clear()


@pytest.mark.parametrize("option, bad", [("rotate_features", 50), ("rotate_features", -1), ("zoom_features", 0.6)])
def test_rotate_and_zoom_features_reject_bad_values_and_a_model_without_backbone(option, bad):
    with pytest.raises(ValueError, match=option):
        build_model("radiomics_svm_efficientnet_lite0", in_chans=2, **{option: bad})
    with pytest.raises(ValueError, match="radiomics-only"):
        build_model("radiomics_svm", in_chans=2, **{option: 5 if option == "rotate_features" else 0.1})
    with pytest.raises(ConfigError, match=f"model.{option}: must be in"):
        apply_overrides(load_config(), [*RADIOMICS_TINY, "model.name=radiomics_svm_efficientnet_lite0",
                                        f"model.{option}={bad}"]).validate()  # fmt: skip
    with pytest.raises(ConfigError, match=f"model.{option}: averages"):
        apply_overrides(load_config(), [f"model.{option}=0.1"]).validate()


def test_the_trainer_builds_the_model_with_the_configs_rotations_and_zooms():
    from liverus.training.trainer import build_run_model

    base = [*RADIOMICS_TINY, "model.name=radiomics_svm_efficientnet_lite0"]
    cfg = apply_overrides(load_config(), [*base, "model.rotate_features=15", "model.zoom_features=0.2"])
    cfg.validate()
    model = build_run_model(cfg, 2)
    assert model.lesion_transforms() == ((15.0, 1.0), (-15.0, 1.0), (0.0, 0.8), (0.0, 1.2))
    assert model.build_kwargs["rotate_features"] == 15 and model.build_kwargs["zoom_features"] == 0.2
    off = build_run_model(apply_overrides(load_config(), base), 2)
    assert off.lesion_transforms() == () and "zoom_features" not in off.build_kwargs


def test_run_length_option_widens_the_radiomics_and_travels_with_the_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(60, 140, (1, 64, 64)).astype(np.float32) / 255
    mask = _disc(64, 18)[None].astype(np.float32)
    x = torch.from_numpy(np.stack([(image - 0.5) / 0.5, mask], axis=1))
    default = build_model("radiomics_logistic", in_chans=2)
    wide = build_model("radiomics_logistic", in_chans=2, run_length=True)
    rad, rad_wide = default.radiomics(x), wide.radiomics(x)
    assert rad.shape == (1, len(FEATURE_NAMES)) and rad_wide.shape == (1, len(ALL_FEATURE_NAMES))
    torch.testing.assert_close(rad_wide[:, : len(FEATURE_NAMES)], rad)
    assert wide.radiomics_mean.shape == (len(ALL_FEATURE_NAMES),) and wide.coef.shape == (len(ALL_FEATURE_NAMES),)
    wide.load_fitted({"coef": np.ones(len(ALL_FEATURE_NAMES)), "radiomics_scale": np.ones(len(ALL_FEATURE_NAMES))})
    save_model(wide, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.run_length and loaded.build_kwargs["run_length"] is True
    torch.testing.assert_close(loaded(x), wide(x))
    # Only models that compute radiomics take it.
    with pytest.raises(ConfigError, match="model.run_length"):
        apply_overrides(load_config(), ["model.run_length=true"]).validate()
    cfg = apply_overrides(load_config(), [*RADIOMICS_TINY, "model.run_length=true"])
    assert cfg.model.run_length


def test_flip_features_need_a_backbone():
    with pytest.raises(ValueError, match="radiomics-only"):
        build_model("radiomics_svm", in_chans=2, flip_features=True)
    with pytest.raises(ConfigError, match="model.flip_features"):
        apply_overrides(load_config(), ["model.name=radiomics_svm", "data.lesion_channel=true", "data.crop=roi",
                                        "model.flip_features=true"])  # fmt: skip
    with pytest.raises(ConfigError, match="model.flip_features"):
        apply_overrides(load_config(), ["model.flip_features=true"]).validate()


def test_a_study_checks_every_models_config_before_the_first_trains(tmp_path):
    from liverus.training.experiments import run_study

    cfg = apply_overrides(load_config(), [*RADIOMICS_TINY, "model.name=radiomics_svm_efficientnet_lite0",
                                          "model.flip_features=true"])  # fmt: skip
    with pytest.raises(ConfigError, match="model 'radiomics_svm' of this study: model.flip_features"):
        run_study(cfg, tmp_path / "s", models=["radiomics_svm_efficientnet_lite0", "radiomics_svm"], k=2)
    assert not (tmp_path / "s").exists()  # nothing trained, no folder left behind


def test_radiomics_are_measured_once_per_image_and_answer_the_same(monkeypatch):
    from liverus.data import radiomics

    calls = []
    real = radiomics.lesion_features
    monkeypatch.setattr(radiomics, "lesion_features", lambda i, m, **kw: calls.append(1) or real(i, m, **kw))
    radiomics.FEATURE_MEMO.clear()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 96, 96)).astype(np.uint8)
    masks = np.stack([_disc(96, r) for r in (20, 25, 30)]).astype(bool)
    first = radiomics.feature_matrix(images, masks)
    again = radiomics.feature_matrix(images[::-1], masks[::-1])
    np.testing.assert_array_equal(again, first[::-1])
    assert len(calls) == 3 and radiomics.FEATURE_MEMO.hits == 3
    changed = images.copy()
    changed[0, 0, 0] ^= 1  # one pixel differs: measured again
    radiomics.feature_matrix(changed[:1], masks[:1])
    assert len(calls) == 4
    # The run-length option is part of the key: the wider vectors are measured, not the narrow ones returned.
    wide = radiomics.feature_matrix(images, masks, run_length=True)
    assert len(calls) == 7 and wide.shape == (3, len(ALL_FEATURE_NAMES))
    np.testing.assert_array_equal(wide[:, : len(FEATURE_NAMES)], first)
    radiomics.FEATURE_MEMO.clear()


def _speckled_scan(gain: float, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A gray 'liver' with a darker square lesion, as the same scene under another gain and offset."""
    rng = np.random.default_rng(7)
    img = np.clip(rng.normal(0.35, 0.08, (240, 320)), 0.15, 0.9)  # no speckle so dark the fan detection drops it
    lesion = np.zeros((240, 320), np.uint8)
    lesion[90:150, 130:200] = 1
    img[lesion > 0] *= 0.5
    return np.clip(img * gain + offset, 0, 1).astype(np.float32), lesion


@pytest.mark.parametrize("crop", ["roi", "fan", "none"])
def test_intensity_standardisation_cancels_the_gain_and_keeps_the_lesion_contrast(crop):
    from liverus.data import preprocess
    from liverus.data.preprocess import BACKGROUND_MEAN, BACKGROUND_STD

    cfg = PreprocessConfig(image_size=96, crop=crop, intensity="liver")
    outs, raws = [], []
    for gain, offset in ((1.0, 0.0), (0.6, 0.0), (1.5, 0.03)):
        img, lesion = _speckled_scan(gain, offset)
        pre = preprocess(img, cfg, lesion=lesion)
        background = (pre.scan > 0) & (pre.lesion == 0)
        assert pre.image[background].mean() == pytest.approx(BACKGROUND_MEAN, abs=1.0)
        assert pre.image[background].std() == pytest.approx(BACKGROUND_STD, rel=0.05)
        outs.append(pre.image.astype(float))
        raws.append(preprocess(img, PreprocessConfig(image_size=96, crop=crop), lesion=lesion).image.astype(float))
    # The same scene under three gain/offset settings gives nearly the same picture (up to the 8-bit rounding of the
    # scan, which the stretch magnifies), where the raw crops differ by tens of gray levels; the lesion stays darker
    # than the liver by the same number of background standard deviations.
    for k in (1, 2):
        assert np.abs(outs[0] - outs[k]).mean() < 0.1 * BACKGROUND_STD and np.abs(raws[0] - raws[k]).mean() > 15
    lesion_level = outs[0][pre.lesion > 0].mean()
    assert (BACKGROUND_MEAN - lesion_level) / BACKGROUND_STD == pytest.approx(0.175 / 0.08, rel=0.15)


def test_intensity_standardisation_with_a_box_leaves_the_box_out_and_blanks_outside_the_scan():
    from liverus.data import preprocess
    from liverus.data.preprocess import BACKGROUND_MEAN, standardize_to_background

    img, lesion = _speckled_scan(1.0)
    # From a user's box (no outline): the box stands for the lesion in the statistics.
    pre = preprocess(img, PreprocessConfig(image_size=96, crop="roi", intensity="liver"), box=(130, 90, 200, 150))
    inside_box = np.zeros_like(pre.image, bool)
    inside_box[24:72, 22:74] = True  # the box's middle in the 96 px crop (margin 0.3, longer side 70 px)
    assert pre.image[inside_box].mean() < BACKGROUND_MEAN - 30  # the darker lesion did not pull the background down
    # Pixels outside the scan area go black; an (almost) empty scan area falls back to the whole image.
    image = np.full((32, 32), 100, np.uint8)
    image[:, :16] = 140
    scan = np.zeros_like(image)
    scan[:, 8:] = 1
    out = standardize_to_background(image, scan, np.zeros_like(image))
    assert (out[:, :8] == 0).all() and out[:, 8:].mean() == pytest.approx(BACKGROUND_MEAN, abs=1)
    out = standardize_to_background(image, np.zeros_like(image), np.zeros_like(image))
    assert out.mean() == pytest.approx(BACKGROUND_MEAN, abs=1) and (out > 0).all()
    # A flat background is not blown up into noise (the spread is floored at one gray level).
    flat = standardize_to_background(np.full((16, 16), 50, np.uint8), np.ones((16, 16), np.uint8), np.zeros((16, 16)))
    assert (flat == round(BACKGROUND_MEAN)).all()


def test_intensity_setting_is_checked_keys_the_cache_and_travels_with_the_model():
    import dataclasses
    import hashlib

    with pytest.raises(ValueError, match="intensity must be one of"):
        PreprocessConfig(intensity="zscore")
    with pytest.raises(ConfigError, match="data.intensity must be one of"):
        apply_overrides(load_config(), ["data.intensity=zscore"])
    cfg = apply_overrides(load_config(), ["data.intensity=liver"])
    assert cfg.data.preprocess().intensity == "liver"
    from liverus.models.card import ModelCard

    card = ModelCard(model_name="baseline_efficientnet_lite0", classes=("benign", "malignant"), in_chans=1,
                     normalization=(0.5, 0.25), preprocess=cfg.data.preprocess())  # fmt: skip
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again.preprocess.intensity == "liver" and again.preprocess == card.preprocess
    # A card written before the setting existed reads as raw.
    old = card.to_dict()
    del old["preprocess"]["intensity"]
    assert ModelCard.from_dict(old).preprocess.intensity == "raw"
    # Raw keeps the cache key of earlier versions; standardised crops are cached apart.
    assert PreprocessConfig(crop="roi").key() != PreprocessConfig(crop="roi", intensity="liver").key()
    legacy = dataclasses.asdict(PreprocessConfig(crop="roi"))
    for later in ("intensity", "scan_view", "box_average", "box_shift", "box_variant"):
        legacy.pop(later)
    assert (
        PreprocessConfig(crop="roi").key()
        == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    )


# --- the whole scan as a second view of feature models (data.scan_view) ------------------------------------------


def test_scan_view_is_the_fan_crop_of_the_whole_image_beside_the_lesion_crop():
    from liverus.data import preprocess

    img = np.zeros((200, 300), np.float32)
    img[20:190, 40:260] = 0.5  # the scan area: a bright rectangle on black
    lesion = np.zeros((200, 300), np.uint8)
    lesion[80:120, 130:170] = 1
    img[lesion > 0] = 0.1
    cfg = PreprocessConfig(image_size=64, crop="roi", roi_margin=0.25, scan_view=True)
    pre = preprocess(img, cfg, lesion=lesion)
    fan = preprocess(img, PreprocessConfig(image_size=64, crop="fan"), lesion=lesion)
    assert pre.stacked().shape == (6, 64, 64)
    # The first view is the lesion crop as without the option; the second is what crop="fan" shows.
    single = preprocess(img, PreprocessConfig(image_size=64, crop="roi", roi_margin=0.25), lesion=lesion)
    np.testing.assert_array_equal(pre.image, single.image)
    for got, want in zip(pre.context, (fan.image, fan.scan, fan.lesion), strict=True):
        np.testing.assert_array_equal(got, want)
    assert pre.lesion.mean() > 0.3 and 0 < pre.context[2].mean() < 0.1  # the lesion fills the crop, not the scan
    assert PreprocessConfig(crop="roi").key() != cfg.key()
    with pytest.raises(ValueError, match="scan_view: the whole scan is the second view beside a lesion crop"):
        PreprocessConfig(crop="fan", scan_view=True)
    # Model pixels: the views follow each other, each with its mask channel when asked; each normalised alike.
    px = model_pixels(pre.stacked()[None], True)
    assert px.shape == (1, 4, 64, 64)
    np.testing.assert_array_equal(px[0, 2], pre.context[0])
    assert set(np.unique(px[0, 3])) == {0, 255}
    x = normalize_images(torch.from_numpy(px), 0.5, 0.25, 2, views=2)
    assert x.shape == (1, 4, 64, 64) and set(x[0, 3].unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(x[0, 2], (torch.from_numpy(pre.context[0]).float() / 255 - 0.5) / 0.25)


def test_scan_view_needs_a_frozen_backbone():
    with pytest.raises(ValueError, match="radiomics-only model has none"):
        build_model("radiomics_svm", in_chans=2, views=2)
    with pytest.raises(ValueError, match="views must be 1 or 2"):
        build_model("radiomics_svm_efficientnet_lite0", in_chans=2, views=3)
    for name in ("radiomics_svm", "custom_efficientnet_lite0"):
        with pytest.raises(ConfigError, match="data.scan_view"):
            apply_overrides(load_config(), [*RADIOMICS_TINY, f"model.name={name}", "data.scan_view=true"])
    with pytest.raises(ConfigError, match="data.scan_view"):
        apply_overrides(load_config(), ["model.name=radiomics_svm_efficientnet_lite0", "data.lesion_channel=true",
                                        "data.scan_view=true"])  # fmt: skip


def test_two_view_feature_model_reads_radiomics_of_the_crop_and_deep_features_of_both_views():
    torch.manual_seed(0)
    one = build_model("radiomics_logistic_efficientnet_lite0", in_chans=2).eval()
    two = build_model("radiomics_logistic_efficientnet_lite0", in_chans=2, views=2).eval()
    two.backbone.load_state_dict(one.backbone.state_dict())
    crop, scan = torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64)
    crop[:, 1], scan[:, 1] = (torch.from_numpy(_disc(64, 20)).float(),) * 2
    x = torch.cat([crop, scan], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(two.radiomics(x), one.radiomics(crop))
        deep, d_crop, d_scan = two.deep_features(x), one.deep_features(crop), one.deep_features(scan)
    width = one.backbone.spec.out_channels
    assert deep.shape == (2, 2 * width)
    torch.testing.assert_close(deep[:, :width], d_crop)
    torch.testing.assert_close(deep[:, width:], d_scan)
    assert two.pca_components.shape == (64, 2 * width) and two.coef.shape == (len(FEATURE_NAMES) + 64,)
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) input \(image and lesion mask of each view\)"):
        two.radiomics(crop)


def test_lesion_size_shows_the_lesion_crop_as_a_smaller_input_and_leaves_the_scan_view_alone():
    torch.manual_seed(0)
    small = build_model("radiomics_logistic_efficientnet_lite0", in_chans=2).eval()
    sized = build_model("radiomics_logistic_efficientnet_lite0", in_chans=2, views=2, lesion_size=32).eval()
    sized.backbone.load_state_dict(small.backbone.state_dict())
    crop = torch.randn(2, 2, 32, 32)
    crop[:, 1] = torch.from_numpy(_disc(32, 10)).float()
    scan = torch.randn(2, 2, 64, 64)
    scan[:, 1] = 0
    # The lesion crop prepared at twice the size (each pixel a 2x2 block): the area resize gives back the 32 px crop.
    x = torch.cat([crop.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), scan], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(sized.lesion_view(x), crop)
        torch.testing.assert_close(sized.radiomics(x), small.radiomics(crop))
        deep, d_crop, d_scan = sized.deep_features(x), small.deep_features(crop), small.deep_features(scan)
    width = small.backbone.spec.out_channels
    torch.testing.assert_close(deep[:, :width], d_crop)
    torch.testing.assert_close(deep[:, width:], d_scan)  # the scan view keeps its 64 px
    assert sized.build_kwargs["lesion_size"] == 32 and "lesion_size" not in small.build_kwargs
    # A crop already at lesion_size passes unchanged; a mask pixel less than half inside the lesion leaves it.
    torch.testing.assert_close(sized.lesion_view(torch.cat([crop, crop], dim=1)), crop)
    edge = torch.zeros(1, 4, 64, 64)
    edge[0, 1, :2, :2] = 1  # one 2x2 block: inside
    edge[0, 1, 2, 2] = 1  # a quarter of a block: outside
    mask = sized.lesion_view(edge)[0, 1]
    assert mask[0, 0] == 1 and mask.sum() == 1


def test_lesion_size_rejects_bad_values_and_cnns():
    with pytest.raises(ValueError, match=r"lesion_size must be in \[32, 1024\]"):
        build_model("radiomics_svm", in_chans=2, lesion_size=16)
    with pytest.raises(ConfigError, match="model.lesion_size: .* is a CNN"):
        apply_overrides(load_config(), ["model.name=custom_efficientnet_lite0", "model.lesion_size=160"])
    with pytest.raises(ConfigError, match=r"must be in \[32, 64\], got 96 \(raise data.image_size"):
        apply_overrides(load_config(), [*RADIOMICS_TINY, "data.image_size=64", "model.lesion_size=96"])
    cfg = apply_overrides(load_config(), [*RADIOMICS_TINY, "data.image_size=64", "model.lesion_size=48"])
    assert cfg.model.lesion_size == 48


@pytest.mark.slow
def test_scan_view_run_fits_a_pca_per_view_and_predicts_explains_from_a_box(tmp_path):
    from liverus.data import load_task_cases
    from liverus.training import train
    from liverus.training.feature_fit import extract_features

    run = tmp_path / "scan"
    # The views prepared at 64 px, the lesion crop seen at 48 (model.lesion_size), as the final recipe does.
    options = ["data.image_size=64", "model.name=radiomics_svm_efficientnet_lite0", "data.scan_view=true",
               "model.lesion_size=48"]  # fmt: skip
    cfg = apply_overrides(load_config(), [*RADIOMICS_TINY, *options])
    train(cfg, run)
    model, card = load_model(run / "model.pt")
    assert card.views == 2 and card.preprocess.scan_view and model.views == 2 and model.build_kwargs["views"] == 2
    assert model.lesion_size == 48 and card.preprocess.image_size == 64
    # One PCA per view: the projection is block-diagonal, and each block holds orthonormal components.
    width, k = model.backbone.spec.out_channels, 32
    comps = model.pca_components.numpy()
    assert not comps[:k, width:].any() and not comps[k:, :width].any()
    for block in (comps[:k, :width], comps[k:, width:]):
        rows = block[np.abs(block).sum(1) > 0]
        np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-4)
    # The second block is the PCA of the whole scan's features of the training part.
    cases = {c.path: c for c in load_task_cases(run / "phantom", "binary", "source")[0]}
    train_cases = [cases[p] for p in json.loads((run / "splits.json").read_text())["folds"][0]["train"]]
    _, deep, _ = extract_features(model, train_cases, card.classes, CaseCache(card.preprocess), card)
    scaled = (deep - model.deep_mean.numpy()) / model.deep_scale.numpy()
    np.testing.assert_allclose(scaled[:, width:].mean(0), 0, atol=1e-3)  # centred on the training part
    image = sorted((run / "phantom" / "malignant").glob("*.png"))[0]
    for command, out in (("predict", "pred.csv"), ("explain", "heat")):
        p = run_cli(command, "--model", str(run / "model.pt"), str(image), "--box", "40,40,80,80",
                    "--out", str(tmp_path / out))  # fmt: skip
        assert p.returncode == 0, p.stderr
    assert ",ok," in (tmp_path / "pred.csv").read_text()
    assert (tmp_path / "heat" / f"{image.stem}_occlusion.png").is_file()
    explained = json.loads((tmp_path / "heat" / f"{image.stem}_features.json").read_text())
    assert set(explained["contributions"]) == {"shape and margin", "echo pattern", "texture",
                                               "halo and posterior acoustics", "deep: lesion crop",
                                               "deep: whole scan"}  # fmt: skip
    assert abs(explained["baseline_logit"] + sum(explained["contributions"].values()) - explained["logit"]) < 1e-3


def test_feature_model_options_are_the_models_defaults_and_the_configs():
    # One table (FEATURE_MODEL_OPTIONS) that the registry passes through and the trainer reads: its defaults must be
    # the model's and the config's, and a model built from a default config records none of them.
    import inspect

    from liverus.models.features import FEATURE_MODEL_OPTIONS
    from liverus.training.config import ModelConfig
    from liverus.training.trainer import build_run_model

    signature = inspect.signature(LesionFeatureModel.__init__).parameters
    config = ModelConfig()
    for name, default in FEATURE_MODEL_OPTIONS.items():
        assert signature[name].default == default, name
        assert getattr(config, name) == default, name
    cfg = apply_overrides(load_config(), ["model.name=radiomics_svm_efficientnet_lite0", "data.lesion_channel=true",
                                          "data.crop=roi", "model.flip_features=true", "model.pca_dim=8"])  # fmt: skip
    model = build_run_model(cfg, 2)
    assert model.flip_features and model.pca_components.shape[0] == 8
    assert {k for k in FEATURE_MODEL_OPTIONS if k in model.build_kwargs} == {"flip_features", "pca_dim"}
    with pytest.raises(ValueError, match="pca_dims"):
        build_model("radiomics_svm", in_chans=2, pca_dims=8)  # a misspelt option is refused by the model
