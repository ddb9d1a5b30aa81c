"""How fast the recommended model answers and trains, against the targets, with the previous feature arithmetic in
the same run for the ratio.

Parts (each prints its figures; ``--parts`` chooses):

* ``features``: the frozen deep features of N real lesion crops (the lesion crop with its turns, zooms and mirrors and
  the whole-scan view: the recommended model's twelve backbone passes per image), computed as before (one batch of
  64 per pass, NCHW) and as now (every pass of every crop in one list, channels-last chunks whose size is timed on
  this CPU), memos emptied; ms per image, the ratio and the largest difference in probability.
* ``answer``: image + box -> probability with the model's four-box averaging in a warm process (what the server does
  per request; ``Predictor.prepare`` + ``probabilities``), feature memos emptied before each call: the median over
  ``--reps`` images, with the stages (GrabCut and crops, radiomics, deep features) and the same with the previous
  arithmetic (and with ``--onnx X.onnx`` the features of the ONNX export); target <= 0.5 s.
* ``predict``: ``liverus predict IMAGE --box ...`` as a new process, wall time including start-up and loading the
  model (median of ``--reps``); target <= 4 s. ``folder``: ``liverus predict`` on a manifest of 100 images with their
  boxes, wall time; target <= 60 s.
* ``train``: ``liverus train --config configs/aul_final.yaml`` from scratch (new run folder, new cache), wall time;
  target <= 8 minutes. ``resume``: the same command into a second run folder that shares the first one's cache
  (``data.cache_dir``): decoded images and features are found again. ``study``: the recipe's 3 x 5 nested study as
  docs/results.md measures it (``liverus compare --config configs/aul_final.yaml --repeats 3 --set
  data.box_jitter=0.2 --set data.test_lesion_from=box``: the five-member ensemble inside each fold, scored from
  jittered boxes), from scratch; target <= 45 minutes. ``--keep DIR`` keeps the study's folder.

    python benchmarks/recipe_speed.py --model runs/aul_final/model.pt --data ../shared/data/aul
    python benchmarks/recipe_speed.py --model runs/aul_final/model.pt --parts train resume
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, liverus_cli  # noqa: E402
from liverus.data import load_cases, read_image, read_mask, select_task  # noqa: E402
from liverus.data.radiomics import FEATURE_MEMO  # noqa: E402
from liverus.engine.predictor import Predictor  # noqa: E402
from liverus.models.features import DEEP_FEATURE_MEMO, LesionFeatureModel  # noqa: E402
from liverus.utils import STAGES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("features", "answer", "predict", "folder", "train", "resume", "study")


class previous_arithmetic:  # noqa: N801 - used as a context manager
    """The deep features as liverus computed them before channels-last chunks: each pass (crop, turns, zooms,
    mirrors) one batch through the backbone in NCHW."""

    def __enter__(self):
        self._saved = LesionFeatureModel._batched_mean
        LesionFeatureModel._batched_mean = LesionFeatureModel._transformed_mean
        return self

    def __exit__(self, *exc):
        LesionFeatureModel._batched_mean = self._saved


def _contiguous(model: torch.nn.Module) -> None:
    """Back to NCHW weights (the previous layout), so the previous arithmetic is timed as it ran."""
    for m in model.modules():
        if getattr(m, "_channels_last", False):
            m.to(memory_format=torch.contiguous_format)
            m._channels_last = False


def _clear() -> None:
    DEEP_FEATURE_MEMO.clear(), FEATURE_MEMO.clear()


def _cases(data: Path, n: int) -> list:
    cases, _ = select_task(load_cases(data), "binary")
    cases = [c for c in cases if c.mask]
    return cases[:: max(1, len(cases) // n)][:n]


def _box(case) -> tuple[float, ...]:
    ys, xs = np.nonzero(read_mask(case.mask))
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def part_features(pred: Predictor, cases: list, out: dict) -> None:
    pre = [pred.prepare(read_image(c.path), lesion=read_mask(c.mask)) for c in cases]  # masks: no GrabCut here
    timings, probs, busy = {}, {}, {}
    for name in ("previous", "now"):
        _clear()
        if name == "previous":
            _contiguous(pred.model)
        with previous_arithmetic() if name == "previous" else _nothing():
            pred.probabilities(pre[:2])  # warm-up (kernels)
            _clear()
            t0, c0 = time.perf_counter(), time.process_time()
            probs[name] = pred.probabilities(pre)
            timings[name] = time.perf_counter() - t0
            busy[name] = (time.process_time() - c0) / timings[name]  # CPU seconds per second: cores kept busy
    n = len(cases)
    diff = float(np.abs(probs["now"] - probs["previous"]).max())
    out["features"] = {"images": n, "previous_ms": 1000 * timings["previous"] / n, "now_ms": 1000 * timings["now"] / n,
                       "ratio": timings["previous"] / timings["now"], "max_probability_difference": diff,
                       "cores_busy_previous": busy["previous"], "cores_busy_now": busy["now"]}  # fmt: skip
    print(f"probability of {n} AUL images from masks (radiomics + 12 backbone passes each, 5 members): previous "
          f"{out['features']['previous_ms']:.0f} ms/image, now {out['features']['now_ms']:.0f} ms/image "
          f"(x{out['features']['ratio']:.2f}); largest probability difference {diff:.1e}; cores busy "
          f"{busy['previous']:.2f} / {busy['now']:.2f} of {torch.get_num_threads()}")  # fmt: skip


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def part_answer(pred: Predictor, cases: list, reps: int, out: dict, onnx: Path | None = None) -> None:
    results = {}
    for name in ("previous", "now"):
        if name == "previous":
            _contiguous(pred.model)
        times, stages = [], []
        with previous_arithmetic() if name == "previous" else _nothing():
            for i, case in enumerate(cases[: reps + 1]):
                image, box = read_image(case.path), _box(case)
                _clear()
                STAGES.start()
                t0 = time.perf_counter()
                with STAGES.stage("preprocessing (fan, GrabCut in each box, crops)"):
                    pre = pred.prepare(image, box=box)
                with STAGES.stage("features and classifier"):
                    pred.probabilities([pre])
                elapsed = time.perf_counter() - t0
                report = STAGES.report()
                if i:  # the first is a warm-up
                    times.append(elapsed)
                    stages.append(report["stages"])
        results[name] = statistics.median(times)
        if name == "now":
            for stage in stages[0]:
                print(f"  {stage}: median {1000 * statistics.median(s[stage] for s in stages):.0f} ms")
    if onnx is not None:  # the ONNX export (liverus export) through ONNX Runtime, same images
        ox, times = Predictor.from_path(onnx), []
        for case in cases[1 : reps + 1]:
            pre = ox.prepare(read_image(case.path), box=_box(case))
            t0 = time.perf_counter()
            ox.probabilities([pre])
            times.append(time.perf_counter() - t0)
        results["onnx_features"] = statistics.median(times)
        print(f"  ONNX Runtime, features and classifier: median {1000 * results['onnx_features']:.0f} ms")
    out["answer"] = {"reps": reps, "previous_s": results["previous"], "now_s": results["now"],
                     "ratio": results["previous"] / results["now"], **results}  # fmt: skip
    print(f"image + box -> probability, {pred.preprocess_cfg.box_average}-box averaging, warm process, median of "
          f"{reps} AUL images: previous {results['previous']:.2f} s, now {results['now']:.2f} s "
          f"(x{results['previous'] / results['now']:.2f}); target <= 0.5 s")  # fmt: skip


def part_predict(model: Path, cases: list, reps: int, out: dict, tmp: Path) -> None:
    times = []
    for i, case in enumerate(cases[:reps]):
        box = ",".join(f"{v:g}" for v in _box(case))
        times.append(
            liverus_cli("predict", case.path, "--model", str(model), "--box", box, "--out", str(tmp / f"p{i}.csv"))
        )
    out["predict"] = {"reps": len(times), "median_s": statistics.median(times), "max_s": max(times)}
    median = statistics.median(times)
    print(f"liverus predict IMAGE --box (new process: start-up, loading, 4 boxes): median {median:.2f} s, slowest "
          f"{max(times):.2f} s over {len(times)} images; target <= 4 s")  # fmt: skip


def part_folder(model: Path, cases: list, out: dict, tmp: Path, onnx: Path | None = None) -> None:
    manifest = tmp / "hundred.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "box"])
        for case in cases:
            writer.writerow([case.path, ",".join(f"{v:g}" for v in _box(case))])
    out["folder"] = {"images": len(cases)}
    for name, path in (("pytorch", model), ("onnx", onnx)):
        if path is None:
            continue
        wall = liverus_cli("predict", str(manifest), "--model", str(path), "--out", str(tmp / f"hundred_{name}.csv"))
        out["folder"][f"{name}_wall_s"] = wall
        print(f"liverus predict on a manifest of {len(cases)} images with boxes ({name}): {wall:.1f} s wall; target "
              "<= 60 s")  # fmt: skip


def part_train(data: Path, out: dict, tmp: Path, name: str, cache: Path) -> None:
    wall = liverus_cli("train", "--config", str(ROOT / "configs" / "aul_final.yaml"), "--data", str(data), "--out",
                str(tmp / name), "--set", f"data.cache_dir={cache}")  # fmt: skip
    out[name] = {"wall_s": wall}
    what = "from scratch (new cache)" if name == "train" else "again, into a new run folder sharing that cache"
    print(f"liverus train --config configs/aul_final.yaml {what}: {wall / 60:.1f} min"
          + ("; target <= 8 min" if name == "train" else ""))  # fmt: skip


def part_study(data: Path, out: dict, folder: Path) -> None:
    config = str(ROOT / "configs" / "aul_final.yaml")
    wall = liverus_cli("compare", "--config", config, "--data", str(data), "--repeats", "3",
                       "--set", "data.box_jitter=0.2", "--set", "data.test_lesion_from=box", "--models",
                       "radiomics_svm_efficientnet_lite0", "--out", str(folder))  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    out["study"] = {"wall_s": wall, "summary": str(folder / "summary.json")}
    print(f"3 x 5 nested study of the recipe (liverus compare, from scratch): {wall / 60:.1f} min; target <= 45 min")
    print(f"  its result: {json.dumps(summary.get('models', summary), default=str)[:400]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the recommended model (configs/aul_final.yaml)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "aul", help="AUL (with masks)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=["features", "answer", "predict", "folder"])
    ap.add_argument("--onnx", type=Path, help="the model's ONNX export (liverus export): its answer is timed too")
    ap.add_argument("--images", type=int, default=64, help="images for the features part (default 64)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--keep", type=Path, help="with the study part: the study folder to write and keep")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "features" in args.parts or "answer" in args.parts:
            pred = Predictor.from_path(args.model)
            if "features" in args.parts:
                part_features(pred, _cases(args.data, args.images), out)
            if "answer" in args.parts:
                cases = _cases(args.data, args.reps + 1)
                part_answer(Predictor.from_path(args.model), cases, args.reps, out, args.onnx)
        if "predict" in args.parts:
            part_predict(args.model, _cases(args.data, args.reps), args.reps, out, tmp)
        if "folder" in args.parts:
            part_folder(args.model, _cases(args.data, 100), out, tmp, args.onnx)
        for name in ("train", "resume"):
            if name in args.parts:
                part_train(args.data, out, tmp, name, tmp / "shared_cache")
        if "study" in args.parts:
            part_study(args.data, out, args.keep or tmp / "study")


if __name__ == "__main__":
    main()
