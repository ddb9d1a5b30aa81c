"""What each explanation costs per image, against the answer alone, in one run.

One image with a lesion box (for lesion models) goes through ``Predictor.prepare`` and ``Predictor.probabilities``
(the answer), then each map the model has (``Predictor.heatmap_figure``: occlusion of the first view, of every view,
Grad-CAM) and, for feature models, the contributions with their chart. The per-image feature memos are emptied
before each call, as for an image not seen before. Medians over ``--reps``; the ratio is to the answer. Give the
trained recommended model (``liverus train --config configs/aul_final.yaml``) for the figures docs/explanation.md
quotes; the image is a phantom frame unless ``--image`` and ``--box`` are given.

    python benchmarks/explanation_latency.py --model runs/aul_final/model.pt --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from box_average_latency import _image_and_box  # noqa: E402
from liverus.data.radiomics import FEATURE_MEMO  # noqa: E402
from liverus.engine.predictor import Predictor  # noqa: E402
from liverus.models.features import DEEP_FEATURE_MEMO  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model.pt")
    ap.add_argument("--image", help="an ultrasound image (default: a 512 px phantom frame)")
    ap.add_argument("--box", help="with --image: the lesion box x0,y0,x1,y1 in pixels")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    image, box = _image_and_box(args)
    pred = Predictor.from_path(args.model)
    box = box if pred.needs_lesion else None
    pre = pred.prepare(image, box=box)
    p = float(pred.probabilities([pre])[0])

    def answer() -> None:
        pred.probabilities([pred.prepare(image, box=box)])

    jobs = {"answer (prepare + probability)": answer}
    for method in pred.methods:
        jobs[f"map: {method}"] = lambda m=method: pred.heatmap_figure(pre, image, p, m)
    if pred.has_contributions:
        jobs["contributions + chart"] = lambda: pred.contributions_chart(pre, p)
    medians = {}
    for name, job in jobs.items():
        job()  # warm-up
        times = []
        for _ in range(args.reps):
            DEEP_FEATURE_MEMO.clear(), FEATURE_MEMO.clear()
            t = time.perf_counter()
            job()
            times.append(time.perf_counter() - t)
        medians[name] = statistics.median(times)
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}")
    print(f"{args.model}: one {image.shape[1]}x{image.shape[0]} image, median of {args.reps}, default map "
          f"{pred.default_method}")  # fmt: skip
    base = medians["answer (prepare + probability)"]
    for name, s in medians.items():
        print(f"{name:34s} {s:7.2f} s  x{s / base:.1f} of the answer")


if __name__ == "__main__":
    main()
