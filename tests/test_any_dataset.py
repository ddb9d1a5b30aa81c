"""The recommended recipe (configs/aul_final.yaml) runs unchanged on every layout liverus reads, and lesion models
train, cross-validate and evaluate from boxes alone."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from liverus.training import apply_overrides, load_config

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "aul_final.yaml"
# The recipe as shipped, made small: every other key (balance_by: size_group, group_by: near_duplicates, scan_view,
# box copies and averaging, turns and zooms, the ensemble) stays as it is.
RECIPE_TINY = ["data.image_size=64", "model.ensemble=2", "runtime.progress=false"]


def _phantom(tmp_path: Path, n_patients: int = 24) -> list:
    from liverus.data import make_phantom_dataset

    return make_phantom_dataset(tmp_path / "phantom", n_patients=n_patients, frames=(1, 1), size=128, seed=3,
                                include_normal=True)  # fmt: skip


def _busi_layout(cases: list, root: Path) -> Path:
    """The public breast-ultrasound release's layout: ``class/name (i).png`` with ``name (i)_mask.png`` beside it
    (an empty mask for normal images), images of many sizes."""
    rng = np.random.default_rng(0)
    for i, case in enumerate(cases, start=1):
        img = cv2.imread(case.path, cv2.IMREAD_GRAYSCALE)
        size = (int(rng.integers(100, 180)), int(rng.integers(90, 150)))  # (width, height): no size is common
        mask = cv2.imread(case.mask, cv2.IMREAD_GRAYSCALE) if case.mask else np.zeros_like(img)
        folder = root / case.label
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{case.label} ({i}).png"), cv2.resize(img, size, interpolation=cv2.INTER_AREA))
        cv2.imwrite(
            str(folder / f"{case.label} ({i})_mask.png"), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        )
    return root


def _folder_layout(cases: list, root: Path) -> Path:
    """Class folders with masks in a parallel ``masks/`` tree, and no manifest."""
    shutil.copytree(Path(cases[0].path).parents[1], root, ignore=shutil.ignore_patterns("manifest.csv"))
    return root


def _box_manifest(cases: list, path: Path) -> Path:
    """A manifest with a lesion box per image and no masks (as many clinical datasets carry)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "box"])
        for c in cases:
            box = ""
            if c.mask:
                ys, xs = np.nonzero(cv2.imread(c.mask, cv2.IMREAD_GRAYSCALE))
                box = f"{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}"
            w.writerow([c.path, c.label, c.group, box])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "manifest", "busi", "boxes"])
def test_the_recommended_recipe_runs_unchanged_on_every_layout(tmp_path, layout, caplog):
    import logging

    from liverus.data import load_cases
    from liverus.engine.predictor import Predictor
    from liverus.models import load_model
    from liverus.training import train

    cases = _phantom(tmp_path)
    data = {
        "folder": lambda: _folder_layout(cases, tmp_path / "folder"),
        "manifest": lambda: Path(cases[0].path).parents[1] / "manifest.csv",
        "busi": lambda: _busi_layout(cases, tmp_path / "busi"),
        "boxes": lambda: _box_manifest(cases, tmp_path / "boxes.csv"),
    }[layout]()
    loaded = [c for c in load_cases(data) if c.label != "normal"]
    assert {c.lesion_source for c in loaded} == {"box" if layout == "boxes" else "mask"}
    cfg = apply_overrides(load_config(RECIPE), [f"data.source={data}", *RECIPE_TINY])
    with caplog.at_level(logging.INFO, logger="liverus"):
        train(cfg, tmp_path / "run")
    _, card = load_model(tmp_path / "run" / "model.pt")
    assert card.members == 2 and 0 < card.threshold < 1
    log = caplog.text
    # Every layout is balanced over class x an image-size group it has: BUSI-like sizes (none common) split at the
    # median pixel area; the phantom's images share one size.
    group = "'small'" if layout == "busi" else "'all'"
    assert "balanced over class x size_group" in log and group in log
    if layout == "boxes":
        assert "from boxes alone" in log
    # The model scores a new image from a box.
    pred = Predictor.from_path(tmp_path / "run" / "model.pt")
    image = cv2.imread(loaded[0].path, cv2.IMREAD_GRAYSCALE)
    (out,) = pred.predict([image], boxes=[(30.0, 30.0, 80.0, 80.0)])
    assert 0 <= out.probability <= 1
    if layout == "manifest":
        _explains_like_the_recommended_model(pred, out)


