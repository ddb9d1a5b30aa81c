"""``model.ensemble: K``: the final model is the ensemble of K fold models, with operating points chosen on
hundreds of out-of-fold cases rather than one small validation split.

The development cases (a run's training and validation parts; a study fold's non-test part) are split into K
group-disjoint folds. Member ``i`` trains on the other folds, and its own fold, which it never saw, picks its best
epoch and fits its temperature (Guo et al., 2017). Every development case thus gets one calibrated out-of-fold
probability; the operating points (Youden, rule-out, rule-in) are chosen on all of them, and the saved model averages
the members' calibrated probabilities. Each member is an ordinary, resumable run folder under ``RUN/members/``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from liverus import __version__
from liverus.data import Case, CaseCache, UltrasoundDataset, kfold_splits
from liverus.engine.averaging import average_probabilities
from liverus.engine.forward import eval_batch_size, predict_probs
from liverus.engine.predictions import read_predictions, write_predictions
from liverus.engine.runtime import inference_amp
from liverus.evaluation.stats import apply_temperature, fit_temperature
from liverus.models import EnsembleClassifier, ModelCard, load_model, save_model
from liverus.training.config import TrainConfig, config_to_dict
from liverus.training.datasets import cache_dir, held_out_caches, usable_cases
from liverus.training.finalize import ChosenPoints, chosen_points
from liverus.training.loop import score
from liverus.training.run_folder import RunFolder, TrainResult
from liverus.utils import to_plain

__all__ = ["train_ensemble"]

log = logging.getLogger("liverus.training")


def train_ensemble(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cases: list[Case] | None = None,
    split: dict[str, list[str]] | None = None,
    train_member: Callable[..., TrainResult] | None = None,
) -> TrainResult:
    """Train ``cfg.model.ensemble`` fold members and write the ensemble's run folder (see the module docstring).

    Args:
        cfg: validated config with ``model.ensemble >= 2``.
        run_dir, resume, overwrite, cases: as :func:`~liverus.training.train`.
        split: optional ``{"train", "val"[, "test"]}``: train and val are the development cases, test is scored by the
            finished ensemble (a cross-validation study's held-out fold).
        train_member: the single-model trainer (``liverus.training.train``), passed in to keep imports one way.

    Returns:
        The :class:`~liverus.training.TrainResult`.
    """
    t_start = time.time()
    folder = RunFolder(run_dir)
    if folder.prepare(config_to_dict(cfg), cfg.runtime.seed, resume=resume, overwrite=overwrite):
        stored = folder.finished_result()
        if stored:
            return TrainResult(**stored)
    cases, cache = usable_cases(cfg, folder.path, cases)
    dev, test = _development_and_test(cases, split)
    members = _train_members(cfg, folder, dev, train_member)
    pooled = _pool_out_of_fold(folder, dev, members, cfg.model.ensemble)
    ensemble = _ensemble_model(members)
    card = _ensemble_card(cfg, members, pooled)
    test_metrics = _score_test(cfg, folder, ensemble, card, test, cache) if test else None
    save_model(ensemble, folder.model_file, card)
    history = [
        {"member": i, "best_epoch": r.best_epoch, "val_auc": r.val_auc, "temperature": t, "epochs_run": r.epochs_run}
        for i, (r, t) in enumerate(zip(members.results, members.temperatures, strict=True))
    ]
    result = TrainResult(
        run_dir=str(folder.path),
        model_path=str(folder.model_file),
        best_epoch=-1,
        val_auc=float(pooled.val_metrics["auc"]),
        threshold=float(pooled.threshold),
        epochs_run=sum(r.epochs_run for r in members.results),
        history=history,
        val_metrics=to_plain(pooled.val_metrics),
        test_metrics=to_plain(test_metrics) if test_metrics else None,
        wall_time_s=round(time.time() - t_start, 2),
    )
    folder.write_result(asdict(result))
    return result


def _development_and_test(cases: list[Case], split: dict[str, list[str]] | None) -> tuple[list[Case], list[Case]]:
    """The development cases the members are trained and calibrated on (all of them without ``split``: a split's
    train and val parts), and the held-out test part the finished ensemble is scored on."""
    if split is None:
        return cases, []
    by_path = {c.path: c for c in cases}
    dev = [by_path[p] for p in [*split["train"], *split["val"]] if p in by_path]
    test = [by_path[p] for p in split.get("test", []) if p in by_path]
    return dev, test


@dataclass
class _Members:
    """The trained fold members: their results, models, temperatures, out-of-fold predictions (and the files they
    came from), the precisions their cards give and the last member's card."""

    results: list[TrainResult] = field(default_factory=list)
    models: list[torch.nn.Module] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    vals: list = field(default_factory=list)
    oof_files: list[Path] = field(default_factory=list)
    precisions: set[str] = field(default_factory=set)
    card: ModelCard | None = None


def _train_members(
    cfg: TrainConfig, folder: RunFolder, dev: list[Case], train_member: Callable[..., TrainResult]
) -> _Members:
    """Train member ``i`` on all folds of ``dev`` but fold ``i`` (resuming a member folder that exists), then fit its
    temperature on fold ``i``'s predictions."""
    members = _Members()
    for i, fold in enumerate(kfold_splits(dev, cfg.model.ensemble, seed=cfg.runtime.seed)):
        mcfg = copy.deepcopy(cfg)
        mcfg.model.ensemble = 0
        mcfg.data.splits = ""
        mcfg.runtime.seed = cfg.runtime.seed + i  # members differ in initialisation and augmentation as well
        if not mcfg.data.cache_dir:
            mcfg.data.cache_dir = str(cache_dir(cfg, folder.path))
        member_dir = folder.path / "members" / f"member{i}"
        log.info("== ensemble member %d/%d", i + 1, cfg.model.ensemble)
        res = train_member(mcfg, member_dir, resume=member_dir.exists(), cases=dev, split=fold)
        model, members.card = load_model(member_dir / "model.pt")
        members.precisions.add(members.card.precision)
        val = read_predictions([member_dir / "predictions_val.csv"])
        members.temperatures.append(fit_temperature(val.y, val.p))
        members.vals.append(val)
        members.results.append(res)
        members.models.append(model)
        members.oof_files.append(member_dir / "predictions_val.csv")
    return members


def _pool_out_of_fold(folder: RunFolder, dev: list[Case], members: _Members, k: int) -> ChosenPoints:
    """Pool the members' calibrated out-of-fold predictions (each development case scored by the member that never
    saw it), choose the operating points on them and write them as the ensemble's ``predictions_val.csv``."""
    oof = read_predictions(members.oof_files)
    p_cal = np.concatenate([apply_temperature(v.p, t) for v, t in zip(members.vals, members.temperatures, strict=True)])
    points, rates = chosen_points(oof.y, p_cal)
    threshold = points["youden"]
    classes = members.card.classes
    probs = np.stack([1 - p_cal, p_cal], axis=1)
    dev_by_path = {c.path: c for c in dev}
    oof_cases = [dev_by_path[p] for p in oof.paths]
    write_predictions(folder / "predictions_val.csv", oof_cases, probs, oof.y, classes, threshold)
    method = f"youden (pooled calibrated out-of-fold predictions of {len(oof)} cases, {k} members)"
    return ChosenPoints(threshold, points, rates, score(probs, oof.y, classes, threshold), method)


def _ensemble_model(members: _Members) -> EnsembleClassifier:
    """The members averaged with their temperatures, in eval mode."""
    models = members.models
    if all(hasattr(m, "pad_support") for m in models):
        # Fold SVMs keep different numbers of support vectors; zero-weight padding gives them one shape.
        n_support = max(int(m.build_kwargs.get("n_support", 1)) for m in models)
        for m in models:
            m.pad_support(n_support)
    return EnsembleClassifier(models, members.temperatures).eval()


def _ensemble_card(cfg: TrainConfig, members: _Members, pooled: ChosenPoints) -> ModelCard:
    """The last member's card with the ensemble's operating points, members, precision and seed."""
    precisions = set(members.precisions)
    return members.card.replace(
        threshold=pooled.threshold,
        threshold_method=pooled.method,
        operating_points=pooled.points,
        operating_point_rates=pooled.rates,
        members=cfg.model.ensemble,
        precision=precisions.pop() if len(precisions) == 1 else "fp32",
        precision_gap=None,
        val_auc=float(pooled.val_metrics["auc"]),
        best_epoch=None,
        version=__version__,
        provenance={**members.card.provenance, "seed": cfg.runtime.seed},
    )


def _score_test(
    cfg: TrainConfig,
    folder: RunFolder,
    ensemble: EnsembleClassifier,
    card: ModelCard,
    test: list[Case],
    cache: CaseCache,
) -> dict:
    """Score the held-out ``test`` cases with the finished ensemble on the CPU, write ``predictions_test.csv`` and
    return the metrics at the card's threshold."""
    cpu = torch.device("cpu")
    amp = inference_amp(card.precision, cpu)
    classes = card.classes
    scored = [  # one pass per box the probabilities are averaged over (data.box_average), else one
        predict_probs(ensemble, DataLoader(UltrasoundDataset(test, classes, c), batch_size=eval_batch_size(1)),
                      card, device=cpu, amp=amp)
        for c in held_out_caches(cfg, folder.path, test) or [cache]
    ]  # fmt: skip
    tprobs, ttg = average_probabilities([p for p, _ in scored]), scored[0][1]
    write_predictions(folder / "predictions_test.csv", test, tprobs, ttg, classes, card.threshold)
    return score(tprobs, ttg, classes, card.threshold)
