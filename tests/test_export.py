"""ONNX export (liverus.export) and the predictor on it."""

from __future__ import annotations

import numpy as np
import pytest

from liverus.data import read_image
from liverus.engine.predictor import Predictor


def test_onnx_matches_pytorch_and_carries_metadata(run, images, onnx_file):
    pt = Predictor.from_path(run / "model.pt")
    ox = Predictor.from_path(onnx_file)
    assert ox.backend == "onnxruntime" and ox.threshold == pt.threshold and ox.preprocess_cfg == pt.preprocess_cfg
    assert ox.card == pt.card  # the whole model card travels in the ONNX metadata
    pre = [pt.prepare(read_image(f)) for f in images]
    assert np.abs(pt.probabilities(pre) - ox.probabilities(pre)).max() < 1e-4
    from liverus.export import export_onnx

    with pytest.raises(ValueError, match="already exists"):
        export_onnx(run / "model.pt", onnx_file)


def test_ensemble_survives_save_load_heatmaps_and_onnx(tmp_path):
    import torch

    from liverus.data import PreprocessConfig
    from liverus.export import export_onnx
    from liverus.models import EnsembleClassifier, build_model, default_card, load_model, save_model

    torch.manual_seed(0)
    members = [build_model("custom_efficientnet_lite0", drop_rate=0.0).eval() for _ in range(2)]
    ens = EnsembleClassifier(members, [1.0, 2.0]).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x) / t, 1) for m, t in zip(members, (1.0, 2.0), strict=True)]).mean(0)
        torch.testing.assert_close(torch.softmax(ens(x), 1), mean, atol=1e-6, rtol=0)
    card = default_card(ens).replace(
        preprocess=PreprocessConfig(image_size=64, crop="none"), operating_points={"youden": 0.5}
    )
    save_model(ens, tmp_path / "ens.pt", card)
    loaded, loaded_card = load_model(tmp_path / "ens.pt")
    assert isinstance(loaded, EnsembleClassifier) and loaded_card.members == 2 and loaded_card == card
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(loaded(x), 1), mean, atol=1e-6, rtol=0)
    info = export_onnx(tmp_path / "ens.pt", tmp_path / "ens.onnx")  # one graph; refused beyond 1e-4
    assert info["max_abs_diff_vs_pytorch"] < 1e-4 and info["members"] == 2
    pred = Predictor.from_path(tmp_path / "ens.pt")
    pre = pred.prepare(np.random.default_rng(0).random((80, 80)).astype(np.float32))
    for method in ("gradcam", "attention"):  # the members' average map
        heat = pred.heatmap(pre, method)
        assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1
    onnx_pred = Predictor.from_path(tmp_path / "ens.onnx")
    assert abs(onnx_pred.probabilities([pre])[0] - pred.probabilities([pre])[0]) < 1e-4


def test_int8_export_is_auc_checked_and_refused_when_the_auc_moves_too_much(run, images, tmp_path):
    import json

    import onnx

    from liverus.export import export_onnx

    summary = export_onnx(run / "model.pt", tmp_path / "int8.onnx", quantize="int8")
    q = summary["int8"]
    assert q["calibration_images"] > 0 and q["holdout_images"] > 0
    assert abs(q["auc_change"]) <= 0.005 and q["auc_change"] == pytest.approx(q["auc_int8"] - q["auc_fp32"])
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    assert any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "liverus"))
    assert meta["quantization"].startswith("int8")
    pt, ox = Predictor.from_path(run / "model.pt"), Predictor.from_path(tmp_path / "int8.onnx")
    pre = [pt.prepare(read_image(f)) for f in images]
    assert np.abs(pt.probabilities(pre) - ox.probabilities(pre)).max() < 0.05  # int8, not bit-exact
    # The refusal path: a tolerance no model can meet writes nothing.
    with pytest.raises(ValueError, match="export refused"):
        export_onnx(run / "model.pt", tmp_path / "refused.onnx", quantize="int8", max_auc_change=-1.0)
    assert not (tmp_path / "refused.onnx").exists()
    # Outside a run folder, the images must be named.
    model = tmp_path / "loose" / "model.pt"
    model.parent.mkdir()
    model.write_bytes((run / "model.pt").read_bytes())
    with pytest.raises(ValueError, match="--calibration"):
        export_onnx(model, tmp_path / "loose.onnx", quantize="int8")


def test_the_recommended_architecture_exports_and_answers_alike_on_aul_images(tmp_path, aul_root):
    # The recipe's architecture (radiomics + frozen EfficientNet-Lite0 of the lesion crop, mirrored, turned and
    # zoomed, and of the whole scan; an RBF SVM; an ensemble), trained small on the phantom, then exported: the ONNX
    # graph holds everything but the radiomics, which the predictor computes with numpy / scikit-image.
    import csv

    from helpers import run_cli
    from liverus.data import load_cases, read_mask, select_task
    from liverus.export import export_onnx
    from liverus.training import apply_overrides, load_config, train

    cfg = apply_overrides(load_config(), [
        "data.image_size=64", "data.crop=roi", "data.lesion_channel=true", "data.scan_view=true",
        "data.phantom_patients=20", "data.phantom_size=96", "data.augment=none", "data.box_average=4",
        "model.name=radiomics_svm_efficientnet_lite0", "model.flip_features=true", "model.rotate_features=10",
        "model.zoom_features=0.1", "model.ensemble=2", "runtime.progress=false", "runtime.tensorboard=false",
    ])  # fmt: skip
    train(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="int8 applies to CNN exports"):
        export_onnx(tmp_path / "run" / "model.pt", tmp_path / "q.onnx", quantize="int8")
    info = export_onnx(tmp_path / "run" / "model.pt", tmp_path / "model.onnx")
    assert info["members"] == 2 and info["radiomics"]["run_length"] is False
    pt, ox = Predictor.from_path(tmp_path / "run" / "model.pt"), Predictor.from_path(tmp_path / "model.onnx")
    assert ox.backend == "onnxruntime" and ox.card == pt.card
    cases, _ = select_task(load_cases(aul_root), "binary")
    cases = [c for c in cases if c.mask][::60]
    boxes = []
    for c in cases:
        ys, xs = np.nonzero(read_mask(c.mask))
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    pre = [pt.prepare(read_image(c.path), box=b) for c, b in zip(cases, boxes, strict=True)]  # four boxes each
    want, got = pt.probabilities(pre), ox.probabilities(pre)
    assert want.std() > 1e-3  # answers that differ between images, so the comparison can fail
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # The command line reads the export like a model.pt.
    box = ",".join(f"{v:g}" for v in boxes[0])
    p = run_cli("predict", cases[0].path, "--model", str(tmp_path / "model.onnx"), "--box", box,
                "--out", str(tmp_path / "p.csv"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    row = next(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert abs(float(row["p_malignant"]) - want[0]) < 1e-4 and "averaged over 4 boxes" in row["lesion_source"]


def test_a_feature_model_that_resizes_its_lesion_crop_is_refused_with_what_to_do_instead():
    from liverus.export import DeployableFeatureModel
    from liverus.models import build_model, default_card

    model = build_model("radiomics_svm_efficientnet_lite0", in_chans=2, lesion_size=32).eval()
    with pytest.raises(ValueError, match=r"model\.lesion_size.*deploy the model\.pt itself"):
        DeployableFeatureModel(model, default_card(model))