def _explains_like_the_recommended_model(pred, out) -> None:
    """What a user of the recommended model is shown besides the probability: the fold models' range, an occlusion
    map of both views, and contributions against reference lesions with the training lesions of each class."""
    low, high = pred.member_range([out.preprocessed])[0]
    assert 0 <= low <= out.probability <= high <= 1
    assert pred.default_method == "occlusion" and pred.methods == ("occlusion", "occlusion_views", "gradcam")
    assert pred.view_names() == ["lesion crop", "whole scan"]
    assert pred.attribution([out.preprocessed], views=1).shape == (1, 1, 64, 64)  # the default map: the crop's
    maps = pred.attribution([out.preprocessed])
    assert maps.shape == (1, 2, 64, 64) and np.isfinite(maps).all()  # (this tiny model's maps are flat: see below)
    found = pred.contributions([out.preprocessed])
    assert np.log(out.probability / (1 - out.probability)) == pytest.approx(
        found.baseline[0] + found.values[0].sum(), abs=1e-4
    )
    context = found.training_context()
    assert set(context) == set(found.groups) and len(found.groups) == 6
    assert all(q == sorted(q) for group in context.values() for q in group.values())
    assert 0.05 < float(found.baseline_probability[0]) < 0.95  # a typical lesion of either class, not one class
    # (Fitted on 11 phantom cases, this model's SVM answers every new image alike: a few deep features hardly vary
    # over the training images, so a new image lies far from every support vector. Maps that follow the score are
    # tested on models that do depend on their input: tests/test_explanations.py.)


def test_a_manifests_box_is_the_lesion_of_an_image_without_a_mask(tmp_path):
    from liverus.data import CaseCache, DataError, cases_from_manifest, write_manifest
    from liverus.training.datasets import check_lesions

    cases = _phantom(tmp_path)
    boxes = cases_from_manifest(_box_manifest(cases, tmp_path / "boxes.csv"))
    lesion = next(c for c in boxes if c.label != "normal")
    assert lesion.mask is None and lesion.box is not None and lesion.lesion_source == "box"
    assert next(c for c in boxes if c.label == "normal").lesion_source == "none"
    # Written back and read again, the box survives; four x0..y1 columns work as well as one box column.
    write_manifest(boxes, tmp_path / "again.csv")
    assert [c.box for c in cases_from_manifest(tmp_path / "again.csv")] == [c.box for c in boxes]
    x0, y0, x1, y1 = lesion.box
    four = tmp_path / "four.csv"
    four.write_text(f"path,label,x0,y0,x1,y1\n{lesion.path},malignant,{x0},{y0},{x1},{y1}\n")
    assert cases_from_manifest(four)[0].box == lesion.box
    # The lesion mask of a box-only case is what a user's box gives at inference: GrabCut's outline inside the box.
    cfg = apply_overrides(load_config(RECIPE), ["data.image_size=64"]).data.preprocess()
    arr = CaseCache(cfg).get(lesion)
    assert arr[-1].any()  # the lesion channel
    # A malformed or empty box is refused with its line; a box outside the image names the image.
    bad = tmp_path / "bad.csv"
    bad.write_text(f'path,label,box\n{lesion.path},malignant,"1,2,3"\n')
    with pytest.raises(DataError, match="line 2: the lesion box must be x0,y0,x1,y1"):
        cases_from_manifest(bad)
    bad.write_text(f'path,label,box\n{lesion.path},malignant,"10,10,5,20"\n')
    with pytest.raises(DataError, match="line 2: the box '10,10,5,20' is empty"):
        cases_from_manifest(bad)
    bad.write_text(f'path,label,box\n{lesion.path},malignant,"500,500,600,600"\n')
    with pytest.raises(DataError, match="does not lie inside the 128x128 image"):
        CaseCache(cfg).get(cases_from_manifest(bad)[0])
    # A lesion model stops before any work when an image has neither a mask nor a box, and says what to do.
    bare = tmp_path / "bare.csv"
    bare.write_text(f"path,label,box\n{lesion.path},malignant,\n")
    recipe = apply_overrides(load_config(RECIPE), [])
    with pytest.raises(DataError, match="neither a lesion mask nor a box.*add a mask or a box column"):
        check_lesions(recipe, cases_from_manifest(bare))
    check_lesions(apply_overrides(recipe, ["data.skip_bad=true"]), cases_from_manifest(bare))  # listed, not fatal


