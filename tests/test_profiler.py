"""The study wall-time profiler (liverus.utils.STAGES, benchmarks/study_time.py) and the per-image memo that cuts it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from liverus.utils import DigestMemo, StageTimer


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


def test_digest_memo_keys_on_content_dtype_shape_and_salt_and_stays_bounded():
    a = np.arange(6, dtype=np.uint8)
    key = DigestMemo.key
    assert key(a) == key(a.copy())
    assert len({key(a), key(a.astype(np.int16)), key(a.reshape(2, 3)), key(a, salt=b"bf16"), key(a[::-1])}) == 5
    memo = DigestMemo(max_items=2)
    for i in range(3):
        memo.put(key(a + i), np.full(2, i))
    assert memo.get(key(a)) is None and len(memo) == 2  # the least recently used went
    got = memo.get(key(a + 1))
    got[:] = 99  # a copy: the memo's value is not changed through it
    np.testing.assert_array_equal(memo.get(key(a + 1)), [1, 1])
    assert (memo.hits, memo.misses) == (2, 1)
    with pytest.raises(ValueError, match="max_items"):
        DigestMemo(max_items=0)
