"""Data loader vs training step: is the loader ever the bottleneck?

Prints, in one run: images/s of the loader with a cold cache (decode + fan detection + resize), with a warm cache
(augmentation only, the steady state of every epoch after the first), and images/s of one training step of the chosen
model; the ratio warm-loader / step must stay well above 1.

    python benchmarks/loader_throughput.py                       # ../shared/data/aul, 224 px, custom_resnet50
    python benchmarks/loader_throughput.py --data PATH --size 160 --model custom_efficientnet_lite0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from liverus.data import CaseCache, PreprocessConfig, UltrasoundDataset, build_train_transform, load_cases, select_task
from liverus.models import build_model

AUL = Path(__file__).resolve().parents[2] / "shared" / "data" / "aul"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(AUL))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=128, help="images to load")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--model", default="custom_resnet50")
    args = ap.parse_args()

    cases, classes = select_task(load_cases(args.data), "binary")
    cases = cases[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        cache = CaseCache(PreprocessConfig(image_size=args.size), Path(tmp))
        ds = UltrasoundDataset(cases, classes, cache, build_train_transform("strong"))
        loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers)
        t = time.perf_counter()
        for _ in loader:
            pass
        cold = len(ds) / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in loader:
            pass
        warm = len(ds) / (time.perf_counter() - t)

    model = build_model(args.model).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(args.batch, 1, args.size, args.size)
    y = torch.randint(0, 2, (args.batch,))
    for i in range(3):
        if i == 1:
            t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step = 2 * args.batch / (time.perf_counter() - t)
    print(f"{len(cases)} images at {args.size} px, {args.workers} worker(s), torch threads {torch.get_num_threads()}")
    print(f"loader, cold cache (decode + fan crop + resize + augment): {cold:8.1f} img/s")
    print(f"loader, warm cache (augment only, epochs 2+):              {warm:8.1f} img/s")
    print(f"training step, {args.model}, batch {args.batch}:           {step:8.1f} img/s")
    print(f"warm loader / step = {warm / step:.1f}x (above 1: the loader is not the bottleneck)")


if __name__ == "__main__":
    main()
