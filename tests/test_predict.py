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
    p = _cli(
        "predict", str(folder), "--model", str(run / "model.pt"), "--out", str(out), "--heatmaps", str(tmp_path / "hm")
    )
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
