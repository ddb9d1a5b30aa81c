"""Inference speed in one run: batch-1 latency and batch-32 images/s for PyTorch fp32, PyTorch bf16 (channels-last),
ONNX Runtime fp32 and ONNX Runtime int8, for ``custom_resnet50`` at 224 px (random weights: speed does not depend on
them) and, when given, a trained model such as the recommended one (``--recommended runs/aul_final/model.pt``).

Targets for custom_resnet50 at 224 px on 2 cores (issue 16): >= 60 images/s batched, <= 50 ms at batch 1.
The int8 graph is calibrated on phantom images here (its AUC check is for real exports, not for this timing).

python benchmarks/inference_throughput.py [--recommended runs/aul_final/model.pt] [--reps 10]
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
from liverus.data import make_phantom_dataset  # noqa: E402
from liverus.data.radiomics import FEATURE_MEMO  # noqa: E402
from liverus.engine.forward import probabilities  # noqa: E402
from liverus.export import export_onnx  # noqa: E402
from liverus.models import is_feature_model, load_model  # noqa: E402
from liverus.models.features import DEEP_FEATURE_MEMO  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernel choice)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _torch_runner(model, card, x: torch.Tensor, bf16: bool):
    if bf16:
        model = model.to(memory_format=torch.channels_last)

    def run():
        FEATURE_MEMO.clear()  # every timed call measures the features afresh, as for a new image
        DEEP_FEATURE_MEMO.clear()
        with torch.inference_mode():
            probabilities(model, x, card, amp=torch.bfloat16 if bf16 else None, channels_last=bf16)

    return run


def _ort_runner(path: Path, x: np.ndarray):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda: sess.run(["probabilities"], {"image": x})


def measure(model_file: Path, onnx_files: dict[str, Path], reps: int) -> dict[str, tuple[float, float]]:
    """``{backend: (batch-1 latency ms, batch-32 images/s)}``."""
    model, card = load_model(model_file)
    size = card.preprocess.image_size
    chans = 2 if card.preprocess.lesion_channel else 1
    rng = np.random.default_rng(0)
    # Every view (lesion crop, and the whole scan of two-view models) as the predictor stacks them.
    pixels = rng.integers(0, 256, (32, chans * card.views, size, size), dtype=np.uint8)
    if chans == 2:  # a lesion in the middle of every view
        pixels[:, 1::2] = 0
        pixels[:, 1::2, size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 255
    out = {}
    for name, bf16 in (("pytorch fp32", False), ("pytorch bf16", True)):
        b1 = _time(_torch_runner(model, card, torch.from_numpy(pixels[:1]), bf16), reps)
        b32 = _time(_torch_runner(model, card, torch.from_numpy(pixels), bf16), max(2, reps // 4))
        out[name] = (1000 * b1, 32 / b32)
    for name, path in onnx_files.items():
        x = pixels.astype(np.float32) / 255.0
        b1 = _time(_ort_runner(path, x[:1]), reps)
        b32 = _time(_ort_runner(path, x), max(2, reps // 4))
        out[name] = (1000 * b1, 32 / b32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recommended", help="a trained model.pt to measure as well (e.g. the final recipe's)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"{'model':34s} {'backend':16s} {'batch-1 ms':>11s} {'batch-32 img/s':>15s}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        phantom = tmp / "phantom"
        make_phantom_dataset(phantom, n_patients=24, size=256, seed=0)
        models = {"custom_resnet50 @224": untrained_model_file(tmp / "model.pt", "custom_resnet50", 224)}
        if args.recommended:
            models[f"{Path(args.recommended).parent.name} (recommended)"] = Path(args.recommended)
        for label, path in models.items():
            onnx_files = {}
            card = load_model(path)[1]
            if not is_feature_model(card.model_name):
                stem = tmp / label.split()[0]
                export_onnx(path, stem.with_suffix(".fp32.onnx"))
                onnx_files["onnxruntime fp32"] = stem.with_suffix(".fp32.onnx")
                export_onnx(path, stem.with_suffix(".int8.onnx"), quantize="int8", calibration=phantom,
                            holdout=phantom, max_auc_change=1.0)  # fmt: skip
                onnx_files["onnxruntime int8"] = stem.with_suffix(".int8.onnx")
            res = measure(path, onnx_files, args.reps)
            for backend, (ms, ips) in res.items():
                print(f"{label:34s} {backend:16s} {ms:11.1f} {ips:15.1f}")
            if not onnx_files:
                print(f"{label:34s} {'onnxruntime':16s} {'n/a: radiomics run in scikit-image, not in a graph':>27s}")
            if label.startswith("custom_resnet50"):
                best_ms = min(ms for ms, _ in res.values())
                best_ips = max(ips for _, ips in res.values())
                met_ms = "met" if best_ms <= 50 else "not met"
                met_ips = "met" if best_ips >= 60 else "not met"
                print(f"  targets: batch-1 <= 50 ms (best {best_ms:.1f}: {met_ms}), "
                      f"batched >= 60 img/s (best {best_ips:.1f}: {met_ips})")  # fmt: skip


if __name__ == "__main__":
    main()
