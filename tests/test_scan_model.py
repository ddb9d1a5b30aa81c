"""The whole-scan feature model (three-class recipe): its fit matches scikit-learn's, it remembers features without
changing them, it survives saving and ONNX export, and it trains and evaluates from the command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from liverus.data import CaseCache, PreprocessConfig, load_cases, make_phantom_dataset, select_task
from liverus.models import ScanFeatureModel, build_model, default_card, load_model, save_model

SIZE = 64


@pytest.fixture(scope="module")
def three_class_phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan_phantom")
    make_phantom_dataset(out, n_patients=40, size=96, seed=3, include_normal=True)
    cases, classes = select_task(load_cases(out), "three_class")
    assert {c.label for c in cases} == set(classes) == {"normal", "benign", "malignant"}
    return cases, classes


@pytest.fixture(scope="module")
def fitted(three_class_phantom):
    from liverus.training.scan_fit import fit_scan_feature_model

    cases, classes = three_class_phantom
    torch.manual_seed(0)
    model = build_model("scan_svm_efficientnet_lite0", num_classes=3, pca_dim=8)
    card = default_card(model).replace(classes=classes, preprocess=PreprocessConfig(image_size=SIZE, crop="fan"))
    info = fit_scan_feature_model(model, cases, classes, CaseCache(card.preprocess), card, seed=0)
    return model, card, info, cases


def _inputs(card, cases, n=6):
    from liverus.data import UltrasoundDataset
    from liverus.engine.forward import model_input

    ds = UltrasoundDataset(cases[:n], card.classes, CaseCache(card.preprocess))
    return model_input(torch.stack([ds[i][0] for i in range(n)]), card)


def test_each_class_decision_is_scikit_learns_svm(fitted):
    """The torch form of every one-vs-rest SVM gives scikit-learn's decision values for the same support vectors."""
    from sklearn.svm import SVC

    from liverus.training.scan_fit import extract_scan_features

    model, card, info, cases = fitted
    x, y = extract_scan_features(model, cases, card.classes, CaseCache(card.preprocess), card)
    z = model.scaled(torch.from_numpy(x)).double().numpy()
    decisions = model.decisions(torch.from_numpy(z).float()).double().numpy()
    for k, name in enumerate(card.classes):
        target = (y == k).astype(int)
        weight = np.where(target == 1, len(y) / (2 * target.sum()), len(y) / (2 * (len(y) - target.sum())))
        svm = SVC(C=info["classes"][name]["C"], gamma="scale").fit(z, target, sample_weight=weight)
        a, b = model.platt[k].double().numpy()
        np.testing.assert_allclose(decisions[:, k], a * svm.decision_function(z) + b, atol=2e-3)
        assert info["classes"][name]["n_support"] == len(svm.support_)


def test_probabilities_are_normalised_one_vs_rest_probabilities(fitted):
    model, card, _, cases = fitted
    x = _inputs(card, cases)
    with torch.inference_mode():
        probs = torch.softmax(model(x), 1)
        one_vs_rest = torch.sigmoid(model.decisions(model.scaled(model.features(x))))
    torch.testing.assert_close(probs, one_vs_rest / one_vs_rest.sum(1, keepdim=True))
    assert probs.shape == (len(x), 3)


def test_remembered_features_are_the_computed_ones(fitted, monkeypatch):
    import liverus.models.scan_features as scan

    model, card, _, cases = fitted
    x = _inputs(card, cases)
    with torch.enable_grad():
        direct = model.features(x).detach()  # with gradients: straight through the backbone, nothing remembered
    with torch.inference_mode():
        remembered = model.features(x)
        calls = []
        monkeypatch.setattr(scan, "pooled_features", lambda *a, **k: calls.append(1))
        again = model.features(x)  # every scan seen: the backbone is not run
    assert calls == []
    torch.testing.assert_close(remembered, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, remembered)


def test_saved_model_and_padded_ensemble_member_answer_the_same(fitted, tmp_path):
    model, card, _, cases = fitted
    x = _inputs(card, cases)
    save_model(model, tmp_path / "m.pt", card)
    loaded, loaded_card = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, ScanFeatureModel) and loaded_card.classes == card.classes
    with torch.inference_mode():
        before = torch.softmax(model(x), 1)
        torch.testing.assert_close(torch.softmax(loaded(x), 1), before)
        loaded.pad_support(loaded.support.shape[1] + 5)
        torch.testing.assert_close(torch.softmax(loaded(x), 1), before)


def test_bad_options_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="lesion_channel: false"):
        build_model("scan_svm_efficientnet_lite0", num_classes=3, in_chans=2)
    with pytest.raises(ValueError, match="pooling"):
        build_model("scan_svm_efficientnet_lite0", num_classes=3, pooling="median")
    with pytest.raises(ValueError, match="pca_dim"):
        build_model("scan_svm_efficientnet_lite0", num_classes=3, pca_dim=5000)
    with pytest.raises(RuntimeError, match="not been fitted"):
        build_model("scan_svm_efficientnet_lite0", num_classes=3)(torch.zeros(1, 1, 32, 32))


