"""The ``liverus`` command line.

Subcommands: ``models``, ``data`` (``audit``, ``phantom``, ``split``), ``train``, ``cv``, ``compare``, ``evaluate``,
``explain``, ``predict``, ``serve``, ``export`` and ``demo``. Heavy imports happen inside each command so that
``liverus --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--model", help="model name; same as --set model.name=...")
    p.add_argument("--weights", help="'imagenet' or a backbone state-dict file; same as --set model.weights=...")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files and list them instead of stopping")


def _config(args: argparse.Namespace):
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


# ---------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from liverus.models import MODELS, build_model, count_flops, count_parameters, list_models

    print(f"{'name':32s} {'params':>12s} {'GMACs@' + str(args.size):>10s}  description")
    for name in list_models():
        model = build_model(name)
        print(
            f"{name:32s} {count_parameters(model):12,d} {count_flops(model, args.size):10.2f}  "
            f"{MODELS[name].description}"
        )
    print(
        "\naliases: custom -> custom_resnet50, baseline -> baseline_resnet50. GMACs: multiply-accumulates of one "
        "forward pass (torchvision's 'GFLOPS' convention); 1-channel input."
    )
    return 0


def cmd_data_audit(args: argparse.Namespace) -> int:
    from liverus.data import audit_cases, format_audit, load_cases

    report = audit_cases(load_cases(args.path))
    print(format_audit(report))
    if args.json:
        from liverus.utils import atomic_write_json

        atomic_write_json(args.json, report)
        print(f"full report: {args.json}")
    return 0


def cmd_data_phantom(args: argparse.Namespace) -> int:
    from liverus.data import make_phantom_dataset

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty (use --overwrite)", file=sys.stderr)
        return 2
    cases = make_phantom_dataset(
        out, n_patients=args.patients, size=args.size, seed=args.seed, include_normal=args.normal
    )
    print(f"wrote {len(cases)} images to {out} (manifest: {out / 'manifest.csv'})")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from liverus.data import kfold_splits, load_cases, save_splits, select_task

    cases, _ = select_task(load_cases(args.path), args.task)
    folds = kfold_splits(cases, args.folds, seed=args.seed)
    save_splits(
        args.out,
        {"folds": folds, "seed": args.seed, "k": args.folds, "source": str(Path(args.path).resolve())},
    )
    for i, f in enumerate(folds):
        print(f"fold {i}: {len(f['train'])} train / {len(f['val'])} val")
    print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from liverus.training import train

    cfg = _config(args)
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if result is None:  # a non-zero DDP rank
        return 0
    print(
        json.dumps(
            {
                "run": result.run_dir,
                "model": result.model_path,
                "best_epoch": result.best_epoch,
                "val_auc": round(result.val_auc, 4),
                "threshold": round(result.threshold, 4),
            },
            indent=2,
        )
    )
    _report_after(Path(result.run_dir), args)
    return 0


def _report_after(run_dir: Path, args: argparse.Namespace) -> None:
    try:
        from liverus.evaluation.report import report_for_run
    except ImportError:  # pragma: no cover
        return
    path = report_for_run(run_dir)
    if path:
        print(f"report: {path}")


def cmd_cv(args: argparse.Namespace) -> int:
    from liverus.training.experiments import run_study

    cfg = _config(args)
    summary = run_study(
        cfg, args.out, models=[cfg.model.name], k=args.folds, resume=args.resume, subgroup=args.subgroup
    )
    print(summary["text"])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from liverus.training.experiments import run_study

    cfg = _config(args)
    summary = run_study(
        cfg,
        args.out,
        models=args.models,
        k=args.folds,
        resume=args.resume,
        baseline=args.baseline,
        subgroup=args.subgroup,
    )
    print(summary["text"])
    return 0


def cmd_compare_studies(args: argparse.Namespace) -> int:
    from liverus.training.experiments import compare_studies
    from liverus.utils import atomic_write_json

    if args.json and Path(args.json).exists():
        raise ValueError(f"{args.json} already exists; choose another file")
    result = compare_studies(args.members, baseline=args.baseline, n_boot=args.bootstrap, figures=args.figures)
    if args.json:
        atomic_write_json(args.json, result)
    print(result["text"])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from liverus.evaluation.report import evaluate_checkpoint

    out = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.out,
        subgroup=args.subgroup,
        skip_bad=args.skip_bad,
        n_boot=args.bootstrap,
    )
    print(out["text"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from liverus.predict import run_predict

    return run_predict(args)


def cmd_explain(args: argparse.Namespace) -> int:
    from liverus.explain import run_explain

    return run_explain(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from liverus.serve.app import run_server

    return run_server(args)


def cmd_export(args: argparse.Namespace) -> int:
    from liverus.export import export_onnx

    info = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from liverus.demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="liverus", description="Benign vs malignant liver lesions on B-mode ultrasound.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list every registered model with parameters and compute")
    p.add_argument("--size", type=int, default=224, help="image size for the MAC count (default 224)")
    p.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("audit", help="counts, sizes, duplicates, missing masks and the shortcut check")
    p.add_argument("path", help="folder, manifest CSV or AUL folder")
    p.add_argument("--json", help="also write the full report as JSON")
    p.set_defaults(func=cmd_data_audit)
    p = data.add_parser("phantom", help="write the synthetic B-mode phantom dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=120)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normal", action="store_true", help="also write normal (lesion-free) images")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_phantom)
    p = data.add_parser("split", help="write stratified group k-fold splits to reuse across runs")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="binary", choices=["binary", "three_class"])
    p.set_defaults(func=cmd_data_split)

    p = sub.add_parser("train", help="train one model (torchrun-compatible)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="move an existing --out aside and start again")
    p.set_defaults(func=cmd_train)

    for name, helptext in (
        ("cv", "stratified group k-fold cross-validation of one model"),
        ("compare", "baseline vs other models on the same folds and seeds"),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_config_args(p)
        p.add_argument("--out", required=True, help="study folder (resumable)")
        p.add_argument("--folds", type=int, default=5)
        p.add_argument("--resume", action="store_true", help="continue an interrupted study (finished runs are kept)")
        p.add_argument("--subgroup", action="append", default=[], help="manifest column for subgroup metrics")
        if name == "compare":
            p.add_argument("--models", nargs="+", default=["baseline_resnet50", "custom_resnet50"])
            p.add_argument("--baseline", default=None, help="reference model for DeLong tests (default: first)")
        p.set_defaults(func=cmd_cv if name == "cv" else cmd_compare)

    p = sub.add_parser(
        "compare-studies", help="paired DeLong/McNemar tests of models from different studies on the same cases"
    )
    p.add_argument("members", nargs="+", help="LABEL=STUDY_DIR:MODEL (e.g. fan=studies/aul_fan:custom_resnet50)")
    p.add_argument("--baseline", help="reference label (default: the first member)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--json", help="also write the result to this (new) file")
    p.add_argument("--figures", help="folder for roc.png and reliability.png")
    p.set_defaults(func=cmd_compare_studies)

    p = sub.add_parser("evaluate", help="evaluate a trained model on labelled data, with intervals and a report")
    p.add_argument("checkpoint", help="model.pt of a run")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and report.html")
    p.add_argument("--subgroup", action="append", default=[])
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="probability of malignancy for images, folders or DICOM")
    p.add_argument("inputs", nargs="+", help="image files, folders or DICOM files")
    p.add_argument("--model", required=True, help="model.pt of a run, or an exported .onnx file")
    p.add_argument("--out", required=True, help="output .csv or .json")
    p.add_argument("--heatmaps", help="folder for one Grad-CAM overlay PNG per image")
    p.add_argument("--mask", help="lesion mask (single input) for crop=roi models")
    p.add_argument("--box", help="lesion box x0,y0,x1,y1 in pixels (single input) for crop=roi models")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-bad", action="store_true", help="list unreadable files and go on (they are always listed)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM and spatial-attention heatmaps overlaid on images")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--model", required=True, help="model.pt of a run")
    p.add_argument("--out", required=True, help="folder for the PNG overlays")
    p.add_argument("--method", choices=["gradcam", "attention", "both"], default="both")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("serve", help="web page and REST API for radiologists (research use only)")
    p.add_argument("--model", required=True, help="model.pt of a run, or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a trained model to ONNX (with preprocessing and threshold metadata)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job: train the baseline and the attention model, print their metrics")
    p.add_argument("--data", help="data folder / manifest (default: the built-in synthetic phantom)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from liverus.data import DataError
    from liverus.training.config import ConfigError
    from liverus.training.trainer import RunExistsError

    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, RunExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
