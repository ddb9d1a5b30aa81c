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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from liverus import __version__
from liverus.data import Case, UltrasoundDataset, kfold_splits
from liverus.engine.forward import average_probabilities, eval_batch_size, predict_probs
from liverus.engine.predictions import read_predictions, write_predictions
from liverus.engine.runtime import inference_amp
from liverus.evaluation.stats import apply_temperature, fit_temperature
from liverus.models import EnsembleClassifier, load_model, save_model
from liverus.training.config import TrainConfig, config_to_dict
from liverus.training.datasets import cache_dir, held_out_caches, usable_cases
from liverus.training.finalize import chosen_points
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
    train_member=None,
):
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
    k = cfg.model.ensemble
    folder = RunFolder(run_dir)
    if folder.prepare(config_to_dict(cfg), cfg.runtime.seed, resume=resume, overwrite=overwrite):
        stored = folder.finished_result()
        if stored:
            return TrainResult(**stored)
    cases, cache = usable_cases(cfg, folder.path, cases)
    by_path = {c.path: c for c in cases}
    if split is not None:
        dev = [by_path[p] for p in [*split["train"], *split["val"]] if p in by_path]
        test = [by_path[p] for p in split.get("test", []) if p in by_path]
    else:
        dev, test = cases, []
    folds = kfold_splits(dev, k, seed=cfg.runtime.seed)

    results, models, temps, oof_files, vals, precisions = [], [], [], [], [], set()
    for i, fold in enumerate(folds):
        mcfg = copy.deepcopy(cfg)
        mcfg.model.ensemble = 0
        mcfg.data.splits = ""
        mcfg.runtime.seed = cfg.runtime.seed + i  # members differ in initialisation and augmentation as well
        if not mcfg.data.cache_dir:
            mcfg.data.cache_dir = str(cache_dir(cfg, folder.path))
        member_dir = folder.path / "members" / f"member{i}"
        log.info("== ensemble member %d/%d", i + 1, k)
        res = train_member(mcfg, member_dir, resume=member_dir.exists(), cases=dev, split=fold)
        model, card = load_model(member_dir / "model.pt")
        precisions.add(card.precision)
        val = read_predictions([member_dir / "predictions_val.csv"])
        temps.append(fit_temperature(val.y, val.p))
        vals.append(val)
        results.append(res)
        models.append(model)
        oof_files.append(member_dir / "predictions_val.csv")

    # Pooled, calibrated out-of-fold predictions: each development case scored by the member that never saw it.
    oof = read_predictions(oof_files)
    p_cal = np.concatenate([apply_temperature(v.p, t) for v, t in zip(vals, temps, strict=True)])
    points, rates = chosen_points(oof.y, p_cal)
    threshold = points["youden"]
    classes = card.classes
    probs = np.stack([1 - p_cal, p_cal], axis=1)
    dev_by_path = {c.path: c for c in dev}
    oof_cases = [dev_by_path[p] for p in oof.paths]
    write_predictions(folder / "predictions_val.csv", oof_cases, probs, oof.y, classes, threshold)
    val_metrics = score(probs, oof.y, classes, threshold)

    if all(hasattr(m, "pad_support") for m in models):
        # Fold SVMs keep different numbers of support vectors; zero-weight padding gives them one shape.
        n_support = max(int(m.build_kwargs.get("n_support", 1)) for m in models)
        for m in models:
            m.pad_support(n_support)
    ensemble = EnsembleClassifier(models, temps).eval()
    card = card.replace(
        threshold=threshold,
        threshold_method=f"youden (pooled calibrated out-of-fold predictions of {len(oof)} cases, {k} members)",
        operating_points=points,
        operating_point_rates=rates,
        members=k,
        precision=precisions.pop() if len(precisions) == 1 else "fp32",
        precision_gap=None,
        val_auc=float(val_metrics["auc"]),
        best_epoch=None,
        version=__version__,
        provenance={**card.provenance, "seed": cfg.runtime.seed},
    )
    test_metrics = None
    if test:
        cpu = torch.device("cpu")
        amp = inference_amp(card.precision, cpu)
        scored = [  # one pass per box the probabilities are averaged over (data.box_average), else one
            predict_probs(ensemble, DataLoader(UltrasoundDataset(test, classes, c), batch_size=eval_batch_size(1)),
                          card, device=cpu, amp=amp)
            for c in held_out_caches(cfg, folder.path, test) or [cache]
        ]  # fmt: skip
        tprobs, ttg = average_probabilities([p for p, _ in scored]), scored[0][1]
        write_predictions(folder / "predictions_test.csv", test, tprobs, ttg, classes, threshold)
        test_metrics = score(tprobs, ttg, classes, threshold)
    save_model(ensemble, folder.model_file, card)
    history = [
        {"member": i, "best_epoch": r.best_epoch, "val_auc": r.val_auc, "temperature": t, "epochs_run": r.epochs_run}
        for i, (r, t) in enumerate(zip(results, temps, strict=True))
    ]
    result = TrainResult(
        run_dir=str(folder.path),
        model_path=str(folder.model_file),
        best_epoch=-1,
        val_auc=float(val_metrics["auc"]),
        threshold=float(threshold),
        epochs_run=sum(r.epochs_run for r in results),
        history=history,
        val_metrics=to_plain(val_metrics),
        test_metrics=to_plain(test_metrics) if test_metrics else None,
        wall_time_s=round(time.time() - t_start, 2),
    )
    folder.write_result(asdict(result))
    return result
