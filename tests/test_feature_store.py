"""Frozen deep features computed fast (channels-last chunks, every turn / zoom / mirror in one list) and once (a
content-keyed store in the cache folder that members, folds, repeats and resumed runs share)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liverus.data import clear_cache
from liverus.data.radiomics import FEATURE_MEMO
from liverus.models import build_model, load_model
from liverus.models.backbones import FEATURE_CHUNKS, build_backbone, pooled_features
from liverus.models.features import DEEP_FEATURE_MEMO, LesionFeatureModel, feature_store
from liverus.training import apply_overrides, load_config, train
from liverus.utils import DigestMemo


@pytest.fixture(autouse=True)
def _fresh_memos():
    DEEP_FEATURE_MEMO.clear(), FEATURE_MEMO.clear()
    yield
    DEEP_FEATURE_MEMO.clear(), FEATURE_MEMO.clear()


def _imagenet_lite0() -> torch.nn.Module:
    # The offline ImageNet weights: a randomly initialised backbone's pooled features are ~1e-8, too small to compare.
    return build_backbone("efficientnet_lite0", weights="imagenet", in_chans=1).eval()


def test_pooled_features_do_not_depend_on_the_chunk_and_the_first_long_call_picks_one():
    import liverus.models.backbones as backbones

    backbone = _imagenet_lite0()
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randn(70, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = backbone(images[:6]).mean(dim=(2, 3))  # the plain batched NCHW pass
    backbones._chosen_chunk.clear()
    one = pooled_features(backbone, images, chunk=1)
    odd = pooled_features(backbone, images, chunk=7)  # a last chunk of another size
    assert not backbones._chosen_chunk
    auto = pooled_features(backbone, images)  # >= 64 images: times each chunk size on its own images
    assert list(backbones._chosen_chunk.values())[0] in FEATURE_CHUNKS
    assert one.shape == (70, backbone.spec.out_channels) and one.dtype == torch.float32
    assert one.abs().max() > 0.1  # features with magnitude, so the comparisons can fail
    rounding = 2e-5 * float(one.abs().max())  # oneDNN's kernels for other batch sizes sum in another order
    torch.testing.assert_close(odd, one, rtol=0, atol=rounding)
    torch.testing.assert_close(auto, one, rtol=0, atol=rounding)
    torch.testing.assert_close(one[:6], reference, rtol=0, atol=rounding)
    # Channels-last changes the layout of the weights, not their values.
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with pytest.raises(ValueError, match="chunk"):
        pooled_features(backbone, images[:2], chunk=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pooled_features(backbone, images[0])


def test_the_batched_pass_gives_the_features_of_the_pass_with_gradients():
    # Without gradients every turn, zoom and mirror runs in one list of chunks; Grad-CAM's path runs them one by one.
    model = LesionFeatureModel("svm", _imagenet_lite0(), flip_features=True, rotate_features=10, zoom_features=0.1)
    image = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    transforms = model.lesion_transforms()
    assert len(transforms) == 4
    with torch.no_grad():
        fast = model._batched_mean(image, transforms)
        slow = model._transformed_mean(image, transforms)
        plain = model._transformed_mean(image, ())
    assert (fast - plain).abs().max() > 0.01 * plain.abs().max()  # the turns and zooms do change the features
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4 * float(slow.abs().max()))


def test_digest_memo_store_saves_only_new_results_loads_them_elsewhere_and_compacts(tmp_path):
    store = tmp_path / "cache" / "features" / "deep"
    memo = DigestMemo()
    memo.put(b"before attach---", np.ones(3))  # computed before the store was attached: not saved
    memo.attach(store)
    assert memo.save() is None  # nothing new
    values = {bytes([i]) * 16: np.arange(i, i + (3 if i % 2 else 5), dtype=np.float32) for i in range(6)}
    for k, v in values.items():
        memo.put(k, v)
    first = memo.save()
    assert first is not None and first.parent == store and first.suffix == ".npz"
    assert memo.save() is None
    # Another process (a new memo) finds every saved result, with its width and dtype, and not the unsaved one.
    other = DigestMemo()
    other.attach(store)
    for k, v in values.items():
        got = other.get(k)
        np.testing.assert_array_equal(got, v)
        assert got.dtype == v.dtype
    assert other.get(b"before attach---") is None
    # A damaged shard is skipped (its results are computed again), not an error.
    (store / "damaged.npz").write_bytes(b"not a zip file")
    third = DigestMemo()
    third.attach(store)
    assert len(third) == len(values)
    (store / "damaged.npz").unlink()
    # Many small saves are rewritten as one file holding everything.
    third.MAX_SHARDS = 3
    for i in range(4):
        third.put(bytes([100 + i]) * 16, np.full(3, i, dtype=np.float32))
        third.save()
    shards = sorted(store.glob("*.npz"))
    assert len(shards) <= 3
    last = DigestMemo()
    last.attach(store)
    assert len(last) == len(values) + 4
    np.testing.assert_array_equal(last.get(bytes([103]) * 16), np.full(3, 3, dtype=np.float32))
    # Detaching saves what is pending; clear() forgets without saving.
    last.put(b"pending---------", np.zeros(2))
    last.attach(None)
    assert DigestMemo().attach(store) is None
    reread = DigestMemo()
    reread.attach(store)
    assert reread.get(b"pending---------") is not None
    # `liverus data clear-cache` removes the store with the decoded images.
    files, n_bytes = clear_cache(tmp_path / "cache")
    assert files >= 1 and n_bytes > 0 and not (tmp_path / "cache").exists()


def test_feature_store_is_found_again_by_content_only(tmp_path):
    model = LesionFeatureModel("svm", _imagenet_lite0(), flip_features=True).eval()
    pixels = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(2))
    with feature_store(tmp_path), torch.no_grad():
        first = model.deep_features(pixels)
    assert list((tmp_path / "features").glob("deep-*/*.npz"))
    DEEP_FEATURE_MEMO.clear()
    calls = []
    real = model._batched_mean
    model._batched_mean = lambda image, t: calls.append(image.shape[0]) or real(image, t)
    with feature_store(tmp_path), torch.no_grad():
        again = model.deep_features(pixels)  # from the store
        assert calls == []
        model.deep_features(pixels.flip(2))  # other pixels: computed
        assert calls == [2]
        with torch.no_grad():
            next(model.backbone.parameters()).mul_(2)
        model.deep_features(pixels)  # other weights: computed
        assert calls == [2, 2]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert DEEP_FEATURE_MEMO.store is None  # detached when the block ends


@pytest.mark.slow
def test_a_second_run_on_the_same_cache_computes_no_feature_and_fits_the_same_model(tmp_path, monkeypatch):
    import liverus.data.radiomics as radiomics
    import liverus.models.features as features

    cfg = apply_overrides(load_config(), [
        "data.image_size=64", "data.crop=roi", "data.lesion_channel=true", "data.phantom_patients=16",
        "data.phantom_size=96", "data.augment=none", "model.name=radiomics_svm_efficientnet_lite0",
        "model.flip_features=true", f"data.cache_dir={tmp_path / 'shared_cache'}", "runtime.progress=false",
        "runtime.tensorboard=false",
    ])  # fmt: skip
    passes, measured = [], []
    real_pooled, real_features = features.pooled_features, radiomics.lesion_features
    monkeypatch.setattr(features, "pooled_features", lambda b, x, **k: passes.append(len(x)) or real_pooled(b, x, **k))
    monkeypatch.setattr(radiomics, "lesion_features", lambda *a, **k: measured.append(1) or real_features(*a, **k))
    train(cfg, tmp_path / "first")
    assert passes and measured
    assert list((tmp_path / "shared_cache" / "features").glob("deep-*/*.npz"))
    first, _ = load_model(tmp_path / "first" / "model.pt")
    DEEP_FEATURE_MEMO.clear(), FEATURE_MEMO.clear()  # as a new process would start
    passes.clear(), measured.clear()
    cfg.data.phantom_patients = 16  # the same phantom, written again into the second run's folder
    train(cfg, tmp_path / "second")
    second, _ = load_model(tmp_path / "second" / "model.pt")
    # Fitting read every feature from the store (the second phantom's files are byte-identical); scoring the
    # validation part is served by the same memo.
    assert passes == [] and measured == []
    for name, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert isinstance(build_model("radiomics_svm_efficientnet_lite0", in_chans=2), LesionFeatureModel)


def test_a_whole_scan_view_shared_by_averaged_boxes_goes_through_the_backbone_once():
    model = LesionFeatureModel("svm", _imagenet_lite0(), views=2).eval()
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)).repeat(4, 1, 1, 1)
    x[:, 0] += torch.arange(4.0).view(4, 1, 1) / 10  # four boxes: four lesion crops, one whole scan
    calls = []
    real = model._batched_mean
    model._batched_mean = lambda image, t: calls.append(image.shape[0]) or real(image, t)
    with torch.no_grad():
        deep = model.deep_features(x)
    assert calls == [4, 1]
    width = model.backbone.spec.out_channels
    assert torch.equal(deep[1:, width:], deep[:1, width:].expand(3, -1))
    assert not torch.equal(deep[1, :width], deep[0, :width])


def test_features_first_computed_in_inference_mode_leave_the_model_usable_for_gradcam():
    from liverus.engine.heatmaps import gradcam_heatmap

    model = LesionFeatureModel("logistic", _imagenet_lite0(), flip_features=True)
    rng = np.random.default_rng(0)  # deep features that reach the decision, so Grad-CAM has a gradient
    model.load_fitted({"coef": np.ones(len(model.coef)), "pca_components": rng.normal(size=model.pca_components.shape)})
    model.eval()
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(4))
    x[:, 1] = 0
    x[:, 1, 16:48, 16:48] = 1
    with torch.inference_mode():  # as predict and the server answer first
        model(x)
    assert model.backbone._channels_last
    heat = gradcam_heatmap(model, x)  # the map after the answer needs gradients through the same weights
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all() and heat.max() > 0


@pytest.mark.parametrize(("angle", "scale"), [(10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1)])
def test_turns_and_zooms_equal_torchvisions_affine(angle, scale):
    import torchvision.transforms.v2.functional as TF

    from liverus.models.features import _turned

    image = torch.randn(3, 1, 40, 56, generator=torch.Generator().manual_seed(5))
    want = TF.affine(image, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                     interpolation=TF.InterpolationMode.BILINEAR)  # fmt: skip
    assert torch.equal(_turned(image, angle, scale), want)


def test_a_store_larger_than_memory_is_not_compacted_into_what_memory_still_holds(tmp_path):
    # Rewriting the shards as one file must not drop results that the LRU bound pushed out of memory.
    store = tmp_path / "features" / "deep"
    memo = DigestMemo(max_items=3)
    memo.MAX_SHARDS = 2
    memo.attach(store)
    for i in range(6):  # six results, memory keeps three, one shard per save
        memo.put(bytes([i]) * 16, np.full(2, i, dtype=np.float32))
        memo.save()
    reread = DigestMemo()  # no bound: sees every stored result
    reread.attach(store)
    assert len(reread) == 6
    np.testing.assert_array_equal(reread.get(bytes([0]) * 16), np.zeros(2, dtype=np.float32))
