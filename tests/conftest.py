from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

AUL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aul"


@pytest.fixture(scope="session")
def aul_root() -> Path:
    if not (AUL / "manifest.csv").is_file():
        pytest.fail(f"the AUL data is expected at {AUL} (beside the checkout); see README 'Data'")
    return AUL


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from liverus.data import make_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(out, n_patients=40, size=128, seed=1)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Tests never share or pollute the user's preprocessing cache.
    monkeypatch.setenv("LIVERUS_CACHE", str(tmp_path / "cache"))


# A small trained model shared by the heatmap, predict, export and serve tests (trained once per session).
DEPLOY_TINY = [
    "data.image_size=64",
    "data.phantom_patients=16",
    "data.phantom_size=96",
    "data.augment=none",
    "model.name=custom_efficientnet_lite0",
    "optim.batch_size=8",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    from liverus.training import apply_overrides, load_config, train

    out = tmp_path_factory.mktemp("deploy") / "run"
    train(apply_overrides(load_config(), DEPLOY_TINY), out)
    return out


@pytest.fixture(scope="session")
def roi_run(tmp_path_factory):
    """A lesion-ROI model: it needs a lesion box or mask at inference."""
    from liverus.training import apply_overrides, load_config, train

    out = tmp_path_factory.mktemp("deploy_roi") / "run"
    train(apply_overrides(load_config(), [*DEPLOY_TINY, "data.crop=roi"]), out)
    return out


SEGMENT_TINY = [
    "data.image_size=96",
    "data.crop=fan",
    "data.phantom_patients=20",
    "data.phantom_size=128",
    "data.augment=none",
    "model.name=unet_efficientnet_lite0",
    "model.weights=imagenet",
    "optim.epochs=10",
    "optim.batch_size=8",
    "optim.lr=0.003",
    "optim.backbone_lr_mult=1.0",
    "optim.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


@pytest.fixture(scope="session")
def segmenter_run(tmp_path_factory):
    """A lesion segmenter trained on the phantom (whose lesion masks are known)."""
    from liverus.training import apply_overrides, load_config
    from liverus.training.segmentation import train_segmenter

    out = tmp_path_factory.mktemp("segment") / "run"
    train_segmenter(apply_overrides(load_config(), SEGMENT_TINY), out)
    return out


@pytest.fixture(scope="session")
def images(run):
    from liverus.data import load_cases

    return [c.path for c in load_cases(run / "phantom")][:6]


@pytest.fixture(scope="session")
def onnx_file(run, tmp_path_factory):
    from liverus.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    info = export_onnx(run / "model.pt", out)
    assert info["max_abs_diff_vs_pytorch"] < 1e-4
    return out


# Fixtures that train a model or start a browser make a test slow; aul_root makes it read the real data. Marking by
# fixture keeps the marks true as tests change; tests that train inline carry @pytest.mark.slow themselves.
SLOW_FIXTURES = {
    "run",
    "roi_run",
    "radiomics_run",
    "images",
    "onnx_file",
    "cnn_onnx",
    "feature_onnx",
    "tiny_run",
    "trained",
    "client",
    "roi_client",
    "server",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if "aul_root" in names:
            item.add_marker(pytest.mark.realdata)
