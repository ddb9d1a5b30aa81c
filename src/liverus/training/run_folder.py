"""The run folder: the one place a training run writes, and everything needed to reproduce and resume it.

``config.yaml`` (effective config), ``provenance.json`` (seed, package versions, git commit), ``splits.json``,
``skipped.json`` (bad files skipped on request), ``metrics.csv`` and ``tb/`` (per-epoch metrics),
``checkpoints/last.pt`` and ``checkpoints/best.pt``, ``model.pt`` (best weights + model card),
``predictions_val.csv`` (and ``predictions_test.csv``) and finally ``result.json``, whose presence marks a finished
run. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from liverus.training.config import TrainConfig, config_to_dict, is_removed_and_off
from liverus.utils import atomic_write_json, atomic_write_text, provenance

__all__ = ["RunFolder", "RunExistsError", "TrainResult", "changed_keys", "move_aside"]

log = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


@dataclass
class TrainResult:
    """What a finished run returns and stores as ``result.json``."""

    run_dir: str
    model_path: str
    best_epoch: int
    val_auc: float
    threshold: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    val_metrics: dict = field(default_factory=dict)
    test_metrics: dict | None = None
    wall_time_s: float = 0.0


class RunFolder:
    """Paths and atomic writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config_file = property(lambda self: self.path / "config.yaml")
    splits_file = property(lambda self: self.path / "splits.json")
    metrics_file = property(lambda self: self.path / "metrics.csv")
    result_file = property(lambda self: self.path / "result.json")
    model_file = property(lambda self: self.path / "model.pt")
    checkpoints = property(lambda self: self.path / "checkpoints")
    phantom_dir = property(lambda self: self.path / "phantom")

    def prepare(self, config: dict, seed: int, *, resume: bool, overwrite: bool) -> bool:
        """Create the folder (writing config and provenance) or check an earlier run in it.

        Returns:
            Whether an earlier run is resumed.

        Raises:
            RunExistsError: if the folder holds a run and neither ``resume`` nor ``overwrite`` is set.
            ValueError: if a resumed run's config differs from ``config`` (the message names the keys).
        """
        cfg_text = yaml.safe_dump(config, sort_keys=False)
        existing = self.path.exists() and any(self.path.iterdir())
        if existing and overwrite:
            move_aside(self.path)
            existing = False
        if existing and not resume:
            raise RunExistsError(
                f"run folder {self.path} already exists and is not empty; pass --resume to continue it or "
                "--overwrite to move it aside and start again (nothing is overwritten silently)"
            )
        if existing:
            if self.config_file.is_file():
                saved = yaml.safe_load(self.config_file.read_text())
                changed = changed_keys(saved, yaml.safe_load(cfg_text))
                if changed:
                    raise ValueError(
                        f"cannot resume {self.path}: its config.yaml differs from the requested config in "
                        f"{', '.join(changed)}"
                    )
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, cfg_text)
        atomic_write_json(self.path / "provenance.json", {"seed": seed, **provenance()})
        return False

    def finished_result(self) -> dict | None:
        """The stored ``result.json`` of a finished run, or None."""
        return json.loads(self.result_file.read_text()) if self.result_file.is_file() else None

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.result_file, result)

    def write_skipped(self, skipped: list[tuple[str, str]]) -> Path:
        path = self.path / "skipped.json"
        atomic_write_json(path, [{"path": p, "problem": q} for p, q in skipped])
        return path

    def append_metrics(self, row: dict) -> None:
        """Append one epoch's row to ``metrics.csv`` (rewritten whole, atomically)."""
        new = not self.metrics_file.is_file()
        text = "" if new else self.metrics_file.read_text()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        atomic_write_text(self.metrics_file, text + buf.getvalue())

    def rewrite_metrics(self, history: list[dict]) -> None:
        """``metrics.csv`` from a checkpoint's history: rows written after the last checkpoint (a kill between the
        two writes) are dropped."""
        self.metrics_file.unlink(missing_ok=True)
        for row in history:
            self.append_metrics(row)


def move_aside(path: Path) -> Path:
    """Rename an existing run or study folder to ``NAME.replaced-<time>`` (``--overwrite``: nothing is deleted)."""
    backup = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(backup)
    log.warning("moved the existing folder %s to %s", path, backup)
    return backup


# Config keys that hold a file or folder: '../shared/data/aul' and '/work/shared/data/aul' are one data source.
PATH_KEYS = frozenset({"data.source", "data.splits", "model.weights"})


def changed_keys(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """``section.key (old -> new)`` for every value that differs between two nested config dicts.

    Path-valued keys (``PATH_KEYS``) compare by the path they resolve to from the working directory, so a run
    started with a relative data path resumes with the absolute one and vice versa. A key the old config lacks (it
    was written before the key existed) is unchanged when the new value is the key's default (``defaults``: a
    nested dict of defaults, :class:`TrainConfig`'s when None), so adding an option does not strand earlier runs;
    likewise a key the new config lacks because its option was removed, when the old value turned it off.
    """
    if defaults is None:
        defaults = config_to_dict(TrainConfig())
    keys = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        default = defaults.get(k, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.", default if isinstance(default, dict) else {})
        elif (a is _ABSENT and b == default) or (b is _ABSENT and is_removed_and_off(f"{prefix}{k}", a)):
            continue
        elif a != b and not (f"{prefix}{k}" in PATH_KEYS and _same_path(a, b)):
            keys.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return keys


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _same_path(a: object, b: object) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)) or a == "imagenet" or b == "imagenet":
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
