"""`liverus predict`: files, folders, DICOM and bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import run_cli as _cli
from liverus.data import read_image
from liverus.engine.predictor import Predictor

# ---------------------------------------------------------------- predict


def test_predict_cli_lists_bad_files_and_writes_csv(run, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in images[:3]:
        (folder / Path(f).name).write_bytes(Path(f).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "pred.csv"
    # No map of a CNN beat random maps clearly on AUL: --heatmaps names the one wanted, or is refused, saying so.
    p = _cli("predict", str(folder), "--model", str(run / "model.pt"), "--out", str(out), "--heatmaps",
             str(tmp_path / "hm"))  # fmt: skip
    assert p.returncode == 2 and "no default map" in p.stderr and "gradcam" in p.stderr and not out.exists()
    p = _cli("predict", str(folder), "--model", str(run / "model.pt"), "--out", str(out), "--heatmaps",
             str(tmp_path / "hm"), "--heatmap-method", "gradcam")  # fmt: skip
    assert p.returncode == 1  # a bad file without --skip-bad
    assert "broken.png" in p.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and bad[0]["error"]
    good = [r for r in rows if r["status"] == "ok"]
    pred = Predictor.from_path(run / "model.pt")
    direct = pred.probabilities([pred.prepare(read_image(r["path"])) for r in good])
    assert np.allclose([float(r["p_malignant"]) for r in good], direct, atol=1e-5)
    # Labels follow the stored threshold (compared at full precision; the CSV rounds to 6 decimals).
    assert [r["label"] for r in good] == ["malignant" if p >= pred.threshold else "benign" for p in direct]
    assert len(list((tmp_path / "hm").glob("*.png"))) == 3
    # never overwrites; --skip-bad acknowledges bad files (still listed) with exit 0
    p2 = _cli("predict", str(folder), "--model", str(run / "model.pt"), "--out", str(out))
    assert p2.returncode == 2 and "already exists" in p2.stderr
    out_json = tmp_path / "pred.json"
    p3 = _cli("predict", str(folder), "--model", str(run / "model.pt"), "--out", str(out_json), "--skip-bad")
    assert p3.returncode == 0
    assert len(json.loads(out_json.read_text())["predictions"]) == 4


def test_predict_reads_dicom(run, images, tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = cv2.imread(images[0], cv2.IMREAD_GRAYSCALE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns = "US", *img.shape
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PixelData = img.tobytes()
    dcm = tmp_path / "scan.dcm"
    ds.save_as(dcm, enforce_file_format=True)
    pred = Predictor.from_path(run / "model.pt")
    a = pred.predict([read_image(dcm)])[0].probability
    b = pred.predict([read_image(images[0])])[0].probability
    assert a == pytest.approx(b, abs=1e-5)


# ---------------------------------------------------------------- lesion models in batch (manifests, explain)


def test_lesion_model_predicts_and_explains_a_manifest_of_masks_and_boxes(roi_run, tmp_path):
    phantom = roi_run / "phantom"
    with open(phantom / "manifest.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["mask"]][:3]
    manifest = tmp_path / "lesions.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "mask", "box"])
        w.writerow([str(phantom / rows[0]["path"]), str(phantom / rows[0]["mask"]), ""])
        w.writerow([str(phantom / rows[1]["path"]), "", "20,20,70,70"])
        w.writerow([str(phantom / rows[2]["path"]), "", ""])  # no lesion given: an error row that says how
    out = tmp_path / "pred.csv"
    p = _cli("predict", str(manifest), "--model", str(roi_run / "model.pt"), "--out", str(out),
             "--heatmaps", str(tmp_path / "hm"), "--heatmap-method", "gradcam")  # fmt: skip
    assert p.returncode == 1, p.stderr
    got = list(csv.DictReader(out.open()))
    assert [r["status"] for r in got] == ["ok", "ok", "error"]
    assert [r["lesion_source"] for r in got[:2]] == ["user mask", "user box"]
    assert "--mask" in got[2]["error"] and "--box" in got[2]["error"] and "manifest" in got[2]["error"]
    # The manifest's box gives what --box gives for the same image.
    single = tmp_path / "one.csv"
    assert _cli("predict", str(phantom / rows[1]["path"]), "--box", "20,20,70,70", "--model",
                str(roi_run / "model.pt"), "--out", str(single)).returncode == 0  # fmt: skip
    assert next(csv.DictReader(single.open()))["p_malignant"] == got[1]["p_malignant"]
    figure = cv2.imread(got[0]["heatmap"])
    assert figure is not None and figure.shape[1] > figure.shape[0]  # crop panel + original panel
    p = _cli("explain", str(phantom / rows[1]["path"]), "--box", "20,20,70,70", "--model", str(roi_run / "model.pt"),
             "--out", str(tmp_path / "ex"), "--method", "gradcam")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert f"p(malignant)={float(got[1]['p_malignant']):.3f}" in p.stdout
    assert len(list((tmp_path / "ex").glob("*_gradcam.png"))) == 1
    p = _cli("explain", str(phantom / rows[1]["path"]), "--model", str(roi_run / "model.pt"),
             "--out", str(tmp_path / "ex2"))  # fmt: skip
    assert p.returncode == 1 and "--box" in p.stderr


def test_input_manifest_errors_name_the_file_and_line(tmp_path):
    from liverus.data import DataError
    from liverus.data.inputs import read_input_manifest

    bad = tmp_path / "m.csv"
    bad.write_text("image,mask\na.png,\n")
    with pytest.raises(DataError, match="no 'path' column"):
        read_input_manifest(bad)
    # A malformed box is that row's problem: the row is answered with it, the other rows are analysed.
    bad.write_text('path,box\na.png,"1,2"\nb.png,"1,2,30,40"\n,\n')
    first, second, empty = read_input_manifest(bad)
    assert first.problem.startswith("m.csv line 2: the lesion box must be x0,y0,x1,y1")
    assert second.problem is None and second.box == (1.0, 2.0, 30.0, 40.0)
    assert empty.problem == "m.csv line 4: empty path"
    ok = tmp_path / "ok.csv"
    ok.write_text("path,x0,y0,x1,y1\nsub/a.png,1,2,30,40\n")
    (item,) = read_input_manifest(ok)
    assert item.path == str(tmp_path / "sub" / "a.png") and item.box == (1.0, 2.0, 30.0, 40.0)
    assert item.lesion_source == "user box"


def test_heatmap_maps_back_onto_the_original_at_the_crop():
    from liverus.engine.heatmaps import heatmap_on_original

    heat = np.zeros((64, 64), np.float32)
    heat[16:48, :] = 1.0  # letterboxed 2:1 crop: content rows 16..48
    full = heatmap_on_original(heat, (10, 20, 110, 70), (100, 200), letterbox=True)
    assert full.shape == (100, 200)
    assert full[20:70, 10:110].min() > 0.99 and full[:20].max() == 0 and full[:, 110:].max() == 0