def test_onnx_export_gives_the_same_probabilities(fitted, tmp_path):
    import onnxruntime as ort

    from liverus.export import export_onnx

    model, card, _, cases = fitted
    save_model(model, tmp_path / "m.pt", card)
    export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx")
    x = _inputs(card, cases)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    pixels = (x * card.normalization[1] + card.normalization[0]).numpy().astype(np.float32)  # back to [0, 1]
    onnx_probs = session.run(["probabilities"], {"image": pixels})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(onnx_probs, torch.softmax(model(x), 1).numpy(), atol=1e-4)


@pytest.mark.slow
def test_three_class_recipe_trains_and_evaluates_from_the_command_line(tmp_path):
    run = tmp_path / "scan"
    sets = ["data.task=three_class", "data.phantom_patients=40", "data.phantom_size=96", f"data.image_size={SIZE}",
            "data.val_fraction=0", "model.pca_dim=8", "model.weights=null"]  # fmt: skip
    cli = [sys.executable, "-m", "liverus.cli"]
    args = [*cli, "train", "--out", str(run), "--model", "scan_svm_efficientnet_lite0"]
    p = subprocess.run([*args, *(a for s in sets for a in ("--set", s))], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    # No validation images: strict JSON with null figures, and no report, saying why and what estimates the model.
    printed = json.loads(p.stdout[: p.stdout.index("}") + 1], parse_constant=pytest.fail)
    assert printed["val_macro_average_precision"] is None and printed["val_macro_auc"] is None
    assert "no report: the run held out no images" in p.stdout and not (run / "report.html").exists()
    fit = json.loads((run / "feature_fit.json").read_text())
    assert set(fit["classes"]) == {"normal", "benign", "malignant"}
    ev = tmp_path / "ev"
    p = subprocess.run([*cli, "evaluate", str(run / "model.pt"), "--data", str(run / "phantom"), "--out", str(ev)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    metrics = json.loads((ev / "metrics.json").read_text())["evaluation"]
    assert set(metrics["per_class"]) == {"normal", "benign", "malignant"}
    assert metrics["macro"]["pr_auc"] > 0.5  # the phantom's classes differ visibly: far above chance (~0.33)

    # Bare images in, three probabilities out: from model.pt and from its ONNX export, the same answers.
    images = sorted((run / "phantom").glob("*/*.png"))[:2] + sorted((run / "phantom" / "normal").glob("*.png"))[:2]
    p = subprocess.run([*cli, "export", str(run / "model.pt"), "--out", str(tmp_path / "m.onnx")], capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    answers = {}
    for name in ("model.pt", "m.onnx"):
        model = run / name if name == "model.pt" else tmp_path / name
        out = tmp_path / f"{name}.csv"
        p = subprocess.run([*cli, "predict", *map(str, images), "--model", str(model), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        with open(out) as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0])[:6] == ["path", "status", "p_normal", "p_benign", "p_malignant", "label"]
        probs = np.array([[float(r[f"p_{c}"]) for c in ("normal", "benign", "malignant")] for r in rows])
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        assert [r["label"] for r in rows] == [("normal", "benign", "malignant")[i] for i in probs.argmax(1)]
        assert {r["lesion_source"] for r in rows} == {"not used (whole image)"}
        answers[name] = probs
    np.testing.assert_allclose(answers["m.onnx"], answers["model.pt"], atol=1e-4)

    # The web API answers the same for an uploaded image, with no box.
    from fastapi.testclient import TestClient

    from liverus.engine.predictor import Predictor
    from liverus.serve.app import create_app

    with TestClient(create_app(Predictor.from_path(run / "model.pt"), max_upload_bytes=2_000_000)) as client:
        assert client.get("/api/health").json()["classes"] == ["normal", "benign", "malignant"]
        answer = client.post("/api/predict?heatmap=false", files={"file": images[-1].read_bytes()}).json()
    assert answer["threshold"] is None and answer["operating_points"] == {}
    served = [answer["class_probabilities"][c] for c in ("normal", "benign", "malignant")]
    np.testing.assert_allclose(served, answers["model.pt"][-1], atol=1e-6)
    assert answer["label"] == max(answer["class_probabilities"], key=answer["class_probabilities"].get)


def test_three_class_configs_refuse_what_they_cannot_honour():
    from liverus.training import apply_overrides, load_config
    from liverus.training.config import ConfigError

    recipe = load_config("configs/aul_three_class.yaml")
    assert recipe.model.threshold is None and recipe.data.val_fraction == 0  # no threshold needed for three classes
    with pytest.raises(ConfigError, match="model.ensemble"):
        apply_overrides(recipe, ["model.ensemble=5"])
    with pytest.raises(ConfigError, match="lesion_channel"):
        apply_overrides(recipe, ["data.lesion_channel=true"])
    with pytest.raises(ConfigError, match="balance_by"):
        apply_overrides(recipe, ["data.balance_by=size_group"])


def test_predictor_refuses_a_class_set_it_cannot_label():
    from liverus.engine.predictor import Predictor
    from liverus.models import ModelCard

    card = ModelCard(model_name="m", classes=("cyst", "hemangioma", "hcc"), in_chans=1, normalization=(0.5, 0.5),
                     preprocess=PreprocessConfig())  # fmt: skip
    with pytest.raises(ValueError, match=r"three-class \('normal', 'benign', 'malignant'\).*'cyst'"):
        Predictor(card=card, runner=None)
    ok = card.replace(classes=("normal", "benign", "malignant"))
    assert Predictor(card=ok, runner=None).is_three_class
