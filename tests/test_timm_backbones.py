"""Backbones users bring: every model family on timm CNNs (random init; nothing is downloaded), weights from a local
file with its keys checked, and the refusals that say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liverus.models import build_model, load_model, save_model

torch.set_num_threads(2)

# Small timm CNNs of three kinds (a ResNet, an inverted-residual net, a ConvNeXt) keep the tests fast.
SMALL = ["timm_resnet10t", "timm_mobilenetv3_small_050", "timm_convnext_atto"]
CNN_FAMILIES = ["custom", "baseline", "branch_a", "branch_b", "no_spatial", "no_compress"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No test may reach the network: the hub answers from its cache only (and has nothing there).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("backbone", SMALL)
@pytest.mark.parametrize("family", CNN_FAMILIES)
def test_every_cnn_family_runs_on_timm_backbones_trains_and_round_trips(tmp_path, family, backbone):
    import timm

    torch.manual_seed(0)
    model = build_model(f"{family}_{backbone}", in_chans=1, drop_rate=0.0)
    arch = backbone.removeprefix("timm_")
    # The feature width and the normalisation come from timm's own config, not from a table here.
    reference = timm.create_model(arch, pretrained=False)
    assert model.backbone.spec.out_channels == reference.num_features
    assert model.normalization == pytest.approx(
        (sum(reference.pretrained_cfg["mean"]) / 3, sum(reference.pretrained_cfg["std"]) / 3)
    )
    x = torch.rand(3, 1, 64, 80)  # non-square
    out = model(x)
    assert out.shape == (3, 2)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 1])).backward()
    assert model.backbone.stem().weight.grad is not None and model.backbone.stem().weight.grad.abs().sum() > 0
    # Grad-CAM's layer is the last stage timm lists, a 2-D map.
    seen = []
    handle = model.backbone.gradcam_layer().register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.eval()
    with torch.no_grad():
        want = model(x)
    handle.remove()
    assert len(seen[0]) == 4
    save_model(model, tmp_path / "model.pt")
    loaded, card = load_model(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)
    assert card.model_name == f"{family}_{backbone}" and card.normalization == pytest.approx(model.normalization)
    assert loaded.weights_info.pretrained_cfg["architecture"] == arch
    assert loaded.weights_info.pretrained_cfg["mean"] == list(reference.pretrained_cfg["mean"])
    if family == "custom" and backbone == SMALL[0]:
        # A timm whose config of this name gives other statistics than the model was trained with is refused.
        obj = torch.load(tmp_path / "model.pt", weights_only=True)
        obj["weights_info"]["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]
        torch.save(obj, tmp_path / "other.pt")
        with pytest.raises(ValueError, match=r"was trained with mean \[0.5, 0.5, 0.5\].*install the timm version"):
            load_model(tmp_path / "other.pt")


def test_the_family_colon_spelling_and_the_mask_channel_stem():
    from liverus.models import canonical_model_name, is_known_model

    assert canonical_model_name("custom:timm/convnext_atto") == "custom_timm_convnext_atto"
    assert canonical_model_name("radiomics_svm:timm/resnet10t") == "radiomics_svm_timm_resnet10t"
    assert is_known_model("custom:timm/convnext_atto") and is_known_model("baseline_timm_resnet50.a1_in1k")
    assert not is_known_model("custom_timm_no_such_net") and not is_known_model("nonsense_timm_resnet10t")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_model("custom_timm_no_such_net")
    torch.manual_seed(0)
    gray = build_model("baseline_timm_resnet10t", in_chans=1).eval()
    masked = build_model("baseline_timm_resnet10t", in_chans=2).eval()
    masked.load_state_dict(
        {k: (torch.cat([v, torch.zeros_like(v[:, :1])], 1) if v.shape != masked.state_dict()[k].shape else v)
         for k, v in gray.state_dict().items()}
    )  # fmt: skip
    # The mask channel's stem kernel starts at zero: a zero mask gives the gray model's answer.
    assert masked.backbone.stem().in_channels == 2
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(masked(torch.cat([x, torch.zeros_like(x)], 1)), gray(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file_are_loaded_with_their_keys_checked(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()  # another head: allowed
    path = tmp_path / f"us_pretrained{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # DDP-style
    model = build_model("baseline_timm_resnet10t", weights=str(path), in_chans=3).eval()
    assert model.weights_info.kind == "file" and len(model.weights_info.sha256) == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), source.forward_features(x))
    # A gray model from the same file: the stem summed over RGB answers a gray image as RGB copies of it.
    gray = build_model("baseline_timm_resnet10t", weights=str(path), in_chans=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(gray.backbone(x[:, :1]), source.forward_features(x[:, :1].expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    # The file of another architecture is refused with what does not match.
    other = tmp_path / f"convnext{suffix}"
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    else:
        torch.save(state, other)
    with pytest.raises(ValueError, match=r"does not fit timm model resnet10t: missing keys: .*conv1.*unexpected keys"):
        build_model("baseline_timm_resnet10t", weights=str(other))
    with pytest.raises(ValueError, match="does not exist"):
        build_model("baseline_timm_resnet10t", weights=str(tmp_path / "missing.safetensors"))


def test_pretrained_weights_without_a_network_say_how_to_pass_a_file():
    with pytest.raises(RuntimeError, match=r"could not download timm's pretrained weights for resnet10t.*--weights"):
        build_model("custom_timm_resnet10t", weights="imagenet")


def _train_tiny(run, *overrides: str) -> None:
    """Train on the phantom at 64 px, quietly, with these config overrides."""
    from liverus.training import apply_overrides, load_config, train

    base = ["data.image_size=64", "data.augment=none", "runtime.progress=false", "runtime.tensorboard=false"]
    train(apply_overrides(load_config(), [*base, *overrides]), run)


@pytest.mark.slow
def test_a_timm_cnn_trains_predicts_explains_and_exports(tmp_path):
    from liverus.engine.predictor import Predictor
    from liverus.export import export_onnx

    _train_tiny(tmp_path / "run", "data.phantom_patients=16", "data.phantom_size=96",
                "model.name=custom_timm_mobilenetv3_small_050", "optim.batch_size=8", "optim.epochs=1",
                "optim.warmup_epochs=0")  # fmt: skip
    pred = Predictor.from_path(tmp_path / "run" / "model.pt")
    pre = pred.prepare(np.random.default_rng(0).random((90, 90)).astype(np.float32))
    p = pred.probabilities([pre])[0]
    assert 0 <= p <= 1
    heat = pred.heatmap(pre, "gradcam")
    assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1
    info = export_onnx(tmp_path / "run" / "model.pt", tmp_path / "model.onnx")
    assert info["max_abs_diff_vs_pytorch"] < 1e-4
    assert abs(Predictor.from_path(tmp_path / "model.onnx").probabilities([pre])[0] - p) < 1e-4


@pytest.mark.slow
def test_the_feature_family_on_a_timm_backbone_fits_and_predicts_from_a_box(tmp_path):
    from liverus.engine.predictor import Predictor

    _train_tiny(tmp_path / "run", "data.crop=roi", "data.lesion_channel=true", "data.phantom_patients=30",
                "data.phantom_size=128", "data.scan_view=true", "model.name=radiomics_svm_timm_mobilenetv3_small_050",
                "model.flip_features=true")  # fmt: skip
    model, card = load_model(tmp_path / "run" / "model.pt")
    assert card.model_name == "radiomics_svm_timm_mobilenetv3_small_050"
    assert model.backbone.weights_info.pretrained_cfg["architecture"] == "mobilenetv3_small_050"
    pred = Predictor.from_path(tmp_path / "run" / "model.pt")
    image = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    (out,) = pred.predict([image], boxes=[(30.0, 30.0, 80.0, 80.0)])
    assert 0 <= out.probability <= 1
