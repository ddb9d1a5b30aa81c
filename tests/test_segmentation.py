"""Lesion segmentation: the segmenter, its training and metrics, and box-free use in predict and the web page."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli, start_server
from liverus.evaluation.segmentation import dice, hd95, iou, segmentation_summary
from liverus.models.segmentation import build_segmenter, load_segmenter, save_segmenter


@pytest.fixture(scope="module")
def radiomics_run_for_segment(tmp_path_factory):
    """A radiomics (mask-channel) model on the phantom: it reads the lesion mask a box stands for."""
    from liverus.training import apply_overrides, load_config, train

    out = tmp_path_factory.mktemp("radiomics_seg") / "run"
    train(apply_overrides(load_config(), ["data.image_size=64", "data.crop=roi", "data.lesion_channel=true",
                                          "data.phantom_patients=20", "data.phantom_size=128", "data.augment=none",
                                          "model.name=radiomics_logistic", "runtime.progress=false",
                                          "runtime.tensorboard=false"]), out)  # fmt: skip
    return out


# --- metrics -----------------------------------------------------------------------------------------------------


def _square(y0: int, x0: int, side: int, shape=(64, 64)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_perfect_prediction_scores_one_and_known_overlaps_score_what_hand_computation_says():
    a = _square(10, 10, 20)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0 and hd95(a, a) == 0.0
    b = _square(10, 20, 20)  # shifted 10 px right: overlap 20x10
    assert dice(a, b) == pytest.approx(2 * 200 / 800)
    assert iou(a, b) == pytest.approx(200 / 600)
    assert hd95(a, b) == pytest.approx(10.0, abs=0.5)
    assert np.isnan(hd95(a, np.zeros_like(a)))


def test_summary_per_class_with_intervals_and_detection():
    a = _square(10, 10, 20)
    far = _square(40, 40, 10)
    summary = segmentation_summary([a, far], [a, a], ["malignant", "benign"], n_boot=200)
    assert summary["by_class"]["malignant"]["dice"]["mean"] == 1.0
    assert summary["by_class"]["benign"]["detected"]["mean"] == 0.0
    assert summary["all"]["detected"]["mean"] == 0.5
    lo, hi = summary["all"]["dice"]["ci95"]
    assert lo <= summary["all"]["dice"]["mean"] <= hi


# --- the segmenter -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (100, 150)])
def test_segmenter_keeps_the_input_size(size):
    model = build_segmenter().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, *size)).shape == (2, 1, *size)


def test_segmenter_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("unet_resnet18")
    with pytest.raises(ValueError, match="decoder_channels"):
        build_segmenter(decoder_channels=(8, 8))
    (tmp_path / "x.pt").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="could not be read"):
        load_segmenter(tmp_path / "x.pt")


def test_segmenter_save_load_round_trip(tmp_path):
    from liverus.models import ModelCard

    torch.manual_seed(0)
    model = build_segmenter().eval()
    card = ModelCard(model_name=model.model_name, classes=("background", "lesion"), in_chans=1,
                     normalization=model.normalization, task="segmentation")  # fmt: skip
    save_segmenter(model, tmp_path / "seg.pt", card)
    again, card2 = load_segmenter(tmp_path / "seg.pt")
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
    assert card2.task == "segmentation"


def test_segmentation_training_lowers_the_loss_and_writes_a_run(segmenter_run):
    result = json.loads((segmenter_run / "result.json").read_text())
    losses = [row["train_loss"] for row in result["history"]]
    assert losses[-1] < losses[0] * 0.9
    metrics = json.loads((segmenter_run / "metrics.json").read_text())["validation"]
    assert set(metrics["by_class"]) == {"benign", "malignant"}
    assert (segmenter_run / "splits.json").is_file() and (segmenter_run / "provenance.json").is_file()


def test_segment_evaluate_cli_reports_per_class(segmenter_run, tmp_path):
    manifest = segmenter_run / "phantom" / "manifest.csv"
    p = run_cli("segment", "evaluate", str(segmenter_run / "model.pt"), "--data", str(manifest),
                "--out", str(tmp_path / "ev"), "--bootstrap", "100")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "malignant: Dice" in p.stdout and "benign: Dice" in p.stdout
    assert (tmp_path / "ev" / "report.html").is_file()


def test_box_free_predict_on_a_folder_reports_the_predicted_lesion(roi_run, segmenter_run, tmp_path):
    folder = roi_run / "phantom" / "malignant"
    out = tmp_path / "pred.csv"
    p = run_cli("predict", str(folder), "--model", str(roi_run / "model.pt"), "--segmenter",
                str(segmenter_run / "model.pt"), "--out", str(out), "--skip-bad")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(folder.glob("*.png")))  # a row per image
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["lesion_source"] == "predicted" for r in ok)
    assert all("segmenter found no lesion" in r["error"] for r in rows if r["status"] != "ok")
    # Without the segmenter, the same call says how to give the lesion.
    p = run_cli("predict", str(folder), "--model", str(roi_run / "model.pt"), "--out", str(tmp_path / "no.csv"))
    assert p.returncode == 1 and "--segmenter" in p.stderr and "--box" in p.stderr


def test_proposed_lesion_box_lies_inside_the_image(segmenter_run):
    from liverus.data import read_image
    from liverus.engine.segment import propose_lesion

    model, card = load_segmenter(segmenter_run / "model.pt")
    image = read_image(sorted((segmenter_run / "phantom" / "malignant").glob("*.png"))[0])
    proposal = propose_lesion(model, card, image)
    assert proposal.mask.shape == image.shape
    if proposal.box is not None:
        x0, y0, x1, y1 = proposal.box
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
        assert proposal.mask[int(y0) : int(y1), int(x0) : int(x1)].sum() == proposal.mask.sum()


@pytest.fixture(scope="module")
def roi_segment_server(roi_run, segmenter_run):
    try:
        proc, url = start_server(roi_run / "model.pt", "--segmenter", str(segmenter_run / "model.pt"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_browser_shows_the_proposed_box_and_lets_the_user_replace_it(roi_segment_server, roi_run, tmp_path):
    import httpx
    from playwright.sync_api import sync_playwright

    from test_serve import _chromium, _drag_box

    assert httpx.get(roi_segment_server + "/api/health").json()["proposes_box"] is True
    # An image on which the segmenter proposes a lesion.
    candidates = sorted((roi_run / "phantom" / "malignant").glob("*.png"))
    image, proposed = None, None
    for c in candidates:
        r = httpx.post(roi_segment_server + "/api/image", files={"file": (c.name, c.read_bytes(), "image/png")},
                       timeout=60)  # fmt: skip
        if r.json().get("proposed_box"):
            image, proposed = c, r.json()["proposed_box"]
            break
    assert image is not None, "the phantom segmenter proposed no lesion on any malignant image"
    with sync_playwright() as pw:
        browser = _chromium(pw)
        page = browser.new_page()
        page.goto(roi_segment_server + "/")
        # Before any upload no image element is shown (no broken-image placeholder).
        assert page.eval_on_selector_all("img", "els => els.filter(e => e.offsetParent !== null).length") == 0
        page.wait_for_selector("#box-panel:not(.hidden)", timeout=30_000)
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('box-text').textContent.includes('proposed')",
                               timeout=60_000)  # fmt: skip
        shown = [float(v) for v in page.inner_text("#box-text").split(" (")[0].split(",")]
        assert shown == pytest.approx(proposed, abs=1.0)
        assert page.is_visible("#box-rect")
        # The radiologist redraws it.
        _drag_box(page, 0.1, 0.5)
        redrawn = [float(v) for v in page.inner_text("#box-text").split(",")]
        assert redrawn != pytest.approx(proposed, abs=1.0)
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        browser.close()


def test_segment_train_refuses_a_classifier_name(tmp_path):
    p = run_cli("segment", "train", "--set", "model.name=custom_resnet50", "--out", str(tmp_path / "r"))
    assert p.returncode != 0 and "not a segmenter" in p.stderr
    assert not Path(tmp_path / "r" / "model.pt").exists()


@pytest.mark.slow
def test_segment_cv_writes_out_of_fold_masks_that_classification_can_use(tmp_path):
    from conftest import SEGMENT_TINY
    from liverus.data import load_cases
    from liverus.training import apply_overrides, load_config
    from liverus.training.segmentation import segment_cross_validation

    cfg = apply_overrides(load_config(), [*SEGMENT_TINY, "optim.epochs=2"])
    res = segment_cross_validation(cfg, tmp_path / "cv", folds=2)
    cases = load_cases(res["manifest"])
    assert len(cases) == res["metrics"]["all"]["dice"]["n"]
    with_mask = [c for c in cases if c.mask]
    assert len(with_mask) + len(res["not_detected"]) == len(cases)
    assert all(Path(c.mask).is_file() and "cv/masks" in c.mask for c in with_mask)
    splits = [json.loads((tmp_path / "cv" / f"fold{i}" / "splits.json").read_text())["folds"][0] for i in (0, 1)]
    # Each image's mask comes from the segmenter that did not train on it: the two training sets are disjoint.
    assert not set(splits[0]["train"]) & set(splits[1]["train"])


def test_box_plus_segmenter_gives_a_mask_inside_the_box(radiomics_run_for_segment, segmenter_run, monkeypatch):
    from liverus.data import read_image
    from liverus.engine import predictor as predictor_module
    from liverus.engine.predictor import Predictor
    from liverus.engine.segment import LesionProposal

    pred = Predictor.from_path(radiomics_run_for_segment / "model.pt", segmenter=segmenter_run / "model.pt")
    image = read_image(sorted((radiomics_run_for_segment / "phantom" / "malignant").glob("*.png"))[0])
    h, w = image.shape
    # A proposal that spills over the box on every side: only its part inside the box may reach the model.
    spill = np.zeros((h, w), np.uint8)
    spill[10 : h - 10, 10 : w - 10] = 1
    proposal = LesionProposal(spill, (10, 10, w - 10, h - 10), 1.0)
    monkeypatch.setattr(predictor_module, "propose_lesion", lambda *a: proposal)
    seen = {}
    real = predictor_module.preprocess

    def capture(img, cfg, *, lesion=None, box=None):
        seen["lesion"], seen["box"] = lesion, box
        return real(img, cfg, lesion=lesion, box=box)

    monkeypatch.setattr(predictor_module, "preprocess", capture)
    box = (30.0, 30.0, 80.0, 90.0)
    pre = pred.prepare(image, box=box)
    assert pre.lesion_source == "user box + predicted mask" and seen["box"] == box
    outside = np.ones((h, w), bool)
    outside[30:90, 30:80] = False
    assert seen["lesion"].any() and not seen["lesion"][outside].any()
