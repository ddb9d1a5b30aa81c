"""Latency of one prediction over HTTP (median, p95) and throughput with 8 concurrent clients, in one run.

Starts ``liverus serve`` on a free loopback port with an untrained model of the chosen architecture (speed does not
depend on the weights), sends a bounded number of requests, and stops the server.

    python benchmarks/serve_latency.py --model custom_resnet50 --requests 40
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import serving, untrained_model_file  # noqa: E402
from liverus.data.phantom import render_phantom  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="custom_resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--heatmap", action="store_true", help="also compute Grad-CAM for each request")
    args = ap.parse_args()
    img, *_ = render_phantom(np.random.default_rng(0), "malignant", 512)
    ok, png = cv2.imencode(".png", img)
    payload = png.tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        model = untrained_model_file(Path(tmp) / "model.pt", args.model, args.size)
        with serving(model) as url:
            endpoint = f"{url}/api/predict?heatmap={'true' if args.heatmap else 'false'}"

            def one(_):
                t = time.perf_counter()
                r = httpx.post(endpoint, files={"file": ("a.png", payload, "image/png")}, timeout=120)
                r.raise_for_status()
                return time.perf_counter() - t

            one(0)  # warm-up
            lat = [one(i) for i in range(args.requests)]
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t
    lat_ms = sorted(x * 1000 for x in lat)
    p95 = lat_ms[min(len(lat_ms) - 1, int(round(0.95 * (len(lat_ms) - 1))))]
    print(f"{args.model} at {args.size} px, heatmap {args.heatmap}, {args.requests} requests")
    print(f"sequential latency: median {statistics.median(lat_ms):.0f} ms, p95 {p95:.0f} ms")
    print(f"8 concurrent clients: {args.requests / wall:.2f} requests/s")


if __name__ == "__main__":
    main()
