"""Every registered model, the attention blocks, weights loading and export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from liverus.models import (
    ChannelAttention,
    ModelCard,
    SEBlock,
    SpatialAttention,
    build_model,
    count_parameters,
    default_card,
    is_fitted_model,
    list_models,
    load_card,
    load_model,
    save_model,
)
from liverus.models.heads import ParallelAttentionHead

torch.set_num_threads(2)

# Small images keep the ResNet-50 forward passes cheap; shape logic is the same as at 224 px.
FAST = 64


@pytest.fixture(scope="module")
def custom():
    torch.manual_seed(0)
    return build_model("custom_resnet50").eval()


# Feature models (radiomics_*, scan_svm_*) must be fitted first: tests/test_lesion_models.py, tests/test_scan_model.py.
@pytest.mark.parametrize("name", [n for n in list_models() if not is_fitted_model(n)])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_model_output_shape(name, batch):
    model = build_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(batch, 1, FAST, FAST)).shape == (batch, 2)


@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
def test_custom_shape_224_and_non_square(custom, size):
    with torch.no_grad():
        feats = custom.backbone(torch.randn(1, 1, *size))
        out = custom(torch.randn(4, 1, *size))
    assert feats.shape == (1, 2048, size[0] // 32, size[1] // 32)
    assert out.shape == (4, 2)


def test_three_classes_and_rgb_input():
    model = build_model("custom_resnet50", num_classes=3, in_chans=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, FAST, FAST)).shape == (2, 3)
    assert model.num_classes == 3 and model.in_chans == 3


def test_exact_parameter_count():
    # Derived from the architecture (see README "Models"):
    backbone = 23_508_032  # torchvision ResNet-50 without its 1000-class fc (3-channel stem)
    compress = 2048 * 1024 * 9 + 2 * 1024  # 3x3 conv without bias + BatchNorm affine
    se = (1024 * 64 + 64) + (64 * 1024 + 1024)  # two Linear layers with bias
    ca = 1024 * 64 + 64 * 1024  # shared MLP, 1x1 convs without bias
    spatial = 2 * 7 * 7
    fc = 2048 * 2 + 2
    expected = backbone + compress + 2 * (se + ca) + spatial + fc
    assert expected == 42_915_108
    rgb = build_model("custom_resnet50", in_chans=3)
    assert count_parameters(rgb) == expected
    # The gray stem has a third of the stem weights.
    assert count_parameters(build_model("custom_resnet50")) == expected - 64 * 2 * 49
    assert count_parameters(build_model("baseline_resnet50", in_chans=3)) == backbone + fc


def test_gradients_reach_stem_and_every_attention_block():
    model = build_model("custom_resnet50").train()
    loss = model(torch.randn(2, 1, FAST, FAST)).logsumexp(1).sum()
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    blocks = [m for m in model.modules() if isinstance(m, SEBlock | ChannelAttention | SpatialAttention)]
    assert len(blocks) == 5
    for block in blocks:
        grads = [p.grad for p in block.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), type(block).__name__


@pytest.mark.parametrize("block", [SEBlock(32, 4), ChannelAttention(32, 4), SpatialAttention(7)])
def test_blocks_keep_shape(block):
    x = torch.randn(3, 32, 5, 6)
    assert block(x).shape == x.shape


def test_attention_map_shape_and_range(custom):
    amap = custom.spatial_attention_map(torch.randn(2, 1, 224, 224))
    assert amap.shape == (2, 1, 7, 7)
    assert amap.min() >= 0 and amap.max() <= 1
    assert not custom.head.spatial._forward_hooks  # nothing left behind after the call
    assert build_model("no_spatial_resnet50").spatial_attention_map(torch.randn(1, 1, FAST, FAST)) is None


def test_branch_ablations_are_really_different():
    a = build_model("branch_a_resnet50").head
    b = build_model("branch_b_resnet50").head
    assert a.branch_b is None and isinstance(a.branch_a[0], SEBlock)
    assert b.branch_a is None and isinstance(b.branch_b[0], ChannelAttention)
    assert build_model("no_compress_resnet50").head.compress.__class__ is nn.Identity
    assert build_model("no_spatial_resnet50").head.spatial is None


def test_head_adapts_to_backbone_width():
    model = build_model("custom_efficientnet_lite0")
    assert model.head.compress[0].in_channels == 1280
    assert model.head.fc.in_features == 1280


def test_save_load_round_trip(tmp_path, custom):
    x = torch.randn(2, 1, FAST, FAST)
    path = tmp_path / "m.pt"
    save_model(custom, path, default_card(custom).replace(threshold=0.3))
    loaded, card = load_model(path)
    assert card == default_card(custom).replace(threshold=0.3)
    assert load_card(path) == card  # the card alone, without building the model
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), custom(x), rtol=0, atol=0)


def test_model_card_round_trip_and_files_of_earlier_versions(tmp_path, custom):
    from liverus.data import PreprocessConfig
    from liverus.utils import atomic_torch_save

    card = default_card(custom).replace(preprocess=PreprocessConfig(image_size=96, crop="roi"), threshold=0.4)
    assert ModelCard.from_dict(card.to_dict()) == card
    # liverus 0.1 stored an untyped "extra" dict; it still loads, with the weights' own defaults filled in.
    old = {
        "model": custom.state_dict(),
        "model_name": custom.model_name,
        "build_kwargs": custom.build_kwargs,
        "extra": {"threshold": 0.3, "preprocess": {"image_size": 96, "crop": "fan"}, "task": "binary"},
    }
    atomic_torch_save(old, tmp_path / "old.pt")
    _, loaded = load_model(tmp_path / "old.pt")
    assert loaded.threshold == 0.3 and loaded.preprocess == PreprocessConfig(image_size=96, crop="fan")
    assert loaded.normalization == custom.normalization and loaded.classes == ("benign", "malignant")
    with pytest.raises(ValueError, match="threshold"):
        card.replace(threshold=1.5)
    with pytest.raises(ValueError, match="no 'classes' entry"):
        ModelCard.from_dict({"model_name": "x", "in_chans": 1, "normalization": [0.5, 0.5]}, source="x.pt")


def test_a_model_of_a_removed_input_mode_is_refused_by_name_and_cards_written_without_it_still_load(tmp_path):
    from liverus.data import PreprocessConfig
    from liverus.utils import atomic_torch_save

    model = build_model("baseline_efficientnet_lite0")
    pre = PreprocessConfig(image_size=64, crop="roi")
    card = default_card(model).replace(preprocess=pre, version="0.1.0", provenance={"git_commit": "abc1234"})
    save_model(model, tmp_path / "m.pt", card)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    # Cards written while the two-view CNN mode existed hold data.context_margin; off, the file loads as before.
    payload["card"]["preprocess"]["context_margin"] = 0.0
    atomic_torch_save(payload, tmp_path / "off.pt")
    assert load_model(tmp_path / "off.pt")[1] == card and load_card(tmp_path / "off.pt") == card
    # On: the model is refused by name, with the liverus that trained it, before its rebuild fails on views=2.
    payload["card"]["preprocess"]["context_margin"] = 1.5
    payload["card"]["views"] = payload["build_kwargs"]["views"] = 2
    atomic_torch_save(payload, tmp_path / "two_view.pt")
    match = r"two_view\.pt: .* data\.context_margin: 1\.5 .* removed .* \(version 0\.1\.0, git commit abc1234\)"
    for read in (load_model, load_card):
        with pytest.raises(ValueError, match=match):
            read(tmp_path / "two_view.pt")


def test_onnx_export_matches_eager(tmp_path, custom):
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 1, FAST, FAST)
    path = tmp_path / "m.onnx"
    # The exporter liverus export uses (torch.export-based); the batch axis stays dynamic.
    program = torch.onnx.export(
        custom,
        (x,),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, FAST, FAST)
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = custom(x).numpy()
    assert got.shape == (3, 2) and abs(got - want).max() < 1e-4


def test_torch_export_matches_eager(custom):
    x = torch.randn(1, 1, FAST, FAST)
    exported = torch.export.export(custom, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), custom(x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_on_cpu(custom):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = custom(torch.randn(2, 1, FAST, FAST))
    assert out.shape == (2, 2) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: SEBlock(100, 16), "divisible"),
        (lambda: ChannelAttention(30, 4), "divisible"),
        (lambda: SpatialAttention(4), "odd"),
        (lambda: build_model("resnet_9000"), "unknown model"),
        (lambda: build_model("custom_resnet50", se_reduction=3), "divisible"),
        (lambda: build_model("custom_resnet50", num_classes=1), "num_classes"),
        (lambda: build_model("custom_resnet50", in_chans=5), "in_chans"),
        (lambda: build_model("branch_a_resnet50", branches="b"), "fixed"),
        (lambda: build_model("baseline_resnet50", bogus=1), "bad arguments"),
        (lambda: ParallelAttentionHead(2048, branches="c"), "branches"),
    ],
)
def test_bad_arguments_raise_value_error(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_weights_file_of_other_architecture_is_rejected(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*not a torchvision ResNet-50"):
        build_model("custom_resnet50", weights=path)


def test_weights_file_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth"):
        build_model("baseline_resnet50", weights=path)


def test_local_torchvision_weights_file_loads_and_stem_is_summed(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    ref = resnet50()
    path = tmp_path / "r50.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("custom_resnet50", weights=path)
    assert model.weights_info.kind == "file" and len(model.weights_info.sha256) == 64
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
    # A gray image repeated to RGB gives the same stem response as the summed kernel.
    g = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(model.backbone.conv1(g), ref.conv1(g.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_imagenet_download_failure_explains_how_to_pass_a_file(tmp_path, monkeypatch):
    import torchvision.models.resnet as tv_resnet

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # Route torchvision's real ResNet50_Weights.get_state_dict through an offline hub loader.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert tv_resnet.ResNet50_Weights.IMAGENET1K_V2.url.startswith("https://")
    with pytest.raises(RuntimeError, match="weights=PATH"):
        build_model("custom_resnet50", weights="imagenet")


def test_offline_imagenet_efficientnet_loads_pretrained():
    model = build_model("custom_efficientnet_lite0", weights="imagenet")
    assert model.weights_info.kind == "imagenet"
    # Pretrained BatchNorm statistics are not the defaults of a fresh layer.
    assert not torch.allclose(model.backbone.net._bn0.running_var, torch.ones_like(model.backbone.net._bn0.running_var))


def test_an_ensemble_file_stores_its_shared_frozen_backbone_once_and_earlier_files_still_load(tmp_path):
    from liverus.models import EnsembleClassifier

    members = [build_model("radiomics_svm_efficientnet_lite0", weights="imagenet", in_chans=2) for _ in range(3)]
    with torch.no_grad():  # members differ where fitted members differ: their classifier parameters
        for i, m in enumerate(members):
            for name, buf in m.named_buffers():
                if not name.startswith("backbone") and buf.is_floating_point() and buf.numel():
                    buf.add_(i)
    ens = EnsembleClassifier(members)
    save_model(members[0], tmp_path / "one.pt")
    save_model(ens, tmp_path / "ens.pt")
    one, three = (tmp_path / "one.pt").stat().st_size, (tmp_path / "ens.pt").stat().st_size
    assert three < 1.2 * one  # the backbone once, not three times
    loaded, _ = load_model(tmp_path / "ens.pt")
    want = ens.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, want[key]), key
    # The members' own parameters stay their own after loading (no storage shared between modules).
    first, second = (dict(m.named_buffers()) for m in loaded.members[:2])
    differing = [k for k in first if not k.startswith("backbone") and first[k].is_floating_point() and first[k].numel()]
    assert differing and not any(torch.equal(first[k], second[k]) for k in differing)
    p0 = next(loaded.members[0].backbone.parameters())
    assert p0.data_ptr() != next(loaded.members[1].backbone.parameters()).data_ptr()
    # A file written before (every member's backbone stored in full) loads to the same model.
    old = torch.load(tmp_path / "ens.pt", weights_only=True)
    old["model"] = {k: v.clone() for k, v in old["model"].items()}
    torch.save(old, tmp_path / "old.pt")
    assert (tmp_path / "old.pt").stat().st_size > 2.5 * one
    again, _ = load_model(tmp_path / "old.pt")
    for key, value in again.state_dict().items():
        assert torch.equal(value, want[key]), key
