"""``liverus train``, ``cv``, ``compare`` and ``compare-studies``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from liverus.utils import require_torch

__all__ = ["register", "add_config_args", "config_from_args"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults are used for missing keys")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--data", help="data source (folder, manifest CSV or AUL folder); same as --set data.source=...")
    p.add_argument(
        "--model", help="model name (liverus models), or FAMILY_timm_<timm model>; same as --set model.name=..."
    )
    p.add_argument(
        "--weights",
        help="'imagenet' or a backbone weights file (.pth; .safetensors for timm backbones); same as "
        "--set model.weights=...",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files and list them instead of stopping")


def config_from_args(args: argparse.Namespace):
    """The config file with ``--set`` and the shorthand options applied. Raises: ConfigError."""
    from liverus.training import load_config

    overrides = list(args.set)
    if getattr(args, "data", None):
        overrides.append(f"data.source={Path(args.data).resolve()}")
    if getattr(args, "model", None):
        overrides.append(f"model.name={args.model}")
    if getattr(args, "weights", None):
        w = args.weights if args.weights == "imagenet" else str(Path(args.weights).resolve())
        overrides.append(f"model.weights={w}")
    if getattr(args, "skip_bad", False):
        overrides.append("data.skip_bad=true")
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    require_torch("liverus train")  # before the imports below, which would first miss lesser packages
    from liverus.evaluation.report import report_for_run
    from liverus.training import train
    from liverus.training.distributed import is_main_process

    cfg = config_from_args(args)
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if not is_main_process():  # under torchrun every rank gets the result; rank 0 alone reports
        return 0
    summary = {"run": result.run_dir, "model": result.model_path, "best_epoch": result.best_epoch}
    if cfg.data.task == "binary":
        summary |= {"val_auc": _rounded(result.val_auc), "threshold": _rounded(result.threshold)}
    else:  # one malignancy threshold means nothing for class probabilities: the macro figures instead
        macro = (result.val_metrics or {}).get("macro", {})
        summary |= {
            "val_macro_auc": _rounded(macro.get("auc")),
            "val_macro_average_precision": _rounded(macro.get("pr_auc")),
        }
    # Strict JSON: a figure without validation images is null, not NaN.
    print(json.dumps(summary, indent=2, allow_nan=False))
    path = report_for_run(Path(result.run_dir))
    if path:
        print(f"report: {path}")
    else:
        print(
            "no report: the run held out no images (data.val_fraction: 0). Estimate the model with `liverus cv` or "
            "`liverus compare`, or score labelled images with `liverus evaluate`"
        )
    return 0


def _rounded(value: float | None) -> float | None:
    """``value`` to 4 decimals; None where it is missing or not a number (no validation images)."""
    return round(value, 4) if value is not None and math.isfinite(value) else None


def cmd_study(args: argparse.Namespace) -> int:
    require_torch(f"liverus {args.command}")
    from liverus.training.experiments import run_study

    cfg = config_from_args(args)
    models = args.models if args.command == "compare" else [cfg.model.name]
    summary = run_study(
        cfg,
        args.out,
        models=models,
        k=args.folds,
        resume=args.resume,
        baseline=getattr(args, "baseline", None),
        subgroup=args.subgroup,
        repeats=args.repeats,
        overwrite=args.overwrite,
    )
    print(summary["text"])
    print(f"report: {summary['report']}")
    return 0


def cmd_compare_studies(args: argparse.Namespace) -> int:
    from liverus.evaluation.study import compare_studies
    from liverus.utils import atomic_write_json

    if args.json and Path(args.json).exists():
        raise ValueError(f"{args.json} already exists; choose another file")
    result = compare_studies(
        args.members, baseline=args.baseline, n_boot=args.bootstrap, figures=args.figures, fuse=args.fuse
    )
    if args.json:
        atomic_write_json(args.json, result)
    print(result["text"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model (torchrun-compatible)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="move an existing --out aside and start again")
    p.set_defaults(func=cmd_train)

    for name, helptext in (
        ("cv", "stratified group k-fold cross-validation of one model"),
        ("compare", "baseline vs other models on the same folds and seeds"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config_args(p)
        p.add_argument("--out", required=True, help="study folder (resumable)")
        p.add_argument("--folds", type=int, default=5)
        p.add_argument("--resume", action="store_true", help="continue an interrupted study (finished runs are kept)")
        p.add_argument("--overwrite", action="store_true", help="move an existing --out aside and start again")
        p.add_argument(
            "--repeats", type=int, default=1, help="repeated CV: new folds and training seed per repeat (default 1)"
        )
        p.add_argument("--subgroup", action="append", default=[], help="manifest column for subgroup metrics")
        if name == "compare":
            p.add_argument("--models", nargs="+", default=["baseline_resnet50", "custom_resnet50"])
            p.add_argument("--baseline", default=None, help="reference model for DeLong tests (default: first)")
        p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "compare-studies", help="paired DeLong/McNemar tests of models from different studies on the same cases"
    )
    p.add_argument("members", nargs="+", help="LABEL=STUDY_DIR:MODEL (e.g. fan=studies/aul_fan:custom_resnet50)")
    p.add_argument("--baseline", help="reference label (default: the first member)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--json", help="also write the result to this (new) file")
    p.add_argument("--figures", help="folder for roc.png and reliability.png")
    p.add_argument(
        "--fuse",
        action="append",
        default=[],
        metavar="LABEL=A+B",
        help="add a late fusion: the mean of members A's and B's probabilities per case (repeatable)",
    )
    p.set_defaults(func=cmd_compare_studies)
