"""Feature-group contributions of feature models: exact Shapley values, their efficiency, groups and ensembles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liverus.data.radiomics import FEATURE_NAMES, RUN_LENGTH_NAMES
from liverus.engine.contributions import feature_contributions, has_feature_groups, shapley_weights
from liverus.engine.forward import normalize_images
from liverus.models import EnsembleClassifier, build_model

RADIOMICS_GROUPS = ("shape and margin", "echo pattern", "texture", "halo and posterior acoustics")


def test_shapley_weights_give_the_known_values_of_a_game_with_an_interaction():
    keep, weights = shapley_weights(3)
    assert keep.shape == (8, 3) and not keep[0].any() and keep[-1].all()
    # Each player brings its own value; players 0 and 1 together bring 4 more, which they split evenly.
    v = np.array([(row * [1.0, 2.0, 3.0]).sum() + 4.0 * (row[0] and row[1]) for row in keep])
    np.testing.assert_allclose(weights @ v, [3.0, 4.0, 3.0])
    np.testing.assert_allclose((weights @ v).sum(), v[-1] - v[0])  # efficiency
    for bad in (0, 13):
        with pytest.raises(ValueError, match="1 to 12 groups"):
            shapley_weights(bad)


def _lesion_input(n: int = 3, size: int = 64, views: int = 1, seed: int = 0) -> torch.Tensor:
    """Speckled gray images with a disc lesion of a different brightness in each, normalised as a model takes them."""
    rng = np.random.default_rng(seed)
    pixels = torch.zeros(n, 2 * views, size, size, dtype=torch.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / (4 + i)) ** 2
        for v in range(views):
            img = rng.normal(110, 25, (size, size))
            img[disc] = 60 + 40 * i + rng.normal(0, 10, disc.sum())
            pixels[i, 2 * v] = torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))
            pixels[i, 2 * v + 1] = torch.from_numpy(disc.astype(np.uint8) * 255)
    return normalize_images(pixels, 0.5, 0.5, 2, views)


def _fitted(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, in_chans=2, **kwargs).eval()
    rng = np.random.default_rng(seed)
    n_rad = len(FEATURE_NAMES) + (len(RUN_LENGTH_NAMES) if kwargs.get("run_length") else 0)
    width = n_rad + (model.pca_components.shape[0] if model.backbone is not None else 0)
    params = {"radiomics_mean": rng.normal(size=n_rad), "radiomics_scale": np.full(n_rad, 3.0),
              "intercept": np.asarray(-0.3)}  # fmt: skip
    if model.backbone is not None:
        params["pca_components"] = rng.normal(size=tuple(model.pca_components.shape)) * 0.02
    if model.classifier == "logistic":
        params["coef"] = rng.normal(size=width) * 0.3
    else:
        params.update(support=rng.normal(size=(6, width)), dual_coef=rng.normal(size=6), gamma=np.asarray(0.02),
                      platt=np.array([-1.5, 0.2]))  # fmt: skip
    model.load_fitted(params)
    return model


def test_groups_cover_every_column_once_and_follow_the_options():
    radiomics = _fitted("radiomics_logistic")
    assert tuple(radiomics.feature_groups()) == RADIOMICS_GROUPS
    with_runs = _fitted("radiomics_logistic", run_length=True).feature_groups()
    assert sorted(i for cols in with_runs.values() for i in cols) == list(range(len(FEATURE_NAMES) + 5))
    assert all(i in with_runs["texture"] for i in range(len(FEATURE_NAMES), len(FEATURE_NAMES) + 5))
    two_views = _fitted("radiomics_svm_efficientnet_lite0", pca_dim=4, views=2).feature_groups()
    assert tuple(two_views) == (*RADIOMICS_GROUPS, "deep: lesion crop", "deep: whole scan")
    width = len(FEATURE_NAMES) + 8
    assert sorted(i for cols in two_views.values() for i in cols) == list(range(width))
    assert two_views["deep: whole scan"] == list(range(len(FEATURE_NAMES) + 4, width))


def test_logistic_contributions_are_the_coefficients_times_the_scaled_features_of_each_group():
    model = _fitted("radiomics_logistic")
    x = _lesion_input()
    found = feature_contributions(model, x)
    with torch.no_grad():
        z = model.scaled_features(*model.raw_features(x)).double().numpy()
    coef = model.coef.double().numpy()
    for g, cols in enumerate(model.feature_groups().values()):
        np.testing.assert_allclose(found.values[:, g], z[:, cols] @ coef[cols], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(found.baseline, float(model.intercept), atol=1e-6)


@pytest.mark.parametrize("name", ["radiomics_svm", "radiomics_svm_efficientnet_lite0"])
def test_contributions_add_up_to_the_models_log_odds(name):
    kwargs = {"pca_dim": 4, "views": 2} if "efficientnet" in name else {}
    model = _fitted(name, **kwargs)
    x = _lesion_input(views=kwargs.get("views", 1))
    found = feature_contributions(model, x)
    with torch.no_grad():
        logits = model(x)
    np.testing.assert_allclose(found.logit, (logits[:, 1] - logits[:, 0]).double().numpy(), atol=1e-4)
    np.testing.assert_allclose(found.baseline + found.values.sum(1), found.logit, atol=1e-6)
    assert len(set(np.round(found.baseline, 6))) == 1  # one average lesion for every image
    assert np.abs(found.values).max() > 1e-3  # the groups do move the decision of these images
    rows = found.as_dicts()
    assert list(rows[0]) == sorted(rows[0], key=lambda k: -abs(rows[0][k]))  # largest magnitude first


def test_ensemble_contributions_split_the_ensembles_own_log_odds():
    members = [_fitted("radiomics_svm", seed) for seed in (0, 1)]
    ensemble = EnsembleClassifier(members, temperatures=[1.0, 2.5]).eval()
    x = _lesion_input()
    found = feature_contributions(ensemble, x)
    with torch.no_grad():
        p = ensemble(x).exp()[:, 1].double().numpy()
    np.testing.assert_allclose(found.logit, np.log(p / (1 - p)), atol=1e-4)
    np.testing.assert_allclose(found.baseline + found.values.sum(1), found.logit, atol=1e-6)
    single = feature_contributions(members[0], x)
    assert not np.allclose(found.values, single.values, atol=1e-3)


def test_cnns_and_bad_coalitions_are_refused():
    cnn = build_model("baseline_efficientnet_lite0", num_classes=2, weights=None)
    assert not has_feature_groups(cnn) and has_feature_groups(_fitted("radiomics_logistic"))
    with pytest.raises(ValueError, match="not a feature model"):
        feature_contributions(cnn, torch.zeros(1, 3, 32, 32))
    model = _fitted("radiomics_logistic")
    with pytest.raises(ValueError, match="keep must be"):
        model.coalition_logits(_lesion_input(n=1), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="not been fitted"):
        build_model("radiomics_logistic", in_chans=2).coalition_logits(_lesion_input(n=1),
                                                                       torch.ones(1, 4, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match="ensembles of feature models"):
        EnsembleClassifier(
            [build_model("baseline_efficientnet_lite0", num_classes=2, weights=None) for _ in range(2)]
        ).feature_groups()


def _with_reference(model, seed: int = 0):
    """``model`` with reference lesions from 200 synthetic training lesions whose echo-pattern columns say the class
    (malignant ones +1.5 standard deviations) and everything else is noise."""
    from liverus.training.feature_fit import set_contribution_reference

    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], 100)
    z = rng.normal(size=(200, model.reference_lesions.shape[1]))
    z[:, model.feature_groups()["echo pattern"]] += 1.5 * y[:, None]
    set_contribution_reference(model, z, y, seed=seed)
    return model


def test_contributions_against_reference_lesions_add_up_and_place_the_case_among_each_class():
    model = _fitted("radiomics_logistic")
    cols = model.feature_groups()["echo pattern"]
    coef = np.zeros(model.coef.shape[0])
    coef[cols] = 0.8  # only the echo pattern decides
    model.load_fitted({"coef": coef})
    _with_reference(model)
    assert bool(model.has_reference) and model.reference_lesions.abs().sum() > 0
    x = _lesion_input()
    found = feature_contributions(model, x)
    with torch.no_grad():
        logits = model(x)
        z_ref = model.reference_lesions.double()
        p_ref = torch.sigmoid(z_ref @ model.coef.double() + model.intercept.double()).mean()
    np.testing.assert_allclose(found.logit, (logits[:, 1] - logits[:, 0]).double().numpy(), atol=1e-4)
    np.testing.assert_allclose(found.baseline + found.values.sum(1), found.logit, atol=1e-6)
    # Every group absent: the probability averaged over the reference lesions, half of each class.
    np.testing.assert_allclose(found.baseline_probability, float(p_ref), atol=1e-6)
    others = [g for g in found.groups if g != "echo pattern"]
    assert np.abs(found.values[:, [found.groups.index(g) for g in others]]).max() < 1e-6  # they do not decide
    context = found.training_context()
    assert set(context) == set(found.groups)
    benign, malignant = context["echo pattern"]["benign"], context["echo pattern"]["malignant"]
    assert benign == sorted(benign) and malignant == sorted(malignant)  # quartiles in order
    assert malignant[1] > 1.0 > -1.0 > benign[1]  # the malignant lesions' echo pattern pushes towards malignant
    assert max(abs(v) for g in others for c in context[g].values() for v in c) < 1e-6


def test_models_saved_before_the_reference_existed_load_and_explain_against_the_training_mean():
    model = _fitted("radiomics_svm")
    state = {k: v for k, v in model.state_dict().items()
             if k not in ("has_reference", "reference_lesions", "group_quantiles")}  # fmt: skip
    older = build_model("radiomics_svm", in_chans=2, n_support=6).eval()
    older.load_state_dict(state, strict=True)
    assert not bool(older.has_reference) and older.contribution_quantiles() is None
    found = feature_contributions(older, _lesion_input())
    assert found.quantiles is None and found.training_context() is None
    np.testing.assert_allclose(found.baseline + found.values.sum(1), found.logit, atol=1e-6)
    with_ref = feature_contributions(_with_reference(model), _lesion_input())
    assert with_ref.quantiles.shape == (2, 4, 3)
    assert not np.allclose(with_ref.baseline, found.baseline)


def test_ensemble_quantiles_are_the_members_scaled_by_their_temperatures():
    members = [_with_reference(_fitted("radiomics_svm", seed), seed) for seed in (0, 1)]
    ensemble = EnsembleClassifier(members, temperatures=[1.0, 2.0]).eval()
    expected = (members[0].group_quantiles + members[1].group_quantiles / 2) / 2
    torch.testing.assert_close(ensemble.contribution_quantiles(), expected)
    found = feature_contributions(ensemble, _lesion_input())
    np.testing.assert_allclose(found.baseline + found.values.sum(1), found.logit, atol=1e-6)


def test_the_factorised_svm_coalitions_equal_scoring_every_mixed_row():
    # The SVM's coalitions are computed without building the mixed rows (a product of kernel factors); the answer
    # must be that of the classifier on each mixed row.
    model = _fitted("radiomics_svm")
    assert model.classifier == "svm" and model.support.shape[0] > 1
    rng = np.random.default_rng(0)
    z = torch.as_tensor(rng.normal(size=(3, model.support.shape[1])), dtype=torch.float32)
    keep = torch.as_tensor(rng.random((10, len(model.feature_groups()))) > 0.5)
    got = model.mixed_decisions(z, keep)
    groups = list(model.feature_groups().values())
    ref = model.reference
    want = torch.empty_like(got)
    for k in range(keep.shape[0]):
        cols = torch.zeros(z.shape[1], dtype=torch.bool)
        for g, c in enumerate(groups):
            cols[c] = bool(keep[k, g])
        for n in range(z.shape[0]):
            want[k, n] = model.decision(torch.where(cols, z[n], ref))
    assert want.std() > 1e-3  # decisions that differ, so the comparison can fail
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
