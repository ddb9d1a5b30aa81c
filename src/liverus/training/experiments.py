"""``liverus cv`` and ``liverus compare``: stratified group k-fold studies, resumable, same folds and seeds for every
model.

Design (nested, so nothing is tuned on the cases it is scored on): for fold ``i`` the held-out part is the test set;
the remaining cases are split again (group-aware) into training and validation. Validation picks the best epoch and
the operating threshold; the held-out fold is scored once with both. Pooling the held-out predictions of all folds
gives one out-of-fold prediction per case.

A study folder holds ``study.json``, ``splits.json``, one run folder per model and fold (``MODEL/foldI``, each a
normal resumable run), then ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from liverus.data import (
    default_cache_dir,
    kfold_splits,
    load_splits,
    save_splits,
    train_val_test_split,
)
from liverus.evaluation.multiclass_study import summarize_multiclass_study
from liverus.evaluation.study import repeat_dir, summarize_study
from liverus.models import canonical_model_name
from liverus.training.config import ConfigError, TrainConfig, config_to_dict
from liverus.training.datasets import usable_cases
from liverus.training.run_folder import RunExistsError, changed_keys, move_aside
from liverus.training.trainer import train
from liverus.utils import atomic_write_json

log = logging.getLogger("liverus.training")

__all__ = ["run_study", "run_holdout_comparison", "parse_model_spec"]


def parse_model_spec(spec: str) -> tuple[str, str | None, str]:
    """``name`` or ``name@weights`` (weights: ``imagenet``, ``random`` or a file). Returns (name, weights, label)."""
    name, _, weights = spec.partition("@")
    if ":" in name:  # family:timm/model -> family_timm_model, a folder name (aliases keep the name they were given)
        name = canonical_model_name(name)
    if not weights:
        return name, None, name
    w = None if weights == "random" else weights
    label = f"{name}@{Path(weights).stem if w not in (None, 'imagenet') else weights}"
    return name, w, label


def run_holdout_comparison(
    cfg: TrainConfig,
    out: str | Path,
    *,
    models: list[str],
    test_fraction: float = 0.2,
    resume: bool = False,
    n_boot: int = 1000,
) -> dict:
    """Train several models on one group-aware train / validation / test split and compare them on the test part
    (the quick version of :func:`run_study`, used by ``liverus demo``). Same folder layout, with ``fold0`` only."""
    out = Path(out)
    check_models(cfg, models)
    if (out / "study.json").is_file() and not resume:
        raise RunExistsError(f"folder {out} already holds a comparison; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", {"models": models, "k": 1, "config": config_to_dict(cfg)})
    cases = usable_cases(cfg, out)[0]
    split_file = out / "splits.json"
    if split_file.is_file():
        split = load_splits(split_file, cases)["folds"][0]
    else:
        split = train_val_test_split(cases, cfg.data.val_fraction, test_fraction, seed=cfg.runtime.seed)
        save_splits(split_file, {"folds": [split], "seed": cfg.runtime.seed})
    labels = [parse_model_spec(spec)[2] for spec in models]
    for spec in models:
        _train_model(cfg, spec, out, out / parse_model_spec(spec)[2] / "fold0", cases, split)
    return summarize_study(out, labels, baseline=labels[0], subgroup=[], n_boot=n_boot)


def _model_config(cfg: TrainConfig, spec: str) -> TrainConfig:
    """The study's config with the model of ``spec`` (``name`` or ``name@weights``)."""
    name, weights, _ = parse_model_spec(spec)
    mcfg = copy.deepcopy(cfg)
    mcfg.model.name = name
    if "@" in spec:
        mcfg.model.weights = weights
    mcfg.data.splits = ""
    return mcfg


def check_models(cfg: TrainConfig, models: list[str]) -> None:
    """Check the config of every model of a study before the first one trains (a study of several models would
    otherwise stop at the second model's config error after the first model's folds).

    Raises:
        ConfigError: naming the model and the config key.
    """
    for spec in models:
        try:
            _model_config(cfg, spec).validate()
        except ConfigError as exc:
            raise ConfigError(f"model {spec!r} of this study: {exc}") from None


def _train_model(cfg: TrainConfig, spec: str, study: Path, run_dir: Path, cases: list, split: dict) -> None:
    """Train one model spec into ``run_dir`` (skipped when finished, resumed when interrupted)."""
    if (run_dir / "result.json").is_file():
        return
    label = parse_model_spec(spec)[2]
    mcfg = _model_config(cfg, spec)
    if not mcfg.data.cache_dir:  # one cache (decoded images, features) for the whole study and all its repeats
        mcfg.data.cache_dir = str(default_cache_dir(study))
    log.info("== %s: %s", label, run_dir.name)
    train(mcfg, run_dir, resume=run_dir.exists(), cases=cases, split=split)


