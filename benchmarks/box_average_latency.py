"""What averaging over boxes (``--box-average K``) costs per prediction, against the box alone, in one run.

One image with a lesion box goes through ``Predictor.prepare`` and ``Predictor.probabilities`` (what ``predict`` and
``serve`` do per image: the fan detection, GrabCut inside each box, the crops, the radiomics and the forward passes,
with the per-image feature memos emptied before each call, as for an image not seen before) with K = 1 and the other
K given; the median over ``--reps`` and the ratio to K = 1 are printed. Give the trained recommended model
(``liverus train --config configs/aul_final.yaml``), whose GrabCut and radiomics are what K multiplies; the image is a
phantom frame unless ``--image`` and ``--box`` are given.

    python benchmarks/box_average_latency.py --model runs/aul_final/model.pt --k 4 8 --reps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from liverus.data import read_image  # noqa: E402
from liverus.data.phantom import render_phantom  # noqa: E402
from liverus.data.radiomics import FEATURE_MEMO  # noqa: E402
from liverus.engine.predictor import Predictor  # noqa: E402
from liverus.models.features import DEEP_FEATURE_MEMO  # noqa: E402


def _image_and_box(args: argparse.Namespace) -> tuple[np.ndarray, tuple[float, ...]]:
    if args.image:
        if not args.box:
            raise SystemExit("--image needs --box x0,y0,x1,y1")
        return read_image(args.image), tuple(float(v) for v in args.box.split(","))
    img, lesion, *_ = render_phantom(np.random.default_rng(0), "malignant", 512)
    ys, xs = np.nonzero(lesion)
    return img.astype(np.float32) / 255.0, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model.pt of a lesion model (crop roi or mask channel)")
    ap.add_argument("--image", help="an ultrasound image (default: a 512 px phantom frame)")
    ap.add_argument("--box", help="with --image: the lesion box x0,y0,x1,y1 in pixels")
    ap.add_argument("--k", type=int, nargs="+", default=[4], help="box counts to compare with 1 (default 4)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    image, box = _image_and_box(args)
    medians, probs = {}, {}
    for k in [1, *args.k]:
        pred = Predictor.from_path(args.model, box_average=k)
        if not pred.needs_lesion:
            raise SystemExit(f"{args.model} does not read a lesion box; box averaging does not apply")
        probs[k] = float(pred.probabilities([pred.prepare(image, box=box)])[0])  # warm-up (and the answer)
        times = []
        for _ in range(args.reps):
            # A new image each time: the per-image feature memos (which a server keeps) would answer a repeat.
            DEEP_FEATURE_MEMO.clear(), FEATURE_MEMO.clear()
            t = time.perf_counter()
            pred.probabilities([pred.prepare(image, box=box)])
            times.append((time.perf_counter() - t) * 1000)
        medians[k] = statistics.median(times)
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}")
    print(f"{args.model}: one {image.shape[1]}x{image.shape[0]} image, box {box}, median of {args.reps}")
    for k, ms in medians.items():
        print(f"box_average {k:2d}: {ms:7.1f} ms/image  x{ms / medians[1]:.2f} of one box  p(malignant) {probs[k]:.4f}")


if __name__ == "__main__":
    main()
