"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from liverus.data import PreprocessConfig
from liverus.models import build_model, default_card, save_model


def untrained_model_file(path: Path, name: str = "custom_resnet50", image_size: int = 224, crop: str = "fan") -> Path:
    """A model.pt with random weights and the metadata a training run stores (speed does not depend on weights)."""
    model = build_model(name)
    card = default_card(model).replace(preprocess=PreprocessConfig(image_size=image_size, crop=crop), version="bench")
    save_model(model, path, card)
    return path


def cpu_name() -> str:
    """The CPU model and its matrix features (benchmarks print which CPU they ran on)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if name:
        features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
        return f"{name} ({', '.join(features) or 'no AVX2'}; {os.cpu_count()} cores visible)"
    import platform

    return platform.processor() or platform.machine()


def liverus_cli(*args: str) -> float:
    """Run ``liverus ARGS`` (quiet) as a new process; returns its wall time in seconds.

    Raises:
        SystemExit: with the command's error output when it fails.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "liverus.cli", "--quiet", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"liverus {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


@contextmanager
def serving(model: Path, *extra: str):
    """``liverus serve`` (with ``extra`` options) on a free loopback port for a ``with`` block; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverus.cli", "serve", "--model", str(model), "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("liverus serve did not start within two minutes")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
