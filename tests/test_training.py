"""Trainer: optimisation, losses, config validation, resume after SIGKILL, DDP equivalence, early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from liverus.models import build_model, load_model
from liverus.training import (
    ConfigError,
    FocalLoss,
    RunExistsError,
    apply_overrides,
    class_weights,
    load_config,
    train,
)
from liverus.training.distributed import ShardedBatchSampler

# A small, fast configuration: EfficientNet-Lite0 head at 64 px on a 16-patient phantom.
TINY = [
    "data.image_size=64",
    "data.phantom_patients=16",
    "data.phantom_size=96",
    "data.augment=light",
    "model.name=custom_efficientnet_lite0",
    "optim.batch_size=8",
    "optim.epochs=3",
    "optim.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.tensorboard=false",
    "runtime.precision=fp32",
]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "liverus.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["model"]


# ---------------------------------------------------------------- optimisation and losses


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model("custom_resnet50", drop_rate=0.0).train()
    x = torch.randn(8, 1, 64, 64)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_class_weights_hand_computed():
    w = class_weights([0, 0, 0, 1], 2)
    torch.testing.assert_close(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    lp = torch.log_softmax(logits, 1)
    nll = -lp[torch.arange(3), y]
    expected = (w[y] * nll).sum() / w[y].sum()  # PyTorch's weighted mean
    got = torch.nn.CrossEntropyLoss(weight=w)(logits, y)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="no training examples"):
        class_weights([0, 0], 2)


def test_focal_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)[torch.arange(2), y]
    alpha = torch.tensor([0.25, 0.75])
    expected = (alpha[y] * (1 - p) ** 2 * -torch.log(p)).mean()
    torch.testing.assert_close(FocalLoss(2.0, alpha)(logits, y), expected)
    # gamma 0 without alpha is cross-entropy
    torch.testing.assert_close(FocalLoss(0.0)(logits, y), F.cross_entropy(logits, y))
    with pytest.raises(ValueError):
        FocalLoss(-1)


# ---------------------------------------------------------------- config


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\n  epochs: 3\nmodel:\n  name: baseline\n")
    cfg = load_config(p, ["optim.batch_size=4", "data.letterbox=false", "model.weights=null"])
    assert cfg.optim.lr == 0.01 and cfg.optim.batch_size == 4 and cfg.data.letterbox is False
    assert cfg.model.weights is None and cfg.model.name == "baseline"


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("optim:\n  lrr: 0.1\n", [], r"unknown key optim\.lrr; did you mean optim\.lr"),
        ("optimizer:\n  lr: 0.1\n", [], "unknown section 'optimizer'"),
        ("optim:\n  epochs: many\n", [], r"optim\.epochs: expected an integer"),
        ("optim:\n  lr: -1\n", [], r"optim\.lr: must be positive"),
        ("loss:\n  name: dice\n", [], r"loss\.name: 'dice' is not one of"),
        ("model:\n  name: custom_resnet5\n", [], "did you mean 'custom_resnet50'"),
        ("", ["optim.lr"], "must look like section.key=value"),
        ("", ["data.letterbox=maybe"], "expected true/false"),
        ("- a\n- b\n", [], "must be a mapping"),
        # preprocessing values are checked once, by PreprocessConfig, and named as config keys
        ("", ["data.box_jitter=0.7"], r"data\.box_jitter must be in \[0, 0\.5\], got 0\.7"),
        ("", ["data.roi_margin=6"], r"data\.roi_margin must be in \[0, 5\]"),
        ("", ["data.image_size=16"], r"data\.image_size must be in \[32, 2048\]"),
        # a removed option is named, with why it went and what to use instead
        ("", ["data.context_margin=1.5"], r"data\.context_margin was removed from liverus: .* data\.scan_view"),
        ("data:\n  context_margin: wide\n", [], r"data\.context_margin was removed from liverus"),
        ("", ["loss.segmentation_weight=-1"], r"loss\.segmentation_weight: must not be negative"),
        ("", ["loss.attention_weight=-0.5"], r"loss\.attention_weight: must not be negative"),
        (
            "",
            ["model.name=radiomics_svm", "data.lesion_channel=true", "data.crop=roi", "loss.segmentation_weight=1"],
            r"loss\.segmentation_weight: an auxiliary loss of gradient training; radiomics_svm is a fitted feature",
        ),
        (
            "",
            ["model.name=radiomics_svm", "data.lesion_channel=true", "data.crop=roi", "loss.debias_by=image_size"],
            r"loss\.debias_by: an auxiliary loss of gradient training; radiomics_svm is a .* \(set it to ''\)",
        ),
    ],
)
def test_config_errors(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p, overrides)


# ---------------------------------------------------------------- sampler


def test_sharded_sampler_global_batches_do_not_depend_on_world_size():
    one = list(ShardedBatchSampler(20, 8, seed=3, rank=0, world_size=1))
    r0 = list(ShardedBatchSampler(20, 8, seed=3, rank=0, world_size=2))
    r1 = list(ShardedBatchSampler(20, 8, seed=3, rank=1, world_size=2))
    assert len(one) == len(r0) == len(r1) == 2
    for full, a, b in zip(one, r0, r1, strict=True):
        assert sorted(full) == sorted(a + b)
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(20, 7, world_size=2)


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = apply_overrides(load_config(), TINY)
    return run, train(cfg, run)


def test_run_folder_records_everything(tiny_run):
    run, result = tiny_run
    for name in (
        "config.yaml",
        "provenance.json",
        "splits.json",
        "metrics.csv",
        "model.pt",
        "result.json",
        "predictions_val.csv",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run / name).is_file(), name
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["packages"]["torch"] and "git_commit" in prov
    assert result.epochs_run == 3 and len(result.history) == 3
    model, card = load_model(run / "model.pt")
    assert 0 <= card.threshold <= 1 and card.preprocess.image_size == 64
    assert card.classes == ("benign", "malignant")
    assert model.model_name == "custom_efficientnet_lite0"
    # The card carries what the run knows: provenance, the epoch of the weights and the scoring precision.
    assert card.provenance["seed"] == 0 and card.provenance["git_commit"] == prov["git_commit"]
    assert card.best_epoch == result.best_epoch and card.precision == "fp32" and card.version


def test_existing_run_is_never_overwritten_silently(tiny_run, tmp_path):
    run, result = tiny_run
    before = (run / "model.pt").read_bytes()
    cfg = apply_overrides(load_config(), TINY)
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        train(cfg, run)
    assert (run / "model.pt").read_bytes() == before
    # Resuming a finished run returns its result without training.
    again = train(cfg, run, resume=True)
    assert again.val_auc == result.val_auc
    # Resuming with another config is refused.
    with pytest.raises(ValueError, match="differs"):
        train(apply_overrides(cfg, ["optim.lr=0.1"]), run, resume=True)


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    cfg = apply_overrides(load_config(), [*TINY, "optim.epochs=1"])
    train(cfg, run, overwrite=True)
    backups = list(tmp_path.glob("r.replaced-*"))
    assert len(backups) == 1 and (backups[0] / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_early_stopping_and_best_checkpoint(tmp_path):
    # A learning rate of ~0 keeps the validation AUC flat, so epoch 1 stays the best and patience 2 stops at 3.
    cfg = apply_overrides(
        load_config(),
        [
            *TINY,
            "optim.epochs=6",
            "optim.lr=1e-12",
            "optim.freeze_bn=true",
            "model.drop_rate=0",
            "optim.early_stopping_patience=2",
        ],
    )
    result = train(cfg, tmp_path / "es")
    assert result.epochs_run == 3 and result.best_epoch == 1
    best = torch.load(tmp_path / "es" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 1


@pytest.mark.slow
def test_skip_bad_lists_skipped_files(tmp_path, phantom_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "manifest.csv").unlink()
    (data / "benign" / "broken.png").write_bytes(b"\x89PNG broken")
    cfg = apply_overrides(load_config(), [*TINY, f"data.source={data}", "optim.epochs=1"])
    from liverus.data import DataError

    with pytest.raises(DataError, match=r"broken\.png"):
        train(cfg, tmp_path / "a")
    cfg = apply_overrides(cfg, ["data.skip_bad=true"])
    train(cfg, tmp_path / "b")
    skipped = json.loads((tmp_path / "b" / "skipped.json").read_text())
    assert [Path(s["path"]).name for s in skipped] == ["broken.png"]


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    args = [a for o in TINY for a in ("--set", o)] + ["--set", "optim.epochs=4"]
    full = tmp_path / "full"
    p = _cli("train", "--out", str(full), *args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out

    killed = tmp_path / "killed"
    p = _cli("train", "--out", str(killed), *args)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while time.time() < deadline:
        if ckpt.is_file():
            state = torch.load(ckpt, weights_only=True)
            if state["epoch"] >= 2:
                break
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)  # mid-way through epoch 3 (or later), no chance to clean up
    p.wait()
    assert not (killed / "result.json").exists()
    p = _cli("train", "--out", str(killed), "--resume", *args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "resuming" in out
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "metrics.csv").read_text().count("\n") == (killed / "metrics.csv").read_text().count("\n")


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    common = [
        *TINY,
        "optim.epochs=1",
        "optim.freeze_bn=true",
        "model.drop_rate=0",
        "model.drop_path_rate=0",
        "loss.name=ce",
        "data.augment=none",
        "optim.grad_clip=0",
        # SGD is linear in the gradient; Adam's g / sqrt(v) turns float-rounding noise on near-zero gradients into
        # full-size steps, which would hide what this test checks (identical averaged gradients).
        "optim.optimizer=sgd",
        "optim.lr=0.05",
    ]
    args = [a for o in common for a in ("--set", o)]
    single = tmp_path / "single"
    p = _cli("train", "--out", str(single), *args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    ddp = tmp_path / "ddp"
    # The phantom is written by rank 0 of each run; point both runs at the same data.
    data = single / "phantom"
    args_ddp = [*args, "--set", f"data.source={data}", "--set", f"data.splits={single / 'splits.json'}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "liverus.cli",
        "train",
        "--out",
        str(ddp),
        *args_ddp,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = _weights(single), _weights(ddp)
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point()}
    torch.manual_seed(0)  # the trainer seeds torch with runtime.seed before building the model
    init = build_model("custom_efficientnet_lite0", drop_rate=0.0, drop_path_rate=0.0)
    moved = max(
        (a[k].float() - v.float()).abs().max().item()
        for k, v in init.state_dict().items()
        if k in a and v.is_floating_point() and "running" not in k
    )
    # Gradients summed in another order (2 x 4 vs 8 images) differ by float rounding, which BatchNorm-bias
    # gradients (sums over N*H*W terms that largely cancel) amplify; agreement is judged against how far training
    # moved the weights.
    worst = max(diffs.values())
    assert moved > 0.01, moved
    assert worst < 1e-3 * moved, (worst, moved, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
    # Rank 0 alone wrote the run folder's files, and only rank 0 printed the summary and wrote the report.
    assert (ddp / "result.json").is_file() and not list(ddp.glob("*.tmp"))
    assert proc.stdout.count('"best_epoch"') == 1 and proc.stdout.count("report: ") == 1, proc.stdout
    assert (ddp / "report.html").is_file()


@pytest.mark.slow
def test_final_model_without_validation_uses_the_given_threshold(tmp_path):
    with pytest.raises(ConfigError, match="model.threshold"):
        apply_overrides(load_config(), [*TINY, "data.val_fraction=0"])
    cfg = apply_overrides(load_config(), [*TINY, "optim.epochs=2", "data.val_fraction=0", "model.threshold=0.42"])
    result = train(cfg, tmp_path / "final")
    split = json.loads((tmp_path / "final" / "splits.json").read_text())["folds"][0]
    assert split["val"] == [] and len(split["train"]) > 20  # every case trains
    assert result.best_epoch == 2 and result.threshold == pytest.approx(0.42)
    _, card = load_model(tmp_path / "final" / "model.pt")
    assert card.threshold == pytest.approx(0.42) and card.threshold_method.startswith("model.threshold")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=str)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    if path.stem.startswith("aul_"):
        assert cfg.data.source == "../shared/data/aul"
        assert cfg.data.task == ("three_class" if path.stem.startswith("aul_three_class") else "binary")
    if path.stem == "aul_final":
        # The final recipe is the cross-validated procedure itself: the study's config with the recommended model.
        from liverus.training.config import config_to_dict

        final, studied = config_to_dict(cfg), config_to_dict(load_config(path.with_name("aul_radiomics.yaml")))
        assert final["model"].pop("name") == "radiomics_svm_efficientnet_lite0" == studied["model"].pop("name")
        assert final["model"].pop("ensemble") == 5  # the ensemble of five fold models fitted that way
        # ... with the mirror-averaged deep features and the whole-scan view the study measured with
        # --set model.flip_features=true --set data.scan_view=true
        assert final["model"].pop("flip_features") is True and final["data"].pop("scan_view") is True
        # ... and the classifier's loss balanced over class x size group (round 9: --set data.balance_by=size_group)
        assert final["data"].pop("balance_by") == "size_group"
        # ... and a box scored as the mean of four boxes around it (round 12: --set data.box_average=4)
        assert final["data"].pop("box_average") == 4 and final["data"].pop("box_shift") == 0.1
        # ... fitted on two box copies of every training lesion too (round 13: --set data.box_copies=2, the copies
        # jittered as the studies' boxes, --set data.box_jitter=0.2, by their own setting)
        assert final["data"].pop("box_copies") == 2 and final["data"].pop("box_copy_jitter") == 0.2
        # ... and the lesion crop's deep features averaged over turns and zooms too (round 14:
        # --set model.rotate_features=10 --set model.zoom_features=0.1)
        assert final["model"].pop("rotate_features") == 10 and final["model"].pop("zoom_features") == 0.1
        for key in ("ensemble", "flip_features", "rotate_features", "zoom_features"):
            studied["model"].pop(key)
        for key in ("scan_view", "balance_by", "box_average", "box_shift", "box_copies", "box_copy_jitter"):
            studied["data"].pop(key)
        assert final == studied


@pytest.mark.slow
def test_ensemble_of_fold_models_with_calibrated_operating_points(tmp_path):
    from liverus.engine.predictions import read_predictions
    from liverus.evaluation.stats import apply_temperature
    from liverus.models import EnsembleClassifier

    cfg = apply_overrides(load_config(), [*TINY, "optim.epochs=1", "model.ensemble=2", "data.phantom_patients=20"])
    result = train(cfg, tmp_path / "ens")
    ens, card = load_model(tmp_path / "ens" / "model.pt")
    assert isinstance(ens, EnsembleClassifier) and len(ens.members) == 2 and card.members == 2
    assert set(card.operating_points) == {"youden", "rule_out", "rule_in"} and card.threshold == result.threshold
    assert card.operating_points["rule_out"] <= card.operating_points["youden"] <= card.operating_points["rule_in"]
    # Every development case has one out-of-fold probability: its member's, calibrated by that member's temperature.
    oof = read_predictions([tmp_path / "ens" / "predictions_val.csv"])
    # The card says what each point is expected to give on new cases: the rates on those predictions, with intervals.
    from liverus.evaluation.metrics import operating_points

    chosen = operating_points(oof.y, oof.p)
    for name, rates in card.operating_point_rates.items():
        assert rates["sensitivity"] == pytest.approx(chosen[name]["sensitivity"])
        low, high = rates["specificity_ci95"]
        assert low <= rates["specificity"] <= high and isinstance(rates["target_held"], bool)
    members = [read_predictions([tmp_path / "ens" / "members" / f"member{i}" / "predictions_val.csv"]) for i in (0, 1)]
    assert len(oof) == sum(len(m) for m in members) and not set(members[0].paths) & set(members[1].paths)
    t0 = float(ens.temperature[0])
    np.testing.assert_allclose(oof.p[: len(members[0])], apply_temperature(members[0].p, t0), atol=2e-6)
    # The ensemble's probability is the mean of its members' calibrated probabilities.
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        want = torch.stack([F.softmax(m(x) / ens.temperature[i], 1) for i, m in enumerate(ens.members)]).mean(0)
        got = F.softmax(ens(x), 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    again = train(cfg, tmp_path / "ens", resume=True)  # a finished ensemble returns its stored result
    assert again.threshold == result.threshold


@pytest.mark.slow
def test_study_predictions_equal_evaluate_and_predict(tmp_path):
    # One numerical path: what a run stores for its held-out cases is what evaluate and predict compute later.
    import csv

    from liverus.engine.predictor import Predictor
    from liverus.evaluation.report import evaluate_checkpoint
    from liverus.training.experiments import run_study

    cfg = apply_overrides(load_config(), [*TINY, "optim.epochs=1", "data.phantom_patients=40"])
    run_study(cfg, tmp_path / "study", models=["custom_efficientnet_lite0"], k=2, n_boot=50)
    fold = tmp_path / "study" / "custom_efficientnet_lite0" / "fold0"

    def rows(path):
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))

    stored = {r["path"]: float(r["p_malignant"]) for r in rows(fold / "predictions_test.csv")}
    manifest = tmp_path / "held_out.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([r["path"], r["label"]] for r in rows(fold / "predictions_test.csv"))
    evaluate_checkpoint(fold / "model.pt", manifest, tmp_path / "eval", n_boot=50)
    again = {r["path"]: float(r["p_malignant"]) for r in rows(tmp_path / "eval" / "predictions.csv")}
    assert again.keys() == stored.keys()
    assert max(abs(again[p] - stored[p]) for p in stored) < 1e-5
    from liverus.data import read_image

    pred = Predictor.from_path(fold / "model.pt")
    some = list(stored)[:4]
    got = pred.predict([read_image(p) for p in some])
    assert max(abs(g.probability - stored[p]) for g, p in zip(got, some, strict=True)) < 1e-5


def test_balance_by_acquisition_group_draws_every_class_and_group_cell_equally(tmp_path):
    from collections import Counter

    from liverus.data import make_phantom_dataset
    from liverus.training import apply_overrides, load_config
    from liverus.training.datasets import acquisition_group, balancing_weights, prepare_run_data
    from liverus.training.distributed import DistInfo
    from liverus.training.run_folder import RunFolder

    src = tmp_path / "phantom"
    make_phantom_dataset(src, n_patients=24, size=96, seed=0)
    cfg = apply_overrides(load_config(), [f"data.source={src}", "data.image_size=32", "data.balance_by=kind",
                                          "optim.batch_size=8", "data.augment=none"])  # fmt: skip
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    data = prepare_run_data(cfg, folder, DistInfo())
    cells = [(data.train_targets[i], acquisition_group(data.train[i], "kind")) for i in range(len(data.train))]
    drawn = Counter()
    for epoch in range(30):
        data.train_sampler.set_epoch(epoch)
        for batch in data.train_sampler:
            drawn.update(cells[i] for i, _ in batch)
    share = {cell: n / sum(drawn.values()) for cell, n in drawn.items()}
    assert max(share.values()) / min(share.values()) < 1.6  # as stored, the largest cell is 2.2x the smallest
    # The same weights reach a fitted feature model: every cell weighs the same in total.
    totals = Counter()
    for cell, w in zip(cells, data.train_weights, strict=True):
        totals[cell] += w
    assert len(totals) == len(set(cells)) and np.allclose(list(totals.values()), 1.0)
    by_class = apply_overrides(cfg, ["data.balance_by=", "loss.balanced_sampler=true"])
    weights = balancing_weights(by_class, data.train, data.train_targets)
    per_class = np.bincount(data.train_targets, weights=weights)
    assert np.allclose(per_class, 1.0) and balancing_weights(apply_overrides(by_class, ["loss.balanced_sampler=false"]),
                                                             data.train, data.train_targets) is None  # fmt: skip
    with pytest.raises(Exception, match="no 'scanner' column"):
        acquisition_group(data.train[0], "scanner")


def test_size_groups_are_few_and_well_filled_on_any_dataset(tmp_path):
    import cv2

    from liverus.data import Case
    from liverus.data.audit import size_groups
    from liverus.training.datasets import acquisition_groups

    # A common size is a group of its own against the rest (AUL: 1024x768 vs other) ...
    assert size_groups([(1024, 768)] * 3 + [(720, 576), (800, 600)]) == ["1024x768"] * 3 + ["other"] * 2
    # ... many sizes with none common (BUSI-like) split at the median pixel area, one size is one group.
    busi = [(500, 400 + i) for i in range(10)]
    assert size_groups(busi) == ["small"] * 5 + ["large"] * 5
    assert size_groups([(64, 64)] * 4) == ["all"] * 4 and size_groups([]) == []
    # Without orig_width/orig_height in a manifest the sizes come from the files.
    cases = []
    for i, (w, h) in enumerate([(40, 30)] * 3 + [(60, 50), (70, 50)]):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.zeros((h, w), np.uint8))
        cases.append(Case(str(path), "benign"))
    assert acquisition_groups(cases, "size_group") == ["40x30"] * 3 + ["other"] * 2
    with pytest.raises(Exception, match="no 'scanner' column.*size_group"):
        acquisition_groups(cases, "scanner")


def test_balance_by_reads_auls_derived_size_group_and_warns_about_tiny_cells(caplog):
    import logging

    from liverus.data import Case
    from liverus.training import apply_overrides, load_config
    from liverus.training.datasets import acquisition_group, acquisition_groups, balancing_weights

    sizes = [("1024", "768")] * 30 + [("720", "576")] * 15 + [("569", "419")]
    cases = [Case(f"/x/{i}.png", "malignant" if i % 3 else "benign", meta={"orig_width": w, "orig_height": h})
             for i, (w, h) in enumerate(sizes)]  # fmt: skip
    targets = [int(c.label == "malignant") for c in cases]
    assert [acquisition_group(c, "size_group") for c in cases[29:31]] == ["1024x768", "other"]
    assert acquisition_groups(cases, "size_group")[29:31] == ["1024x768", "other"]  # the same, from the sizes
    assert acquisition_group(cases[-1], "image_size") == "569x419"
    fine = apply_overrides(load_config(), ["data.balance_by=size_group"])
    with caplog.at_level(logging.WARNING, logger="liverus.training.datasets"):
        weights = balancing_weights(fine, cases, targets, log_cells=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    totals = Counter()
    for c, t, w in zip(cases, targets, weights, strict=True):
        totals[(t, acquisition_group(c, "size_group"))] += w
    assert len(totals) == 4 and np.allclose(list(totals.values()), 1.0)
    with caplog.at_level(logging.WARNING, logger="liverus.training.datasets"):
        balancing_weights(apply_overrides(fine, ["data.balance_by=image_size"]), cases, targets, log_cells=True)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "fewer than 5 training cases" in warned and "569x419" in warned and "size_group" in warned


def test_attention_supervision_loss_on_known_maps():
    import math

    import torch

    from liverus.training.losses import attention_supervision_loss

    lesion = torch.zeros(2, 1, 8, 8)
    lesion[0, 0, :4, :4] = 1  # image 0: a lesion in the top-left quarter; image 1: none (not counted)
    half = torch.full((2, 1, 4, 4), 0.5)
    assert float(attention_supervision_loss(half, lesion)) == pytest.approx(math.log(2), rel=1e-5)
    perfect = torch.zeros(2, 1, 4, 4)
    perfect[0, 0, :2, :2] = 1
    assert float(attention_supervision_loss(perfect, lesion)) < 1e-4
    assert float(attention_supervision_loss(half, torch.zeros(2, 1, 8, 8))) == 0.0


def test_attention_supervision_needs_spatial_attention():
    from liverus.models import build_model
    from liverus.training.losses import AttentionSupervision

    with pytest.raises(ValueError, match="spatial attention"):
        AttentionSupervision(build_model("baseline_efficientnet_lite0"), 1.0)


def _tiny_runs_with(tmp_path, model_name: str, option: str, values: tuple) -> dict:
    """Three optimiser steps on a small phantom for each value of one option; returns: value -> run folder."""
    from liverus.training import apply_overrides, load_config, train

    base = ["data.image_size=64", "data.phantom_patients=16", "data.phantom_size=96", "data.augment=none",
            f"model.name={model_name}", "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0",
            "runtime.progress=false", "runtime.tensorboard=false", "runtime.precision=fp32"]  # fmt: skip
    runs = {}
    for value in values:
        runs[value] = tmp_path / f"{option}={value}"
        train(apply_overrides(load_config(), [*base, f"{option}={value}"]), runs[value], max_steps=3)
    return runs


@pytest.mark.slow
def test_attention_supervision_changes_what_the_attention_learns(tmp_path):
    import torch

    from liverus.models import load_model

    runs = _tiny_runs_with(tmp_path, "custom_efficientnet_lite0", "loss.attention_weight", (0.0, 5.0))
    weights = {w: load_model(run / "model.pt")[0].head.spatial.conv.weight.detach() for w, run in runs.items()}
    assert not torch.allclose(weights[0.0], weights[5.0])


def test_auxiliary_segmentation_loss_against_the_area_downsampled_mask():
    import torch
    from torch import nn

    from liverus.models import build_model
    from liverus.training.losses import AuxiliaryLosses, AuxiliarySegmentation, dice_bce_loss

    model = build_model("baseline_efficientnet_lite0").train()
    part = AuxiliarySegmentation(model, weight=2.0)
    assert isinstance(model.seg_head, nn.Module) and model.seg_head[0].in_channels == 1280
    fixed = torch.tensor([[-3.0, 3.0], [1.0, -1.0]]).expand(3, 1, 2, 2)

    class KnownLogits(nn.Module):  # stands in for the head: known logits, still in the graph of the features
        def forward(self, feats):
            assert feats.shape == (3, 1280, 2, 2)  # the feature map the classifier's head pools
            return fixed + 0 * feats.mean()

    model.seg_head = KnownLogits()
    lesion = torch.zeros(3, 1, 64, 64)
    lesion[0, 0, :32, 32:] = 1  # image 0: the top-right quarter, exactly one cell of the 2 x 2 map
    lesion[2, 0, :16, :32] = 1  # image 2: half of the top-left cell; image 1 has no lesion and does not count
    aux = AuxiliaryLosses([part])
    model(torch.randn(3, 1, 64, 64))  # EfficientNet-Lite0: 64 px -> a 2 x 2 feature map
    got = aux.loss({"lesion": lesion})
    target = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]], [[[0.5, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(got, 2.0 * dice_bce_loss(fixed[:2], target))
    assert aux.epoch_metrics(aux.epoch_totals())["segmentation_loss"] == pytest.approx(float(got.detach()) / 2)
    model(torch.randn(3, 1, 64, 64))
    no_lesion = aux.loss({"lesion": torch.zeros(3, 1, 64, 64)})
    assert float(no_lesion.detach()) == 0.0  # no lesion in the batch: nothing to learn
    part.close()
    assert not hasattr(model, "seg_head") and not model.head._forward_pre_hooks


def test_auxiliary_segmentation_reaches_the_backbone_and_needs_a_cnn():
    import torch
    from torch import nn

    from liverus.models import build_model
    from liverus.training.losses import AuxiliarySegmentation, dice_bce_loss

    perfect = torch.tensor([[[[-20.0, 20.0], [-20.0, -20.0]]]])
    assert float(dice_bce_loss(perfect, (perfect > 0).float())) < 1e-6
    assert float(dice_bce_loss(-perfect, (perfect > 0).float())) > 1.0
    model = build_model("custom_efficientnet_lite0").train()
    part = AuxiliarySegmentation(model, weight=1.0)
    lesion = torch.zeros(2, 1, 64, 64)
    lesion[:, :, 8:40, 8:40] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in mixed-precision training: bf16 features
        model(torch.randn(2, 1, 64, 64))
    part.loss({"lesion": lesion}).backward()
    assert model.backbone.stem().weight.grad.abs().sum() > 0  # the mask teaches the backbone, not only the head
    assert model.head.fc.weight.grad is None  # the classifier is not in the auxiliary loss's graph
    part.close()
    with pytest.raises(ValueError, match="needs a CNN classifier"):
        AuxiliarySegmentation(nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        AuxiliarySegmentation(build_model("baseline_efficientnet_lite0"), 0.0)


@pytest.mark.slow
def test_auxiliary_segmentation_trains_and_saves_an_ordinary_classifier(tmp_path):
    import csv

    import torch

    from liverus.models import load_model

    runs = _tiny_runs_with(tmp_path, "baseline_efficientnet_lite0", "loss.segmentation_weight", (0.0, 5.0))
    stems = {}
    for w, run in runs.items():
        model, _ = load_model(run / "model.pt")  # strict load: no segmentation head left in the weights
        assert not hasattr(model, "seg_head")
        stems[w] = model.backbone.stem().weight.detach()
    assert not torch.allclose(stems[0.0], stems[5.0])  # the auxiliary loss changed what the backbone learnt
    ckpt = torch.load(runs[5.0] / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("seg_head.") for k in ckpt["model"])  # the checkpoint keeps it for resume
    assert float(next(csv.DictReader((runs[5.0] / "metrics.csv").open()))["segmentation_loss"]) > 0
    assert "segmentation_loss" not in next(csv.DictReader((runs[0.0] / "metrics.csv").open()))


def test_gradient_reversal_flips_and_scales_the_gradient_sign():
    import torch

    from liverus.training.losses import reverse_gradient

    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)  # identity forward
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))


def test_debiasing_reports_how_well_the_adversary_tells_the_group():
    import torch
    from torch import nn

    from liverus.training.losses import AuxiliaryLosses, Debiasing, sum_totals

    model = nn.Module()
    model.head = nn.Module()
    model.head.fc = nn.Linear(2, 2)
    part = Debiasing(model, n_groups=2, weight=1.0)
    with torch.no_grad():  # an adversary that answers the larger feature: group 0 for [1, 0], group 1 for [0, 1]
        model.debias_head = nn.Linear(2, 2, bias=False)
        model.debias_head.weight.copy_(torch.eye(2))
    aux = AuxiliaryLosses([part])
    model.head.fc(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))  # training mode: the hook keeps them
    aux.loss({"group": torch.tensor([0, 1, 1])})  # right, right, wrong
    rank0 = aux.epoch_totals()
    assert aux.epoch_metrics(rank0) == pytest.approx({"debias_group_accuracy": 2 / 3, "debias_group_chance": 2 / 3})
    assert aux.epoch_totals()["debias_correct"] == [0.0]  # the next epoch starts from zero
    rank1 = {"debias_correct": [0.0], "debias_group_counts": [3.0, 0.0]}  # another DDP rank: three misses of group 0
    merged = sum_totals([rank0, rank1])
    assert merged == {"debias_correct": [2.0], "debias_group_counts": [4.0, 2.0]}
    assert aux.epoch_metrics(merged) == pytest.approx({"debias_group_accuracy": 2 / 6, "debias_group_chance": 4 / 6})
    part.close()


@pytest.mark.slow
def test_debiasing_trains_a_group_head_and_saves_an_ordinary_classifier(tmp_path):
    import torch

    from liverus.models import load_model
    from liverus.training import apply_overrides, load_config, train

    cfg = apply_overrides(load_config(), [
        "data.image_size=64", "data.phantom_patients=16", "data.phantom_size=96", "data.augment=none",
        "model.name=baseline_efficientnet_lite0", "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=0",
        "runtime.progress=false", "runtime.tensorboard=false", "loss.debias_by=kind", "loss.debias_weight=0.5",
    ])  # fmt: skip
    train(cfg, tmp_path / "run")
    model, _ = load_model(tmp_path / "run" / "model.pt")  # strict load: no debiasing head left in the weights
    assert not hasattr(model, "debias_head")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("debias_head.") for k in ckpt["model"])  # but the checkpoint keeps it for resume
    # Each epoch's row says how well the adversary told the groups, against the commonest group's share.
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= float(row["debias_group_accuracy"]) <= 1.0 and 0.0 < float(row["debias_group_chance"]) <= 1.0


@pytest.mark.slow
def test_ddp_auxiliary_losses_count_the_images_of_both_ranks(tmp_path):
    import csv

    opts = [*TINY, "optim.epochs=1", "data.augment=none", "optim.freeze_bn=true", "loss.debias_by=kind",
            "loss.segmentation_weight=0.5"]  # fmt: skip
    args = [a for o in opts for a in ("--set", o)]
    single = tmp_path / "single"
    p = _cli("train", "--out", str(single), *args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    shared = ["--set", f"data.source={single / 'phantom'}", "--set", f"data.splits={single / 'splits.json'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "liverus.cli",
           "train", "--out", str(tmp_path / "ddp"), *args, *shared]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [next(csv.DictReader((run / "metrics.csv").open())) for run in (single, tmp_path / "ddp")]
    # Each rank saw half the training images; the epoch's group counts are those of all of them, as in one process.
    assert rows[0]["debias_group_chance"] == rows[1]["debias_group_chance"]
    assert float(rows[0]["debias_group_accuracy"]) == pytest.approx(float(rows[1]["debias_group_accuracy"]), abs=0.05)
    # The segmentation head's loss is the mean over both ranks' batches, as one process sees it.
    assert float(rows[0]["segmentation_loss"]) == pytest.approx(float(rows[1]["segmentation_loss"]), abs=0.05)
    ddp_model = load_model(tmp_path / "ddp" / "model.pt")[0]
    assert not hasattr(ddp_model, "debias_head") and not hasattr(ddp_model, "seg_head")


def test_default_config_lists_every_key():
    import yaml

    from liverus.training.config import TrainConfig, config_to_dict

    listed = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text())
    for section, keys in config_to_dict(TrainConfig()).items():
        assert set(keys) == set(listed[section]), section
        # ... with the dataclasses' default values, so the file cannot say another default than the code.
        differ = {k: (listed[section][k], v) for k, v in keys.items() if listed[section][k] != v}
        assert not differ, f"configs/default.yaml {section}: (file, code) {differ}"


def test_resume_check_compares_paths_by_where_they_point_and_new_keys_by_default(tmp_path, monkeypatch):
    from liverus.training.run_folder import changed_keys

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    absolute = {"data": {"source": str(tmp_path / "data"), "image_size": 64}, "model": {"weights": "imagenet"}}
    relative = {"data": {"source": "../data", "image_size": 64}, "model": {"weights": "imagenet"}}
    assert changed_keys(absolute, relative) == []
    elsewhere = {"data": {"source": "../other", "image_size": 64}, "model": {"weights": "imagenet"}}
    assert changed_keys(absolute, elsewhere) == [f"data.source ({str(tmp_path / 'data')!r} -> '../other')"]
    # A key written before it existed matches its default, and only its default.
    older = {"model": {"pca_dim": 32}, "data": {"source": "../data"}}
    assert changed_keys(older, {"model": {"pca_dim": 32, "flip_features": False}, "data": {"source": "../data"}}) == []
    assert changed_keys(older, {"model": {"pca_dim": 32, "flip_features": True}, "data": {"source": "../data"}}) == [
        "model.flip_features (absent -> True)"
    ]
    # Only path keys are resolved: a string elsewhere compares as written, and 'imagenet' is never a path.
    assert changed_keys({"model": {"weights": "imagenet"}}, {"model": {"weights": "./imagenet"}})
    assert changed_keys({"loss": {"name": "ce"}}, {"loss": {"name": "./ce"}})


def test_a_removed_option_left_off_in_a_saved_run_config_still_loads_and_resumes(tmp_path):
    import yaml

    from liverus.training.config import config_to_dict
    from liverus.training.run_folder import changed_keys

    # Run folders written while data.context_margin existed hold it at its off value.
    saved = config_to_dict(load_config())
    saved["data"]["context_margin"] = 0.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    cfg = load_config(tmp_path / "config.yaml")
    assert config_to_dict(cfg) == config_to_dict(load_config())
    assert changed_keys(saved, config_to_dict(cfg)) == []
    on = {**saved, "data": {**saved["data"], "context_margin": 1.5}}
    assert changed_keys(on, config_to_dict(cfg)) == ["data.context_margin (1.5 -> absent)"]
