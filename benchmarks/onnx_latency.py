"""PyTorch vs ONNX Runtime latency per image (batch 1, CPU), in one run, on an exported untrained model.

python benchmarks/onnx_latency.py --model custom_resnet50 --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, untrained_model_file  # noqa: E402
from liverus.engine.predictor import Predictor  # noqa: E402
from liverus.export import export_onnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="custom_resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pt_file = untrained_model_file(Path(tmp) / "model.pt", args.model, args.size)
        info = export_onnx(pt_file, Path(tmp) / "model.onnx")
        pt, ox = Predictor.from_path(pt_file), Predictor.from_path(Path(tmp) / "model.onnx")
        img = np.random.default_rng(0).uniform(0, 1, (args.size, args.size)).astype(np.float32)
        pre = [pt.prepare(img)]
        res = {}
        for name, pred in (("pytorch", pt), ("onnxruntime", ox)):
            pred.probabilities(pre)
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                pred.probabilities(pre)
                times.append((time.perf_counter() - t) * 1000)
            res[name] = statistics.median(times)
        diff = abs(float(pt.probabilities(pre)[0]) - float(ox.probabilities(pre)[0]))
    print(f"CPU: {cpu_name()}")
    print(f"{args.model} at {args.size} px, batch 1, torch threads {torch.get_num_threads()}")
    print(f"PyTorch eager:  {res['pytorch']:.1f} ms/image (median of {args.reps})")
    print(f"ONNX Runtime:   {res['onnxruntime']:.1f} ms/image")
    print(
        f"ratio PyTorch / ONNX Runtime: {res['pytorch'] / res['onnxruntime']:.2f}; |p diff| {diff:.1e}; "
        f"export check max diff {info['max_abs_diff_vs_pytorch']:.1e}"
    )


if __name__ == "__main__":
    main()
