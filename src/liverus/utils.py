"""Small shared helpers: atomic writes, run provenance, seeding."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from collections import OrderedDict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DigestMemo",
    "StageTimer",
    "STAGES",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "provenance",
    "seed_everything",
    "check_new_file",
    "to_plain",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a partial file (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def provenance() -> dict[str, Any]:
    """Returns: package versions, platform and git commit, for a run folder's ``provenance.json``."""
    pkgs = {}
    for name in (
        "liverus",
        "torch",
        "torchvision",
        "numpy",
        "opencv-python-headless",
        "scikit-learn",
        "albumentations",
        "pydicom",
        "onnxruntime",
        "grad-cam",
        "efficientnet-lite-pytorch",
    ):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.machine(),
        "packages": pkgs,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_new_file(path: str | os.PathLike, what: str = "output") -> None:
    """Check, before any work, that a result can be written to ``path`` without replacing anything.

    Raises:
        ValueError: if ``path`` exists, or one of its parent folders is a file.
    """
    p = Path(path)
    if p.exists() or p.is_symlink():
        raise ValueError(f"{what} {p} already exists; choose another (results are never overwritten)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {p} cannot be written: {parent} is a file, not a folder")
            break


def to_plain(obj: Any) -> Any:
    """Nested dicts, lists and tuples with NumPy scalars turned into Python ones (for JSON and YAML)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


class StageTimer:
    """Wall time per stage of a job (training steps, validation, decoding, reports, ...), exclusive of nested stages,
    so the stages and the unattributed rest add up to the wall time. Disabled (free) unless :meth:`start` was called.

    Use ``with STAGES.stage("decoding"): ...`` around work; ``STAGES.start()`` / ``STAGES.report()`` around the job.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []
        self._t0 = 0.0

    def start(self) -> None:
        import time

        self.enabled, self.totals, self._stack, self._t0 = True, {}, [], time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        import time

        frame = [name, time.perf_counter(), 0.0]  # name, start, time spent in nested stages
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def timed(self, name: str):
        """Decorator: every call of the function counts as stage ``name``."""

        def deco(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                with self.stage(name):
                    return fn(*args, **kwargs)

            return wrapper

        return deco

    def report(self) -> dict[str, Any]:
        """``{"wall_s", "stages": {name: seconds}, "other_s"}``; stops timing."""
        import time

        wall = time.perf_counter() - self._t0
        self.enabled = False
        measured = sum(self.totals.values())
        return {"wall_s": wall, "stages": dict(self.totals), "other_s": wall - measured}


STAGES = StageTimer()


class DigestMemo:
    """Results of a pure function of arrays, remembered by a 16-byte digest of the arrays' bytes (bounded, LRU).

    For per-image features that a study computes for every image in every fold and repeat (radiomics, a frozen
    backbone's pooled features) and a server for every repeated image. ``functools.lru_cache`` would keep each
    ~100 kB image as its key; this keeps a digest and the (small) result.

    Args:
        max_items: the least recently used results are dropped beyond this many.
    """

    def __init__(self, max_items: int = 65536) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(*arrays: np.ndarray, salt: bytes = b"") -> bytes:
        """Digest of the arrays' dtypes, shapes and bytes, plus ``salt`` (what else the result depends on)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(salt)
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        return h.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        """A copy of the remembered result, or None (counted as a miss)."""
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value.copy()

    def put(self, key: bytes, value: np.ndarray) -> None:
        self._items[key] = np.array(value, copy=True)
        self._items.move_to_end(key)
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)
