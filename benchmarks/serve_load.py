"""Load on ``liverus serve``: 8 concurrent clients x 200 requests of real AUL images, in one run.

Starts ``liverus serve`` on a free loopback port with an untrained model of the recommended recipe's architecture
(speed does not depend on the weights; ``--model``/``--size``/``--crop`` for others), sends real liver ultrasound
images from ``../shared/data/aul`` (with the lesion box from the expert mask for lesion-ROI models), and prints, for the
sequential and the concurrent phase: requests, errors, median and p95 latency and requests/s. The concurrent answers
are compared with the sequential ones for the same images (they must be identical). Loopback only; it stops by itself.

    python benchmarks/serve_load.py                 # custom_efficientnet_lite0, 160 px, lesion ROI
    python benchmarks/serve_load.py --heatmap       # with a Grad-CAM per request

Data: Xu et al., AUL (Annotated Ultrasound Liver images), https://doi.org/10.5281/zenodo.7272660, CC BY 4.0.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, serving, untrained_model_file  # noqa: E402

AUL = Path(__file__).resolve().parents[2] / "shared" / "data" / "aul"


def _requests(n: int, with_box: bool) -> list[tuple[str, bytes, str | None]]:
    with open(AUL / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] in ("benign", "malignant")]
    out = []
    for r in rows[:n]:
        box = None
        if with_box:
            ys, xs = np.nonzero(cv2.imread(str(AUL / r["mass_mask"]), cv2.IMREAD_GRAYSCALE))
            box = f"{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}"
        out.append((r["path"], (AUL / r["path"]).read_bytes(), box))
    return out


def _p95(ms: list[float]) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="custom_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--crop", default="roi", choices=["roi", "fan", "none"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=200)
    ap.add_argument("--heatmap", action="store_true")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's dynamic batching (1: none)")
    args = ap.parse_args()
    if not (AUL / "manifest.csv").is_file():
        sys.exit(f"the AUL data is expected at {AUL}")
    total = args.clients * args.per_client
    images = _requests(100, args.crop == "roi")
    with tempfile.TemporaryDirectory() as tmp:
        model = untrained_model_file(Path(tmp) / "model.pt", args.model, args.size, crop=args.crop)
        with serving(model, "--max-batch", str(args.max_batch)) as base:
            url = f"{base}/api/predict?heatmap={'true' if args.heatmap else 'false'}"

            def one(client: httpx.Client, i: int) -> tuple[float, float | None, int]:
                name, data, box = images[i % len(images)]
                t = time.perf_counter()
                r = client.post(url, files={"file": (name, data)}, data={"box": box} if box else {}, timeout=300)
                ms = (time.perf_counter() - t) * 1000
                return ms, (r.json()["probability_malignant"] if r.status_code == 200 else None), r.status_code

            with httpx.Client() as c:
                one(c, 0)  # warm-up
                t0 = time.perf_counter()
                seq = [one(c, i) for i in range(len(images))]
                seq_wall = time.perf_counter() - t0
            reference = {i: p for i, (_, p, _) in enumerate(seq)}

            def client_run(k: int) -> list[tuple[int, tuple]]:
                with httpx.Client() as c:
                    return [(i, one(c, i)) for i in range(k * args.per_client, (k + 1) * args.per_client)]

            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(args.clients) as pool:
                conc = [x for part in pool.map(client_run, range(args.clients)) for x in part]
            conc_wall = time.perf_counter() - t0
    errors = sum(1 for _, (_, p, st) in conc if st != 200) + sum(1 for _, p, st in seq if st != 200)
    # Batched and single forward passes may differ in the last float bits; the JSON rounds to 6 decimals.
    mismatch = sum(1 for i, (_, p, _) in conc if p is None or abs(p - reference[i % len(images)]) > 1e-5)
    print(
        f"CPU: {cpu_name()}; {args.model} at {args.size} px, crop {args.crop}, heatmap {args.heatmap}, "
        f"server --max-batch {args.max_batch}"
    )
    seq_ms = [m for m, _, _ in seq]
    conc_ms = [m for _, (m, _, _) in conc]
    print(
        f"sequential, 1 client: {len(seq)} requests, median {statistics.median(seq_ms):.0f} ms, "
        f"p95 {_p95(seq_ms):.0f} ms, {len(seq) / seq_wall:.2f} requests/s"
    )
    print(
        f"concurrent, {args.clients} clients x {args.per_client}: {total} requests, median "
        f"{statistics.median(conc_ms):.0f} ms, p95 {_p95(conc_ms):.0f} ms, {total / conc_wall:.2f} requests/s "
        f"(x{(total / conc_wall) / (len(seq) / seq_wall):.2f} the sequential rate)"
    )
    print(f"errors: {errors}; answers differing from the sequential ones by more than 1e-5: {mismatch}")
    sys.exit(1 if errors or mismatch else 0)


if __name__ == "__main__":
    main()
