"""Heatmaps (engine.heatmaps), their faithfulness (evaluation.faithfulness) and `liverus explain`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import run_cli as _cli
from liverus.data import read_image
from liverus.engine.forward import model_input
from liverus.engine.heatmaps import attention_heatmap, gradcam_heatmap, overlay, save_overlay
from liverus.engine.predictor import Predictor
from liverus.evaluation.faithfulness import faithfulness

# ---------------------------------------------------------------- heatmaps


def test_gradcam_and_attention_maps(run, images):
    pred = Predictor.from_path(run / "model.pt")
    pre = pred.prepare(read_image(images[0]))
    x = model_input(torch.from_numpy(pre.image[None, None]), pred.card)
    cam = gradcam_heatmap(pred.model, x)
    att = attention_heatmap(pred.model, x)
    for h in (cam, att):
        assert h.shape == (1, 64, 64) and h.min() >= 0 and h.max() <= 1
    assert att.max() == pytest.approx(1.0)


def test_overlay_colour_order_is_rgb_on_disk(tmp_path):
    gray = np.full((32, 32), 60, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:8, :8] = 1.0  # hot corner -> red in the jet colormap
    rgb = overlay(gray, heat)
    assert rgb[2, 2, 0] > rgb[2, 2, 2]  # in memory: RGB, red first
    path = save_overlay(tmp_path / "o.png", rgb)
    from PIL import Image

    disk = np.asarray(Image.open(path).convert("RGB"))
    assert disk[2, 2, 0] > 150 and disk[2, 2, 2] < 100  # a viewer shows red, not blue
    assert disk[20, 20, 2] > disk[20, 20, 0]  # cold region is blue


def test_faithfulness_pointing_game_and_energy():
    lesion = np.zeros((2, 20, 20), np.uint8)
    lesion[:, 5:10, 5:10] = 1
    inside = np.zeros((20, 20), np.float32)
    inside[7, 7] = 1.0
    outside = np.zeros((20, 20), np.float32)
    outside[15, 15] = 1.0
    f = faithfulness(np.stack([inside, outside]), lesion)
    assert f["pointing_game"] == 0.5 and f["energy_inside"] == 0.5 and f["n"] == 2
    assert f["lesion_area"] == pytest.approx(25 / 400)


def test_explain_cli_writes_overlays(run, images, tmp_path):
    out = tmp_path / "heat"
    p = _cli("explain", images[0], "--model", str(run / "model.pt"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    # A CNN has no default map (none beat random maps clearly on AUL): explain draws each, labelled as not verified.
    names = sorted(f.name for f in out.iterdir())
    assert [n.rsplit("_", 1)[1] for n in names] == ["attention.png", "gradcam.png", "occlusion.png"]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_predictor_heatmaps_for_gray_and_rgb_stems(tmp_path, in_chans):
    # An in_chans=3 model gets the gray image repeated to three channels on every path, heatmaps included.
    from liverus.data import PreprocessConfig
    from liverus.models import build_model, default_card, save_model

    model = build_model("custom_efficientnet_lite0", in_chans=in_chans)
    card = default_card(model).replace(preprocess=PreprocessConfig(image_size=64, crop="none"))
    save_model(model, tmp_path / "m.pt", card)
    pred = Predictor.from_path(tmp_path / "m.pt")
    pre = pred.prepare(np.random.default_rng(0).random((80, 96)).astype(np.float32))
    for method in ("gradcam", "attention"):
        heat = pred.heatmap(pre, method)
        assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1
    assert 0 <= pred.probabilities([pre])[0] <= 1
