"""The study wall-time profiler (liverus.utils.STAGES, benchmarks/study_time.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from liverus.utils import StageTimer


def test_nested_stages_are_exclusive_and_add_up_to_the_wall_time():
    timer = StageTimer()
    with timer.stage("ignored while disabled"):
        pass
    timer.start()
    with timer.stage("outer"):
        time.sleep(0.05)
        with timer.stage("inner"):
            time.sleep(0.1)
    time.sleep(0.02)
    rep = timer.report()
    assert set(rep["stages"]) == {"outer", "inner"}
    assert rep["stages"]["inner"] == pytest.approx(0.1, abs=0.03)
    assert rep["stages"]["outer"] == pytest.approx(0.05, abs=0.03)  # without the inner stage's time
    assert sum(rep["stages"].values()) + rep["other_s"] == pytest.approx(rep["wall_s"], rel=1e-9)
    assert rep["other_s"] >= 0.015


@pytest.mark.slow
def test_study_profile_shares_add_up_and_name_the_stages(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from liverus.training import load_config
    from study_time import profile_study

    cfg = load_config(None, ["data.image_size=64", "data.crop=roi", "data.lesion_channel=true",
                             "data.phantom_patients=30", "data.phantom_size=96", "data.augment=none",
                             "runtime.progress=false", "runtime.tensorboard=false"])  # fmt: skip
    rep = profile_study(cfg, tmp_path / "study", "radiomics_svm", folds=2, repeats=1)
    stages = rep["stages"]
    for name in ("training steps", "scoring (validation, test)", "decoding and preprocessing", "reports and figures"):
        assert stages.get(name, 0) > 0, name
    assert sum(stages.values()) + rep["other_s"] == pytest.approx(rep["wall_s"], rel=1e-9)
    assert 0 <= rep["other_s"] < rep["wall_s"]
