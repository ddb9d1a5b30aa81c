"""Where a study's wall time goes: training steps, scoring, decoding, heatmap faithfulness, reports, and the rest
(start-up, run folders, splits), measured in one run of ``liverus compare`` (in-process) on the CPU at hand.

Target (issue 16): a 5-fold x 3-repeat study of one model of the AUL recipe in <= 30 minutes on 2 cores, with
everything but training at most 15% of the wall time.

python benchmarks/study_time.py                                   # the recommended recipe, 5 folds x 3 repeats, AUL
python benchmarks/study_time.py --config configs/aul_roi_effnet.yaml --model custom_efficientnet_lite0 --repeats 1
python benchmarks/study_time.py --phantom                         # a small synthetic study (a minute)
python benchmarks/study_time.py ... --set data.group_by=near_duplicates --out STUDY   # keep the study's results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from liverus.data.radiomics import FEATURE_MEMO  # noqa: E402
from liverus.models.features import DEEP_FEATURE_MEMO  # noqa: E402
from liverus.training import apply_overrides, load_config  # noqa: E402
from liverus.training.experiments import run_study  # noqa: E402
from liverus.utils import STAGES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("training steps",)


def profile_study(cfg, out: Path, model: str, folds: int, repeats: int) -> dict:
    """Run the study with stage timing. Returns: the timer's report (``wall_s``, ``stages``, ``other_s``)."""
    STAGES.start()
    run_study(cfg, out, models=[model], k=folds, repeats=repeats, n_boot=500)
    return STAGES.report()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "aul_radiomics.yaml"))
    ap.add_argument("--model", default="radiomics_svm_efficientnet_lite0")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phantom", action="store_true", help="a small synthetic study instead of the config's data")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", help="keep the study in this (new) folder instead of a temporary one")
    args = ap.parse_args()
    overrides = ["runtime.progress=false", "runtime.tensorboard=false"]
    if args.phantom:
        overrides += [
            "data.source=",
            "data.phantom_patients=40",
            "data.image_size=96",
            "data.phantom_size=128",
            "data.group_by=source",
        ]  # synthetic frames look alike: near-duplicate grouping would merge them
    cfg = load_config(args.config, overrides + args.set)
    if cfg.data.source and not Path(cfg.data.source).is_absolute():
        cfg = apply_overrides(cfg, [f"data.source={(ROOT / cfg.data.source).resolve()}"])
    print(f"CPU: {cpu_name()}; study: {args.model}, {args.folds} folds x {args.repeats} repeats, {args.config}",
          *args.set)  # fmt: skip
    if args.out:
        rep = profile_study(cfg, Path(args.out), args.model, args.folds, args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rep = profile_study(cfg, Path(tmp) / "study", args.model, args.folds, args.repeats)
    wall = rep["wall_s"]
    rows = sorted(rep["stages"].items(), key=lambda kv: -kv[1]) + [("start-up and other", rep["other_s"])]
    print(f"{'stage':32s} {'seconds':>9s} {'share':>7s}")
    for name, sec in rows:
        print(f"{name:32s} {sec:9.1f} {sec / wall:7.1%}")
    print(f"{'wall time':32s} {wall:9.1f} {sum(sec for _, sec in rows) / wall:7.1%}")
    for name, memo in (("radiomics", FEATURE_MEMO), ("frozen deep features", DEEP_FEATURE_MEMO)):
        if memo.hits or memo.misses:
            print(f"{name} remembered: {memo.hits} reused, {memo.misses} computed")
    non_training = 1 - sum(rep["stages"].get(n, 0.0) for n in TRAINING) / wall
    print(f"non-training share {non_training:.1%} (target <= 15%); wall {wall / 60:.1f} min (target <= 30 min for "
          "5 x 3 on the AUL recipe)")  # fmt: skip


if __name__ == "__main__":
    main()