def run_study(
    cfg: TrainConfig,
    out: str | Path,
    *,
    models: list[str],
    k: int = 5,
    resume: bool = False,
    baseline: str | None = None,
    subgroup: list[str] | None = None,
    n_boot: int = 2000,
    repeats: int = 1,
    overwrite: bool = False,
) -> dict:
    """Train every model on every fold (of every repeat) and summarise.

    Args:
        cfg: base config (each model overrides ``model.name`` and, with ``name@weights``, ``model.weights``).
        out: study folder.
        models: model specs, ``name`` or ``name@weights``.
        k: number of folds (ignored when ``cfg.data.splits`` names an existing splits file, which is reused).
        resume: continue an interrupted study; finished runs are kept as they are.
        baseline: the reference for paired tests (default: the first model).
        subgroup: metadata columns for subgroup tables (AUL: ``size_group`` is added automatically).
        n_boot: bootstrap resamples.
        repeats: repeated cross-validation: repeat ``r`` draws new folds and trains with seed ``runtime.seed + r``
            (every model sees the same fold sets); runs of repeat ``r >= 1`` live in ``MODEL/repeatR/foldI``.
            A resumed study may raise the number of repeats.
        overwrite: move an existing study folder aside (to ``STUDY.replaced-<time>``) and start again.

    Returns:
        The summary (also ``summary.json``), with a ``text`` table.

    Raises:
        RunExistsError: if ``out`` holds a study and neither ``resume`` nor ``overwrite`` is set.
        ConfigError: if the config does not fit one of the models (checked for all before anything trains).
        ValueError: if a resumed study's config differs (the message names the keys).
    """
    out = Path(out)
    specs = [parse_model_spec(m) for m in models]
    labels = [s[2] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model list has duplicates: {models}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    check_models(cfg, models)
    study_file = out / "study.json"
    if overwrite and out.exists():
        move_aside(out)
    meta = {"models": models, "k": k, "repeats": repeats, "config": config_to_dict(cfg)}
    if study_file.is_file():
        if not resume:
            raise RunExistsError(
                f"study folder {out} already exists; pass --resume to continue it or --overwrite to start again"
            )
        saved = json.loads(study_file.read_text())
        changed = changed_keys(saved["config"], meta["config"])
        if changed:
            raise ValueError(f"cannot resume {out}: its config differs from the requested one in {', '.join(changed)}")
        meta["models"] = list(dict.fromkeys(saved["models"] + models))
        meta["repeats"] = max(repeats, saved.get("repeats", 1))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(study_file, meta)

    cases = usable_cases(cfg, out)[0]
    by_path = {c.path: c for c in cases}
    for r in range(meta["repeats"]):
        folds = _repeat_folds(cfg, out, cases, k, r)
        rcfg = copy.deepcopy(cfg)
        rcfg.runtime.seed = cfg.runtime.seed + r
        for spec, (_, _, label) in zip(models, specs, strict=True):
            for i, fold in enumerate(folds):
                fold_cases = [by_path[p] for p in fold["train"]]
                inner = train_val_test_split(fold_cases, cfg.data.val_fraction, 0.0, seed=rcfg.runtime.seed + i)
                split = {"train": inner["train"], "val": inner["val"], "test": fold["val"]}
                _train_model(rcfg, spec, out, repeat_dir(out, label, r) / f"fold{i}", cases, split)
    if cfg.data.task != "binary":
        return summarize_multiclass_study(out, labels)
    return summarize_study(out, labels, baseline=baseline or labels[0], subgroup=subgroup or [], n_boot=n_boot)


def _repeat_folds(cfg: TrainConfig, out: Path, cases: list, k: int, r: int) -> list[dict]:
    """Repeat ``r``'s folds: ``splits.json`` (repeat 0, or ``data.splits``) and ``splits_repeatR.json``, drawn with
    seed ``runtime.seed + r`` and reused on resume."""
    split_file = out / ("splits.json" if r == 0 else f"splits_repeat{r}.json")
    if split_file.is_file():
        return load_splits(split_file, cases)["folds"]
    if cfg.data.splits and r == 0:
        folds = load_splits(cfg.data.splits, cases)["folds"]
        save_splits(split_file, {"folds": folds, "source": cfg.data.splits})
        return folds
    folds = kfold_splits(cases, k, seed=cfg.runtime.seed + r)
    save_splits(split_file, {"folds": folds, "seed": cfg.runtime.seed + r, "k": k, "repeat": r})
    return folds
