"""``liverus models`` and ``liverus data audit | phantom | split``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def cmd_models(args: argparse.Namespace) -> int:
    from liverus.models import (
        MODELS,
        build_model,
        count_flops,
        count_parameters,
        is_feature_model,
        is_fitted_model,
        list_models,
    )

    print(f"{'name':32s} {'params':>12s} {'GMACs@' + str(args.size):>10s}  description")
    for name in list_models():
        model = build_model(name, in_chans=2) if is_feature_model(name) else build_model(name)
        if is_fitted_model(name):  # fitted, not trained: count the frozen backbone (radiomics run on the CPU)
            net = model.backbone
            macs = f"{count_flops(net, args.size):10.2f}" if net is not None else f"{'-':>10s}"
        else:
            macs = f"{count_flops(model, args.size):10.2f}"
        print(f"{name:32s} {count_parameters(model):12,d} {macs}  {MODELS[name].description}")
    print(
        "\naliases: custom -> custom_resnet50, baseline -> baseline_resnet50. GMACs: multiply-accumulates of one "
        "forward pass (torchvision's 'GFLOPS' convention); 1-channel input.\n"
        "Every family also runs on any timm CNN or hybrid: FAMILY_timm_<timm model>, e.g. custom_timm_convnext_tiny, "
        "baseline_timm_resnet50.a1_in1k, radiomics_svm_timm_efficientnet_b3 (--weights imagenet downloads timm's "
        "pretrained weights; --weights FILE.safetensors loads your own)."
    )
    return 0


def cmd_data_audit(args: argparse.Namespace) -> int:
    from liverus.data import audit_cases, format_audit, load_cases
    from liverus.utils import atomic_write_json

    if args.json and Path(args.json).exists():
        raise ValueError(f"{args.json} already exists; choose another --json file (reports are never overwritten)")
    ignored: list[tuple[str, str]] = []
    report = audit_cases(load_cases(args.path, ignored=ignored), ignored=ignored)
    print(format_audit(report))
    if args.json:
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
    from liverus.data import apply_grouping, kfold_splits, load_cases, save_splits, select_task

    cases, _ = select_task(load_cases(args.path), args.task)
    cases, conflicts = apply_grouping(cases, args.group_by)
    for c in conflicts:
        print(
            f"warning: near duplicates with different labels: {c['a']} ({c['label_a']}) and {c['b']} ({c['label_b']})"
        )
    folds = kfold_splits(cases, args.folds, seed=args.seed)
    save_splits(
        args.out,
        {"folds": folds, "seed": args.seed, "k": args.folds, "source": str(Path(args.path).resolve())},
    )
    for i, f in enumerate(folds):
        print(f"fold {i}: {len(f['train'])} train / {len(f['val'])} val")
    print(f"wrote {args.out}")
    return 0


def cmd_data_clear_cache(args: argparse.Namespace) -> int:
    from liverus.data import clear_cache

    target = Path(args.path).expanduser()
    if not target.is_dir():
        raise ValueError(f"{target} is not a folder")
    files, n_bytes = clear_cache(target)
    print(f"removed {files} cached image file(s), {n_bytes / 2**20:.1f} MB, under {target}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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
    p = data.add_parser(
        "clear-cache", help="remove decoded-image caches (a run's or study's cache/, or a cache folder itself)"
    )
    p.add_argument(
        "path", help="run or study folder (its cache/ folders), $LIVERUS_CACHE, or ~/.cache/liverus (liverus 0.1)"
    )
    p.set_defaults(func=cmd_data_clear_cache)
    p = data.add_parser("split", help="write stratified group k-fold splits to reuse across runs")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    # Checked by liverus.data.select_task (its error lists the tasks), so the list lives in one place.
    p.add_argument("--task", default="binary", help="binary (default) or three_class")
    p.add_argument(
        "--group-by",
        default="source",
        help="source (the data's own groups, default) or near_duplicates (also merge exact and near-duplicate images)",
    )
    p.set_defaults(func=cmd_data_split)
