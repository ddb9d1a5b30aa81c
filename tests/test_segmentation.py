"""Lesion segmentation: the segmenter, its training and metrics, and box-free use in predict and the web page."""

from __future__ import annotations

import csv
import json
import re
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


# --- the config keys the segmenter honours or refuses ------------------------------------------------------------

# A non-default value of every key the segmenter does not use (each passes TrainConfig.validate).
REFUSED = {
    "loss.name": "focal",
    "loss.focal_gamma": "1.0",
    "loss.label_smoothing": "0.1",
    "loss.balanced_sampler": "true",
    "loss.attention_weight": "0.5",
    "loss.segmentation_weight": "0.5",
    "loss.debias_by": "size_group",
    "loss.debias_weight": "0.5",
    "data.balance_by": "size_group",
    "data.splits": "splits.json",
    "data.fold": "1",
    "data.lesion_channel": "true",
    "data.lesion_from": "box",
    "data.test_lesion_from": "box",
    "data.box_loosen": "0.1",
    "data.box_jitter": "0.1",
    "data.box_mask": "ellipse",
    "data.box_average": "3",
    "data.box_shift": "0.2",
    "data.box_copy_jitter": "0.1",
    "model.ensemble": "3",
    "model.threshold": "0.4",
    "model.in_chans": "3",
    "model.drop_rate": "0.2",
    "model.drop_path_rate": "0.1",
    "model.se_reduction": "8",
    "model.ca_reduction": "8",
    "model.spatial_kernel": "3",
    "model.pca_dim": "16",
    "runtime.compile": "true",
    "runtime.channels_last": "true",
}


def _segment_config(*overrides: str):
    from liverus.training import apply_overrides, load_config

    return apply_overrides(load_config(), ["model.name=unet_efficientnet_lite0", *overrides])


def test_every_key_the_segmenter_refuses_is_tested():
    from liverus.training.segmentation import _NOT_USED

    assert set(REFUSED) == set(_NOT_USED)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_segment_train_refuses_a_key_it_does_not_use(key, tmp_path):
    from liverus.training import ConfigError
    from liverus.training.segmentation import train_segmenter

    cfg = _segment_config(f"{key}={REFUSED[key]}")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: set to .*, but the segmenter does not use it \(.+\); "
                                          r"remove it from the config or set it to "):  # fmt: skip
        train_segmenter(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_segment_train_accepts_the_defaults_and_what_it_does_anyway():
    from liverus.training.segmentation import _check_config

    _check_config(_segment_config())
    _check_config(_segment_config("runtime.channels_last=false", "model.ensemble=1"))


def test_segment_cv_refuses_a_key_it_does_not_use_before_writing_anything(tmp_path):
    from liverus.training import ConfigError
    from liverus.training.segmentation import segment_cross_validation

    with pytest.raises(ConfigError, match=r"^loss\.name: .*the segmenter does not use it"):
        segment_cross_validation(_segment_config("loss.name=focal"), tmp_path / "cv")
    assert not (tmp_path / "cv").exists()


def test_segment_train_cli_names_the_refused_key(tmp_path):
    p = run_cli("segment", "train", "--set", "model.name=unet_efficientnet_lite0", "--set", "optim.grad_clip=0.5",
                "--set", "loss.label_smoothing=0.1", "--out", str(tmp_path / "r"))  # fmt: skip
    assert p.returncode != 0 and "loss.label_smoothing" in p.stderr and "segmenter does not use it" in p.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_segment_train_honours_the_optimiser_loader_and_logging_keys(tmp_path):
    from liverus.training import loop
    from liverus.training import segmentation as seg

    cfg = _segment_config(
        "data.image_size=64", "data.phantom_patients=12", "data.phantom_size=96", "data.augment=none",
        "optim.epochs=6", "optim.batch_size=4", "optim.warmup_epochs=0", "optim.grad_clip=0.5",
        "optim.accum_steps=2", "optim.freeze_bn=true", "optim.early_stopping_patience=2", "data.num_workers=1",
        "runtime.progress=true", "runtime.tensorboard=true",
    )  # fmt: skip
    clips, bars, workers = [], [], []
    real_clip, real_loader = torch.nn.utils.clip_grad_norm_, seg.DataLoader

    def clip(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    def loader(*args, **kwargs):
        workers.append(kwargs.get("num_workers", 0))
        return real_loader(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        mp.setattr(seg, "DataLoader", loader)
        mp.setattr(loop, "_progress_bar", lambda total, enabled, desc: bars.append(enabled))
        mp.setattr(seg, "dice", lambda p, t: 0.5)  # a validation Dice that never improves after the first epoch
        result = seg.train_segmenter(cfg, tmp_path / "run")
    run = tmp_path / "run"
    # optim.early_stopping_patience: two epochs without a gain after the first, of six planned.
    assert result["epochs_run"] == 3 and result["best_epoch"] == 1
    # optim.accum_steps: one optimiser step per two batches; optim.grad_clip: each step clips at 0.5.
    n_train = len(json.loads((run / "splits.json").read_text())["folds"][0]["train"])
    steps = result["epochs_run"] * ((n_train // 4) // 2)
    assert steps > 0
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["scheduler"]["last_epoch"] == steps
    assert clips == [0.5] * steps
    # optim.freeze_bn: the BatchNorm statistics stay those the segmenter was built with.
    trained, _ = load_segmenter(run / "model.pt")
    built = build_segmenter().state_dict()
    stats = [k for k in built if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained.state_dict()[k], built[k]) for k in stats)
    # data.num_workers, runtime.progress and runtime.tensorboard.
    assert workers == [1]
    assert bars == [True] * 3
    assert list((run / "tb").glob("events.out.tfevents.*"))


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
    monkeypatch.setattr(pred, "propose_lesion", lambda image: proposal)
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
