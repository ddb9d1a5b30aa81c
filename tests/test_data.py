"""Data layer: readers, case tables, preprocessing, cache, splits, audit, phantom and every kind of bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from liverus.data import (
    Case,
    CaseCache,
    DataError,
    PreprocessConfig,
    UltrasoundDataset,
    audit_cases,
    build_train_transform,
    cases_from_aul_release,
    cases_from_folder,
    cases_from_manifest,
    check_disjoint,
    detect_scan_area,
    kfold_splits,
    load_cases,
    load_splits,
    make_phantom_dataset,
    prepare_cases,
    preprocess,
    read_image,
    read_mask,
    save_splits,
    select_task,
    train_val_test_split,
)


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _gray(h=64, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_read_8bit_formats(tmp_path, suffix):
    img = _gray()
    p = _write(tmp_path / f"a{suffix}", img)
    out = read_image(p)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    if suffix != ".jpg":
        np.testing.assert_allclose(out, img / 255.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_16bit_is_scaled_by_full_range(tmp_path, suffix):
    img = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    p = _write(tmp_path / f"a{suffix}", img)
    np.testing.assert_allclose(read_image(p), img / 65535.0, atol=1e-6)


def test_read_colour_becomes_gray(tmp_path):
    bgr = np.zeros((32, 32, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    out = read_image(_write(tmp_path / "c.png", bgr))
    assert abs(out.mean() - 0.299 * 200 / 255) < 0.01


def _dicom(path: Path, arr: np.ndarray, photometric: str, bits: int = 8, frames: int = 1):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "US"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape[-3:-1] if arr.ndim - (frames > 1) == 3 else arr.shape[-2:]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if photometric in ("RGB", "YBR_FULL") else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome2_16bit(tmp_path):
    arr = (np.arange(32 * 32).reshape(32, 32) * 4).astype(np.uint16)
    out = read_image(_dicom(tmp_path / "a.dcm", arr, "MONOCHROME2", bits=16))
    np.testing.assert_allclose(out, arr / 65535.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    arr = np.full((32, 32), 250, np.uint8)
    out = read_image(_dicom(tmp_path / "a.dcm", arr, "MONOCHROME1"))
    assert out.mean() < 0.05


def test_dicom_rgb_and_ybr(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 1] = 200
    out_rgb = read_image(_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    assert abs(out_rgb.mean() - 0.587 * 200 / 255) < 0.01
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out_ybr = read_image(_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert abs(out_ybr.mean() - out_rgb.mean()) < 0.02


def test_dicom_cine_frame_choice(tmp_path):
    cine = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 100, 200)])
    p = _dicom(tmp_path / "cine.dcm", cine, "MONOCHROME2", frames=3)
    assert abs(read_image(p).mean() - 100 / 255) < 1e-3  # middle frame by default
    assert abs(read_image(p, frame=2).mean() - 200 / 255) < 1e-3
    with pytest.raises(DataError, match="cine.dcm.*frame 5.*3 frames"):
        read_image(p, frame=5)


def test_dicom_without_pixels_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20)
    with pytest.raises(DataError, match="bad.dcm"):
        read_image(p)


# ---------------------------------------------------------------- bad input


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: file is empty"):
        read_image(p)


def test_unreadable_file(tmp_path):
    p = tmp_path / "junk.png"
    p.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"junk\.png: could not be decoded"):
        read_image(p)


def test_truncated_jpeg(tmp_path):
    full = _write(tmp_path / "full.jpg", _gray(128, 128))
    data = full.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg"):
        read_image(p)


def test_unknown_format(tmp_path):
    p = tmp_path / "a.gif"
    p.write_bytes(b"GIF89a....")
    with pytest.raises(DataError, match="unknown image format"):
        read_image(p)


def test_mask_of_another_size(tmp_path):
    p = _write(tmp_path / "m.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"m\.png: mask is 10x10 px but its image is 80x64"):
        read_mask(p, (64, 80))


def test_unknown_label_in_manifest(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("path,label\na.png,benign\nb.png,cancerous\n")
    with pytest.raises(DataError, match=r"manifest\.csv: line 3: unknown label 'cancerous'"):
        cases_from_manifest(m)


def test_manifest_missing_column(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("file,label\na.png,benign\n")
    with pytest.raises(DataError, match="missing column"):
        cases_from_manifest(m)


def test_duplicate_paths(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("path,label\na.png,benign\n./a.png,malignant\n")
    with pytest.raises(DataError, match="duplicate image paths"):
        cases_from_manifest(m)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="empty folder"):
        load_cases(tmp_path)
    (tmp_path / "benign").mkdir()
    with pytest.raises(DataError, match="no images found"):
        cases_from_folder(tmp_path)


def test_unknown_class_folder(tmp_path):
    _write(tmp_path / "suspicious" / "a.png", _gray())
    with pytest.raises(DataError, match="unknown class folder 'suspicious'"):
        cases_from_folder(tmp_path)


def test_too_few_groups_for_k_folds():
    cases = [Case(f"/x/b{i}.png", "benign", "g1") for i in range(5)]
    cases += [Case(f"/x/m{i}.png", "malignant", f"m{i}") for i in range(10)]
    with pytest.raises(DataError, match="class 'benign' has only 1 group.*5 folds"):
        kfold_splits(cases, 5)


def test_prepare_lists_bad_files_with_skip_bad(tmp_path):
    good = _write(tmp_path / "benign" / "good.png", _gray())
    bad = tmp_path / "benign" / "bad.png"
    bad.write_bytes(b"")
    wrong_mask = _write(tmp_path / "malignant" / "m.png", _gray())
    _write(tmp_path / "masks" / "malignant" / "m.png", np.zeros((5, 5), np.uint8))
    cases = cases_from_folder(tmp_path)
    assert [Path(c.path).name for c in cases] == ["bad.png", "good.png", "m.png"]
    cache = CaseCache(PreprocessConfig(image_size=32, crop="none"))
    with pytest.raises(DataError, match=r"bad\.png: file is empty.*1 more bad file"):
        prepare_cases(cases, cache)
    usable, skipped = prepare_cases(cases, cache, skip_bad=True)
    assert [c.path for c in usable] == [str(good.resolve())]
    assert {Path(p).name for p, _ in skipped} == {"bad.png", "m.png"}
    assert any("mask is 5x5" in problem for _, problem in skipped)
    assert wrong_mask.exists()


# ---------------------------------------------------------------- case tables


def test_folder_with_parallel_masks_and_suffix_masks(tmp_path):
    _write(tmp_path / "benign" / "a.png", _gray())
    _write(tmp_path / "masks" / "benign" / "a.png", np.zeros((64, 80), np.uint8))
    _write(tmp_path / "malignant" / "b.png", _gray())
    _write(tmp_path / "malignant" / "b_mask.png", np.zeros((64, 80), np.uint8))
    cases = cases_from_folder(tmp_path)
    assert len(cases) == 2  # the _mask file is not an image of its own
    assert all(c.mask and Path(c.mask).is_file() for c in cases)


def test_manifest_keeps_metadata_and_groups(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("path,label,group,scanner\na.png,benign,p1,X\nb.png,malignant,,Y\n")
    cases = cases_from_manifest(m)
    assert cases[0].group == "p1" and cases[0].meta["scanner"] == "X"
    assert cases[1].group_key.startswith("__own__")


def test_aul_compact_import_matches_manifest(aul_root):
    cases = load_cases(aul_root)
    with open(aul_root / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(cases) == len(rows) == 581
    for label in ("benign", "malignant", "normal"):
        assert sum(c.label == label for c in cases) == sum(r["label"] == label for r in rows)
    assert sum(bool(c.group) for c in cases) == sum(bool(r["near_dup_group"]) for r in rows)
    binary, classes = select_task(cases, "binary")
    assert classes == ("benign", "malignant") and len(binary) == 501


def test_aul_release_layout_import(tmp_path, aul_root):
    polys = json.loads((aul_root / "polygons_original.json").read_text())
    picked = ["benign/benign_0002.png", "malignant/malignant_0004.png", "normal/normal_0001.png"]
    picked = [p for p in picked if (aul_root / p).is_file()][:3] or list(polys)[:3]
    for rel in picked:
        cls, name = rel.split("/")
        n = int(name.split("_")[1].split(".")[0])
        img = cv2.imread(str(aul_root / rel), cv2.IMREAD_GRAYSCALE)
        _write(tmp_path / cls.capitalize() / "image" / f"{n}.jpg", img)
        entry = polys[rel]
        scale = json.loads(entry["scale_xy"]) if isinstance(entry["scale_xy"], str) else entry["scale_xy"]
        mass = entry.get("mass")
        if mass:
            pts = json.loads(mass) if isinstance(mass, str) else mass
            seg = tmp_path / cls.capitalize() / "segmentation" / "mass" / f"{n}.json"
            seg.parent.mkdir(parents=True, exist_ok=True)
            seg.write_text(json.dumps([[x * scale[0], y * scale[1]] for x, y in pts]))
    cases = load_cases(tmp_path)
    assert sorted(c.label for c in cases) == sorted(r.split("/")[0] for r in picked)
    with_poly = [c for c in cases if c.polygon]
    assert len(with_poly) == sum(r.split("/")[0] != "normal" for r in picked)
    # The polygon becomes a mask close to the shipped mass mask.
    for c in with_poly:
        arr = CaseCache(PreprocessConfig(image_size=128, crop="none", letterbox=True)).get(c)
        assert arr[2].sum() > 0
    assert cases_from_aul_release(tmp_path)


# ---------------------------------------------------------------- preprocessing


def test_scan_area_detection_matches_expert_outlines(aul_root):
    with open(aul_root / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))[::20]
    ious = []
    for r in rows:
        img = read_image(aul_root / r["path"])
        ref = read_mask(aul_root / r["outline_mask"], img.shape)
        det = detect_scan_area(img)
        ious.append((det & ref).sum() / (det | ref).sum())
    assert np.mean(ious) > 0.85, np.mean(ious)


def test_fan_crop_removes_text_outside_scan(phantom_dir):
    case = load_cases(phantom_dir)[0]
    img = read_image(case.path)
    assert img[:16, :60].max() > 0.5  # burned-in text in the corner
    out = preprocess(img, PreprocessConfig(image_size=128, crop="fan"))
    assert out.image.shape == (128, 128)
    # Outside the detected fan everything is black.
    assert out.image[out.scan == 0].max() == 0


def test_roi_crop_centres_the_lesion_and_needs_a_mask():
    img = np.zeros((200, 300), np.float32)
    lesion = np.zeros((200, 300), np.uint8)
    lesion[50:70, 200:240] = 1
    img[lesion == 1] = 1.0
    out = preprocess(img, PreprocessConfig(image_size=64, crop="roi", roi_margin=0.5), lesion=lesion)
    ys, xs = np.nonzero(out.lesion)
    assert abs(xs.mean() - 32) < 3 and abs(ys.mean() - 32) < 3
    assert 0.1 < out.lesion.mean() < 0.15  # 40x20 lesion in an 80x80 crop (margin 0.5 on each side)
    with pytest.raises(ValueError, match="roi"):
        preprocess(img, PreprocessConfig(image_size=64, crop="roi"))


def test_letterbox_keeps_aspect_ratio():
    img = np.ones((100, 200), np.float32)
    out = preprocess(img, PreprocessConfig(image_size=64, crop="none", letterbox=True))
    assert out.image[:16].max() == 0 and out.image[16:48].min() == 255
    out = preprocess(img, PreprocessConfig(image_size=64, crop="none", letterbox=False))
    assert out.image.min() == 255


def test_bad_preprocess_config():
    with pytest.raises(ValueError, match="crop"):
        PreprocessConfig(crop="lesion")
    with pytest.raises(ValueError, match="image_size"):
        PreprocessConfig(image_size=8)


# ---------------------------------------------------------------- cache and dataset


def test_cache_decodes_once_and_persists(phantom_dir, tmp_path):
    cases = load_cases(phantom_dir)[:6]
    cfg = PreprocessConfig(image_size=64)
    cache = CaseCache(cfg, tmp_path / "c")
    prepare_cases(cases, cache)
    assert cache.misses == 6
    ds = UltrasoundDataset(cases, ("benign", "malignant"), cache, build_train_transform("strong"), seed=3)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
    assert cache.misses == 6 and cache.hits >= 12
    fresh = CaseCache(cfg, tmp_path / "c")  # a new process finds the files on disk
    np.testing.assert_array_equal(fresh.get(cases[0]), cache.get(cases[0]))
    assert fresh.misses == 0
    other = CaseCache(PreprocessConfig(image_size=96), tmp_path / "c")
    assert other.get(cases[0]).shape == (3, 96, 96) and other.misses == 1


def test_augmentation_is_seeded_per_sample_and_epoch(phantom_dir):
    cases = load_cases(phantom_dir)[:2]
    cache = CaseCache(PreprocessConfig(image_size=64))
    ds = UltrasoundDataset(cases, ("benign", "malignant"), cache, build_train_transform("strong"), seed=7)
    a0 = [ds[i][0].clone() for i in range(2)]
    again = [ds[i][0] for i in range(2)]
    assert all((x == y).all() for x, y in zip(a0, again, strict=True))
    ds.set_epoch(1)
    assert any((x != y).any() for x, y in zip(a0, [ds[i][0] for i in range(2)], strict=True))
    img, target = ds[0]
    assert img.dtype.is_floating_point is False and img.shape == (1, 64, 64) and target in (0, 1)


def test_dataset_rejects_labels_outside_classes():
    with pytest.raises(DataError, match="normal"):
        UltrasoundDataset([Case("/x.png", "normal")], ("benign", "malignant"), CaseCache(PreprocessConfig()))


def test_unknown_augment_level():
    with pytest.raises(ValueError, match="augment"):
        build_train_transform("extreme")


# ---------------------------------------------------------------- splits


def test_kfold_groups_never_cross(aul_root):
    cases, _ = select_task(load_cases(aul_root), "binary")
    folds = kfold_splits(cases, 5, seed=0)
    assert len(folds) == 5
    allval = [p for f in folds for p in f["val"]]
    assert sorted(allval) == sorted(c.path for c in cases)  # every case validated exactly once
    for f in folds:
        check_disjoint(cases, f)
        frac = np.mean([c.label == "malignant" for c in cases if c.path in set(f["val"])])
        assert 0.6 < frac < 0.77  # stratified: about 342/501 = 0.68


def test_check_disjoint_catches_leak():
    cases = [Case("/a.png", "benign", "g"), Case("/b.png", "benign", "g")]
    with pytest.raises(DataError, match="group 'g'"):
        check_disjoint(cases, {"train": ["/a.png"], "val": ["/b.png"]})


def test_train_val_test_split_and_reuse(phantom_dir, tmp_path):
    cases = load_cases(phantom_dir)
    split = train_val_test_split(cases, 0.2, 0.2, seed=0)
    check_disjoint(cases, split)
    assert sum(len(v) for v in split.values()) == len(cases)
    path = tmp_path / "splits.json"
    save_splits(path, {"folds": [split]})
    assert load_splits(path, cases)["folds"][0] == split
    with pytest.raises(DataError, match="not in the data"):
        load_splits(path, cases[:5])
    # No validation part (a feature model's run): the same test part, every other case in training.
    no_val = train_val_test_split(cases, 0.0, 0.2, seed=0)
    assert no_val["val"] == [] and no_val["test"] == split["test"]
    assert sorted(no_val["train"]) == sorted(split["train"] + split["val"])
    for bad in (-0.1, 1.0, 0.9):
        with pytest.raises(ValueError, match="bad split fractions"):
            train_val_test_split(cases, bad, 0.2, seed=0)


# ---------------------------------------------------------------- audit


def test_audit_flags_aul_size_shortcut(aul_root):
    report = audit_cases(load_cases(aul_root))
    assert report["counts"] == {"benign": 159, "malignant": 342, "normal": 80}
    assert report["shortcut"]["auc"] > 0.7
    assert "SHORTCUT" in report["shortcut"]["warning"]
    same_group = sum(n["same_group"] for n in report["near_duplicates"])
    assert same_group >= 20  # most of the dataset's known near-duplicate frames are found


def test_audit_on_phantom_has_no_shortcut_but_finds_duplicates(phantom_dir, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(phantom_dir, data)
    first = sorted((data / "benign").glob("*.png"))[0]
    shutil.copy(first, data / "benign" / "copy_of_first.png")
    shutil.copy(first, data / "benign" / "copy_of_first.png")
    cases = cases_from_folder(data)
    report = audit_cases(cases)
    assert report["shortcut"]["warning"] is None
    assert any(str(first.name) in " ".join(s) for s in report["exact_duplicates"])


# ---------------------------------------------------------------- phantom


def test_phantom_is_reproducible_and_grouped(tmp_path):
    a = make_phantom_dataset(tmp_path / "a", n_patients=6, size=96, seed=5)
    b = make_phantom_dataset(tmp_path / "b", n_patients=6, size=96, seed=5)
    assert [c.label for c in a] == [c.label for c in b]
    for x, y in zip(a, b, strict=True):
        assert Path(x.path).read_bytes() == Path(y.path).read_bytes()
    assert len({c.group for c in a}) == 6 and all(c.mask for c in a)
    three = make_phantom_dataset(tmp_path / "c", n_patients=20, size=96, include_normal=True)
    assert {c.label for c in three} == {"benign", "malignant", "normal"}


def test_phantom_labels_are_learnable_from_simple_features(phantom_dir):
    # Heterogeneity and darkness below the lesion separate the classes: a linear model on two hand features
    # already does well, so a CNN has something real to learn.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    cases = load_cases(phantom_dir)
    X, y = [], []
    for c in cases:
        img = read_image(c.path)
        m = read_mask(c.mask, img.shape).astype(bool)
        ys, xs = np.nonzero(m)
        below = img[ys.max() : ys.max() + 20, xs.min() : xs.max()]
        X.append([img[m].std(), img[m].mean(), below.mean()])
        y.append(c.label == "malignant")
    score = cross_val_score(LogisticRegression(max_iter=1000), np.array(X), np.array(y), cv=4, scoring="roc_auc")
    assert score.mean() > 0.75


def test_cache_lives_in_the_run_folder_and_can_be_cleared(phantom_dir, tmp_path, monkeypatch):
    from liverus.data import clear_cache, default_cache_dir

    monkeypatch.delenv("LIVERUS_CACHE", raising=False)
    run = tmp_path / "run"
    assert default_cache_dir(run) == run / "cache"
    cache = CaseCache(PreprocessConfig(image_size=64), default_cache_dir(run))
    cases = load_cases(phantom_dir)[:3]
    for c in cases:
        cache.get(c)
    stored = list((run / "cache").rglob("*.npy"))
    assert len(stored) == 3
    keep = run / "predictions.csv"
    keep.write_text("not a cache file")
    files, n_bytes = clear_cache(run)
    assert files == 3 and n_bytes > 0 and not (run / "cache").exists() and keep.is_file()
    monkeypatch.setenv("LIVERUS_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir(run) == tmp_path / "elsewhere"


def test_groups_from_near_duplicates_keep_pairs_together_and_name_conflicts(tmp_path):
    from liverus.data import apply_grouping, kfold_splits, write_manifest

    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):
        base = cv2.GaussianBlur(rng.random((96, 128)).astype(np.float32), (0, 0), 1.5)
        for j in range(2):  # two frames of one scan under different names, no patient IDs
            frame = np.clip(base + rng.normal(0, 0.002, base.shape), 0, 1)
            p = tmp_path / f"img_{i}_{j}.png"
            cv2.imwrite(str(p), (frame * 255).astype(np.uint8))
            label = "malignant" if i % 2 else "benign"
            if i == 0 and j == 1:
                label = "malignant"  # one pair with conflicting labels
            cases.append(Case(str(p), label))
    write_manifest(cases, tmp_path / "m.csv")
    grouped, conflicts = apply_grouping(cases, "near_duplicates")
    assert len({c.group_key for c in grouped}) == 12
    assert [(Path(c["a"]).name, Path(c["b"]).name) for c in conflicts] == [("img_0_0.png", "img_0_1.png")]
    same, _ = apply_grouping(cases, "source")
    assert len({c.group_key for c in same}) == 24  # one group per image: pairs could be split
    for fold in kfold_splits([c for c in grouped if c.label == "benign" or not c.path.endswith("_0_1.png")], 2):
        train = {Path(p).name.rsplit("_", 1)[0] for p in fold["train"]}
        val = {Path(p).name.rsplit("_", 1)[0] for p in fold["val"]}
        assert not train & val
    with pytest.raises(ValueError, match="unknown grouping"):
        apply_grouping(cases, "patients")


def test_write_png_round_trips_gray_and_rgb_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import cv2

    import liverus.utils
    from liverus.data.io import write_png

    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB order
    write_png(tmp_path / "sub" / "g.png", gray)
    write_png(tmp_path / "c.png", rgb, rgb=True)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "sub" / "g.png"), cv2.IMREAD_UNCHANGED), gray)
    assert tuple(cv2.imread(str(tmp_path / "c.png"))[0, 0]) == (0, 0, 200)  # OpenCV reads BGR: red is last
    before = (tmp_path / "sub" / "g.png").read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(liverus.utils.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_png(tmp_path / "sub" / "g.png", 255 - gray)
    assert (tmp_path / "sub" / "g.png").read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["g.png"]  # and no temporary file is left