@pytest.mark.slow
def test_lesion_models_cross_validate_and_evaluate_from_boxes_alone(tmp_path):
    from liverus.evaluation.report import evaluate_checkpoint
    from liverus.training.experiments import run_study

    cases = _phantom(tmp_path, n_patients=40)
    boxes = _box_manifest(cases, tmp_path / "boxes.csv")
    cfg = apply_overrides(
        load_config(),
        [f"data.source={boxes}", "data.image_size=64", "data.crop=roi", "data.lesion_channel=true",
         "data.augment=none", "data.box_average=2", "model.name=radiomics_svm", "runtime.progress=false",
         "runtime.tensorboard=false"],
    )  # fmt: skip
    summary = run_study(cfg, tmp_path / "cv", models=["radiomics_svm"], k=2, n_boot=50)
    assert 0 <= summary["pooled"]["radiomics_svm"]["auc_delong"]["auc"] <= 1
    # Evaluated from the same boxes: the report says so, and each probability averages the card's two boxes.
    model = tmp_path / "cv" / "radiomics_svm" / "fold0" / "model.pt"
    evaluate_checkpoint(model, boxes, tmp_path / "eval", n_boot=50)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["lesion"]["sources"] == {"box": sum(c.label != "normal" for c in cases)}
    assert metrics["lesion"]["box_average"] == 2
    assert "from the boxes in the manifest alone" in (tmp_path / "eval" / "report.html").read_text()
    # ... and a box-only case gets from evaluate what predict gives its image and box.
    import csv

    from liverus.data import cases_from_manifest
    from liverus.engine.predictor import Predictor

    case = next(c for c in cases_from_manifest(boxes) if c.box is not None)
    scored = {
        r["path"]: float(r["p_malignant"]) for r in csv.DictReader((tmp_path / "eval" / "predictions.csv").open())
    }
    image = cv2.imread(case.path, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    (answer,) = Predictor.from_path(model).predict([image], boxes=[case.box])
    assert answer.probability == pytest.approx(scored[case.path], abs=1e-5)


def test_class_folders_with_images_and_masks_sub_folders(tmp_path):
    """A common public layout: ``class/images/x.png`` with ``class/masks/x.png`` (or ``x_mask.png``), and masks
    beside the images in ``class/masks/``: the masks are masks, never images of the class."""
    from liverus.data import load_cases

    cases = _phantom(tmp_path)
    root = tmp_path / "kaggle"
    for i, case in enumerate(c for c in cases if c.label != "normal"):
        images, masks = root / case.label / "images", root / case.label / "masks"
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        shutil.copy(case.path, images / f"case{i}.png")
        shutil.copy(case.mask, masks / (f"case{i}_mask.png" if i % 2 else f"case{i}.png"))
    loaded = load_cases(root)
    assert len(loaded) == sum(c.label != "normal" for c in cases)  # no mask read as an image
    assert all(c.mask and "/masks/" in c.mask and Path(c.mask).stem.startswith(Path(c.path).stem) for c in loaded)
    # Masks beside the images (no images/ sub-folder) work the same.
    flat = tmp_path / "flat" / "benign"
    (flat / "masks").mkdir(parents=True)
    one = next(c for c in cases if c.label == "benign")
    shutil.copy(one.path, flat / "a.png")
    shutil.copy(one.mask, flat / "masks" / "a.png")
    (case,) = load_cases(tmp_path / "flat")
    assert case.mask == str(flat / "masks" / "a.png")
