"""``liverus segment train`` and ``liverus segment evaluate``: the lesion segmenter."""

from __future__ import annotations

import argparse
import json

from liverus.cli.train_commands import add_config_args, config_from_args

__all__ = ["register"]


def cmd_segment_train(args: argparse.Namespace) -> int:
    from liverus.training.segmentation import train_segmenter

    result = train_segmenter(config_from_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
    keys = ("run_dir", "model_path", "best_epoch", "val_dice", "wall_time_s")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


def cmd_segment_cv(args: argparse.Namespace) -> int:
    from liverus.training.segmentation import segment_cross_validation

    res = segment_cross_validation(
        config_from_args(args), args.out, folds=args.folds, resume=args.resume, overwrite=args.overwrite
    )
    m = res["metrics"]
    for group, v in [("all", m["all"]), *m["by_class"].items()]:
        print(f"{group}: out-of-fold Dice {v['dice']['mean']:.3f}, detected {v['detected']['mean']:.3f} "
              f"(n={v['dice']['n']})")  # fmt: skip
    print(f"manifest with predicted masks: {res['manifest']} ({len(res['not_detected'])} images without a lesion)")
    return 0


def cmd_segment_evaluate(args: argparse.Namespace) -> int:
    from liverus.evaluation.segmentation import evaluate_segmenter

    out = evaluate_segmenter(args.checkpoint, args.data, args.out, n_boot=args.bootstrap, skip_bad=args.skip_bad)
    print(out["text"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("segment", help="lesion segmentation: train and evaluate a segmenter")
    ssub = seg.add_subparsers(dest="segment_command", required=True)
    p = ssub.add_parser("train", help="train a lesion segmenter on the lesion masks (resumable run folder)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="move an existing run aside and start again")
    p.set_defaults(func=cmd_segment_train)
    p = ssub.add_parser("cv", help="out-of-fold predicted masks for every image (a manifest for cv/compare)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="folder for the fold runs, masks/ and manifest.csv")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_segment_cv)
    p = ssub.add_parser("evaluate", help="Dice, IoU, HD95 and detection per class, with intervals and a report")
    p.add_argument("checkpoint", help="model.pt of a segment run")
    p.add_argument("--data", required=True, help="labelled folder or manifest with lesion masks")
    p.add_argument("--out", required=True)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=cmd_segment_evaluate)
