"""liverus on a GPU: the CNNs' training throughput and the recommended recipe's training time, in one run.

Parts (``--parts`` chooses; each prints its figures and the GPU it ran on):

* ``step``: images/s of a training step on one fixed batch already on the GPU (the data loader not timed), a plain
  fp32 loop against liverus's default step there (``runtime.precision=auto`` and ``runtime.channels_last=auto``
  resolve to bf16 autocast and channels-last on a bf16 GPU), with the peak GPU memory, for the seed's CustomModel,
  its ResNet-50 baseline and the EfficientNet-Lite0 CustomModel.
* ``epoch``: ``liverus train`` of the seed's CustomModel (random init: no download) on AUL's whole scans for
  ``--epochs`` epochs with ``--workers`` loader processes: the trainer's own images/s and seconds per epoch (from
  metrics.csv), i.e. what a user's run reaches with decoding, augmentation and validation included.
* ``recipe``: ``liverus train --config configs/aul_final.yaml`` from scratch (new run folder, new cache), wall time;
  then again into a second run folder sharing its cache (``data.cache_dir``).

    python benchmarks/gpu_speed.py --data ../shared/data/aul
    python benchmarks/gpu_speed.py --data ../shared/data/aul --parts step --batch 128
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import liverus_cli  # noqa: E402
from liverus.engine.runtime import resolve_channels_last, resolve_precision  # noqa: E402
from liverus.models import build_model  # noqa: E402
from train_throughput import liverus_step_fn, measure, plain_step_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("step", "epoch", "recipe")
STEP_MODELS = ("custom_resnet50", "baseline_resnet50", "custom_efficientnet_lite0")


def part_step(size: int, batch: int, steps: int, out: dict) -> None:
    device = torch.device("cuda")
    amp = resolve_precision("auto", device)
    channels_last = resolve_channels_last("auto", device, amp)
    print(f"liverus's default step on this GPU: precision {amp or 'fp32'}, channels_last {channels_last}")
    rows = []
    for name in STEP_MODELS:
        torch.manual_seed(0)
        plain_model = build_model(name).to(device).train()
        opt = torch.optim.AdamW(plain_model.parameters(), 1e-4)
        plain = measure(plain_step_fn(plain_model, opt), batch, size, steps, 3, "cuda")
        del plain_model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build_model(name).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        fast = measure(liverus_step_fn(model, opt, amp, channels_last), batch, size, steps, 3, "cuda")
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        del model, opt
        torch.cuda.empty_cache()
        rows.append({"model": name, "size": size, "batch": batch, "plain_fp32_img_s": round(plain, 1),
                     "liverus_img_s": round(fast, 1), "speedup": round(fast / plain, 2),
                     "peak_gpu_gib": round(peak_gib, 2)})  # fmt: skip
        print(f"{name:26s} {size} px, batch {batch}: plain fp32 {plain:7.1f} img/s | liverus {fast:7.1f} img/s "
              f"(x{fast / plain:.2f}) | peak GPU memory {peak_gib:.1f} GiB")  # fmt: skip
    out["step"] = rows


def part_epoch(data: Path, tmp: Path, epochs: int, workers: int, out: dict, size: int = 224) -> None:
    run = tmp / "cnn_epoch"
    wall = liverus_cli("train", "--data", str(data), "--out", str(run), "--set", "model.name=custom_resnet50",
                "--set", "data.crop=fan", "--set", f"data.image_size={size}", "--set", "data.augment=strong",
                "--set", "data.group_by=near_duplicates", "--set", f"optim.epochs={epochs}",
                "--set", "optim.batch_size=32", "--set", f"data.num_workers={workers}",
                "--set", "runtime.tensorboard=false", "--set", "runtime.progress=false")  # fmt: skip
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    later = rows[1:] or rows  # the first epoch includes CUDA's and cuDNN's start-up
    ips = statistics.median(float(r["train_images_per_s"]) for r in later)
    epoch_s = statistics.median(float(r["epoch_time_s"]) for r in later)
    out["epoch"] = {"epochs": len(rows), "workers": workers, "train_images_per_s": ips, "epoch_time_s": epoch_s,
                    "wall_s": round(wall, 1)}  # fmt: skip
    print(f"liverus train, seed CustomModel (ResNet-50), AUL whole scans at {size} px, batch 32, {workers} loader "
          f"processes: {ips:.0f} training images/s, {epoch_s:.1f} s per epoch with validation (median of epochs "
          f"2-{len(rows)}); {wall:.0f} s wall for {len(rows)} epochs including start-up")  # fmt: skip


def part_recipe(data: Path, tmp: Path, out: dict) -> None:
    cache = tmp / "recipe_cache"
    for name in ("recipe", "recipe_again"):
        wall = liverus_cli("train", "--config", str(ROOT / "configs" / "aul_final.yaml"), "--data", str(data), "--out",
                    str(tmp / name), "--set", f"data.cache_dir={cache}")  # fmt: skip
        metrics = json.loads((tmp / name / "metrics.json").read_text())
        out[name] = {"wall_s": round(wall, 1), "val_auc": metrics["val"]["metrics"].get("auc")}
        what = "from scratch (new cache)" if name == "recipe" else "again, into a new run folder sharing that cache"
        print(f"liverus train --config configs/aul_final.yaml {what}: {wall / 60:.2f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "aul", help="AUL (with masks)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark measures liverus on a GPU")
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPU cores; {time.strftime('%Y-%m-%d')}")  # fmt: skip
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for part in args.parts:
            if part == "step":
                part_step(args.size, args.batch, args.steps, out)
            elif part == "epoch":
                part_epoch(args.data, tmp, args.epochs, args.workers, out, args.size)
            else:
                part_recipe(args.data, tmp, out)
            if args.json:  # after every part, so that a run stopped at its time limit keeps what it measured
                args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
