"""Hostile and odd input (tests/bad_inputs.py writes the corpus): every kind gets a clear message naming the file and
the problem, good files in the same batch still get results, and no traceback ever reaches the user."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from bad_inputs import write_corpus, write_non_utf8_image
from helpers import run_cli
from liverus.data import DataError, load_cases, read_image
from liverus.data.uploads import decode_upload


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder)


def test_the_corpus_covers_at_least_forty_kinds(corpus):
    _, kinds = corpus
    assert len(kinds) >= 40 and sum(not k.good for k in kinds) >= 30


def test_every_kind_is_read_or_refused_with_a_clear_message(corpus):
    folder, kinds = corpus
    for k in kinds:
        path = folder / k.name
        if k.good:
            img = read_image(path)
            assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1 and min(img.shape) >= 16, k.name
            continue
        with pytest.raises(DataError) as info:
            read_image(path)
        msg = str(info.value)
        assert k.name in msg, msg  # names the file
        if k.name != "folder_named.png":  # read_image says "is a folder"; predict says the folder holds no image
            assert k.problem in msg.lower(), (k.name, msg)


def test_uploads_get_the_same_decision_as_files_and_no_path(corpus):
    folder, kinds = corpus
    for k in kinds:
        if k.is_path:
            continue
        data = (folder / k.name).read_bytes()
        if k.good:
            np.testing.assert_array_equal(decode_upload(data), read_image(folder / k.name))
        else:
            with pytest.raises(DataError) as info:
                decode_upload(data)
            assert k.problem in str(info.value).lower() and str(folder) not in str(info.value), k.name


def test_the_pixel_limit_is_configurable(tmp_path, monkeypatch):
    ok, png = cv2.imencode(".png", np.zeros((300, 400), np.uint8))
    monkeypatch.setenv("LIVERUS_MAX_PIXELS", str(100_000))
    with pytest.raises(DataError, match="above the limit of 0.1 megapixels"):
        decode_upload(png.tobytes())
    monkeypatch.setenv("LIVERUS_MAX_PIXELS", str(120_000))
    assert decode_upload(png.tobytes()).shape == (300, 400)
    monkeypatch.setenv("LIVERUS_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="LIVERUS_MAX_PIXELS must be a positive integer"):
        decode_upload(png.tobytes())


def test_large_legal_images_are_shrunk_before_the_crop():
    from liverus.data import PreprocessConfig, preprocess

    img = np.zeros((2600, 3200), np.float32)
    img[200:2400, 300:2900] = 0.5
    pre = preprocess(img, PreprocessConfig(image_size=64))
    x0, y0, x1, y1 = pre.box  # reported in the original image's pixels
    assert abs(x0 - 300) <= 4 and abs(y0 - 200) <= 4 and abs(x1 - 2900) <= 4 and abs(y1 - 2400) <= 4
    roi = preprocess(img, PreprocessConfig(image_size=64, crop="roi"), box=(0, 0, 1e6, 1e6))
    assert roi.image.shape == (64, 64)  # a box past the edge is clipped, not a 2 TiB allocation


@pytest.mark.slow
def test_audit_lists_every_bad_file_and_goes_on(tmp_path):
    root = tmp_path / "data"
    kinds = write_corpus(root / "benign")  # links, the FIFO and the folder too
    (root / "malignant").mkdir()
    for i in range(4):
        shutil.copy(root / "benign" / "good.png", root / "malignant" / f"m{i}.png")
    p = run_cli("data", "audit", str(root), "--json", str(tmp_path / "audit.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    report = json.loads((tmp_path / "audit.json").read_text())
    listed = {Path(u["path"]).name: u["problem"].lower() for u in report["unreadable"] + report["ignored"]}
    for k in kinds:
        if k.good or k.name in ("missing.png", "folder_named.png"):
            continue
        assert k.name in listed, k.name
        expected = "not an image" if k.name == "animation.gif" else k.problem  # .gif is left out by its name
        assert expected in listed[k.name], (k.name, listed[k.name])
        assert k.name in p.stdout  # printed for the user too
    images = [k for k in kinds if not k.is_path and k.name.endswith((".png", ".jpg", ".bmp", ".tiff", ".dcm"))]
    assert report["counts"] == {"benign": len(images), "malignant": 4}
    again = run_cli("data", "audit", str(root), "--json", str(tmp_path / "audit.json"))
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_predict_writes_a_row_for_every_input_and_no_traceback(corpus, run, tmp_path):
    folder, kinds = corpus
    raw_name = write_non_utf8_image(tmp_path)
    weird = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), raw_name))
    inputs = [str(folder / k.name) for k in kinds] + [weird]
    out = tmp_path / "p.csv"
    p = run_cli("predict", *inputs, "--model", str(run / "model.pt"), "--out", str(out))
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.returncode == 1  # some inputs failed (README: exit codes)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == len(inputs)
    by_name = {Path(r["path"]).name: r for r in rows}
    for k in kinds:
        r = by_name[k.name]
        if k.good:
            assert r["status"] == "ok" and 0 <= float(r["p_malignant"]) <= 1, (k.name, r)
        else:
            assert r["status"] == "error" and k.problem in r["error"].lower(), (k.name, r)
            assert k.name in p.stderr  # listed for the user too
    assert by_name["scan_\\xff\\xfe.png"]["status"] == "ok"  # the non-UTF-8 name, escaped
    p = run_cli("predict", *inputs, "--model", str(run / "model.pt"), "--out", str(tmp_path / "q.json"), "--skip-bad")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert len(json.loads((tmp_path / "q.json").read_text())["predictions"]) == len(inputs)


@pytest.mark.slow
def test_predict_checks_its_outputs_before_any_work(run, images, tmp_path):
    model = str(run / "model.pt")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    p = run_cli("predict", images[0], "--model", model, "--out", str(tmp_path / "p.csv"), "--heatmaps", str(a_file))
    assert p.returncode == 2 and "is a file" in p.stderr and not (tmp_path / "p.csv").exists()
    p = run_cli("predict", images[0], "--model", model, "--out", str(a_file / "p.csv"))
    assert p.returncode == 2 and "is a file, not a folder" in p.stderr
    # Same file names in two folders: two heatmaps, and a second run refuses to replace them.
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(images[0], tmp_path / sub / "scan.png")
    heat = tmp_path / "heat"
    args = [str(tmp_path / "a" / "scan.png"), str(tmp_path / "b" / "scan.png"), "--model", model,
            "--heatmap-method", "gradcam", "--heatmaps"]  # fmt: skip
    p = run_cli("predict", *args, str(heat), "--out", str(tmp_path / "h.csv"))
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in heat.iterdir()) == ["a__scan_gradcam.png", "b__scan_gradcam.png"]
    p = run_cli("predict", *args, str(heat), "--out", str(tmp_path / "h2.csv"))
    assert p.returncode == 2 and "already exist" in p.stderr and not (tmp_path / "h2.csv").exists()


@pytest.mark.slow
def test_a_box_far_past_the_image_is_clipped(roi_run, images, tmp_path):
    p = run_cli(
        "predict", images[0], "--model", str(roi_run / "model.pt"), "--out", str(tmp_path / "p.csv"), "--box",
        "0,0,1e6,1e6",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert next(csv.DictReader((tmp_path / "p.csv").open()))["status"] == "ok"


def test_breast_ultrasound_layout_with_numbered_masks(tmp_path):
    # The common public breast-ultrasound release: "name (N).png" beside "name (N)_mask.png" and, for lesions with
    # several outlines, "name (N)_mask_1.png", "_mask_2.png".
    for label, n in (("benign", 3), ("malignant", 2)):
        d = tmp_path / label
        d.mkdir()
        for i in range(1, n + 1):
            img = np.full((64, 64), 90, np.uint8)
            cv2.imwrite(str(d / f"{label} ({i}).png"), img)
            m = np.zeros((64, 64), np.uint8)
            m[10:20, 10:20] = 255
            cv2.imwrite(str(d / f"{label} ({i})_mask.png"), m)
        m2 = np.zeros((64, 64), np.uint8)
        m2[40:50, 40:50] = 255
        cv2.imwrite(str(d / f"{label} (1)_mask_1.png"), m2)
    cv2.imwrite(str(tmp_path / "benign" / "orphan_mask.png"), np.zeros((64, 64), np.uint8))
    ignored: list = []
    cases = load_cases(tmp_path, ignored=ignored)
    assert sorted(c.label for c in cases) == ["benign"] * 3 + ["malignant"] * 2
    assert all(c.mask for c in cases)
    first = next(c for c in cases if c.path.endswith("benign (1).png"))
    assert [Path(p).name for p in first.extra_masks] == ["benign (1)_mask_1.png"]
    from liverus.data import PreprocessConfig
    from liverus.data.dataset import load_preprocessed

    lesion = load_preprocessed(first, PreprocessConfig(image_size=64, crop="none", letterbox=False)).lesion
    assert lesion[15, 15] and lesion[45, 45]  # the union of both outlines
    assert [Path(p).name for p, _ in ignored] == ["orphan_mask.png"]
