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
