"""``liverus demo`` (``make demo``): the main job of the README.

On the built-in synthetic phantom (or a folder/manifest given with ``--data``), train the ResNet-50 baseline and the
parallel-attention ``CustomModel`` on the same group-aware split, with the same seed, and print their held-out metrics
side by side (AUC with DeLong interval, sensitivity and specificity at the validation-chosen threshold, DeLong's paired
test). Sized to finish in under 10 minutes on a 2-core CPU: 96 px images, 8 epochs, random initialisation (ImageNet
weights cannot be downloaded offline; pass ``--set model.weights=...`` style configs to ``liverus compare`` for more).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["run_demo", "DEMO_OVERRIDES"]

DEMO_OVERRIDES = [
    "data.image_size=96",
    "data.phantom_patients=110",
    "data.phantom_size=192",
    "data.augment=light",
    "optim.epochs=8",
    "optim.batch_size=16",
    "optim.lr=1e-3",
    "optim.backbone_lr_mult=1.0",
    "optim.warmup_epochs=1",
    "runtime.tensorboard=true",
    # Two threads on every machine: the order in which threads add up gradients moves the last bits, and over eight
    # epochs those decide the printed figures. With the lock file's packages one CPU kind then prints one result
    # (other CPU kinds run other kernels, and print other figures).
    "runtime.threads=2",
]


def run_demo(args: argparse.Namespace) -> int:
    from liverus.training import load_config
    from liverus.training.experiments import run_holdout_comparison

    overrides = list(DEMO_OVERRIDES)
    if args.data:
        overrides.append(f"data.source={Path(args.data).resolve()}")
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    cfg = load_config(None, overrides)
    t0 = time.time()
    summary = run_holdout_comparison(cfg, args.out, models=["baseline_resnet50", "custom_resnet50"], resume=args.resume)
    print()
    print("Held-out test split (threshold chosen on the validation split); DeLong p vs the baseline:")
    print(summary["text"])
    print(f"\nreport: {summary['report']}\nwall time: {time.time() - t0:.0f} s")
    return 0
