"""``liverus evaluate``."""

from __future__ import annotations

import argparse

from liverus.data.preprocess import LESION_SOURCES

__all__ = ["register"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from liverus.evaluation.report import evaluate_checkpoint

    out = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.out,
        subgroup=args.subgroup,
        skip_bad=args.skip_bad,
        n_boot=args.bootstrap,
        lesion_from=args.lesion_from,
        box_jitter=args.box_jitter,
        box_loosen=args.box_loosen,
        box_average=args.box_average,
        map_faithfulness=args.map_faithfulness,
    )
    print(out["text"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on labelled data, with intervals and a report")
    p.add_argument("checkpoint", help="model.pt of a run")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and report.html")
    p.add_argument("--subgroup", action="append", default=[])
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument(
        "--lesion-from",
        choices=LESION_SOURCES,
        help="lesion models: use the expert masks, or boxes around them as a user draws (default: as trained)",
    )
    p.add_argument("--box-jitter", type=float, help="with --lesion-from box: edge jitter, fraction of the box size")
    p.add_argument("--box-loosen", type=float, help="with --lesion-from box: margin added, fraction of the box size")
    p.add_argument(
        "--box-average",
        type=int,
        metavar="K",
        help="with boxes: average each probability over K boxes around the one drawn (default: the model's, "
        "set by data.box_average when it was trained)",
    )
    p.add_argument(
        "--map-faithfulness",
        type=int,
        default=0,
        metavar="N",
        help="also check the model's maps against the model on N cases (deletion and insertion against random maps; "
        "about a minute per case for the recommended model on 2 cores; default 0: skipped)",
    )
    p.set_defaults(func=cmd_evaluate)
