"""Explain, predict, export and serve: on a small trained model."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from liverus.data import load_cases, read_image
from liverus.explain import attention_heatmap, faithfulness, gradcam_heatmap, overlay, save_overlay
from liverus.inference import Predictor
from liverus.training import apply_overrides, load_config, train

TINY = [
    "data.image_size=64",
    "data.phantom_patients=16",
    "data.phantom_size=96",
    "data.augment=none",
    "model.name=custom_efficientnet_lite0",
    "optim.batch_size=8",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    train(apply_overrides(load_config(), TINY), out)
    return out


@pytest.fixture(scope="module")
def roi_run(tmp_path_factory):
    """A lesion-ROI model: it needs a lesion box or mask at inference."""
    out = tmp_path_factory.mktemp("deploy_roi") / "run"
    train(apply_overrides(load_config(), [*TINY, "data.crop=roi"]), out)
    return out


@pytest.fixture(scope="module")
def images(run):
    return [c.path for c in load_cases(run / "phantom")][:6]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liverus.cli", *args], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- heatmaps


def test_gradcam_and_attention_maps(run, images):
    pred = Predictor.from_path(run / "model.pt")
    pre = pred.prepare(read_image(images[0]))
    x = (torch.from_numpy(pre.image[None, None] / 255.0).float() - pred.mean) / pred.std
    cam = gradcam_heatmap(pred.model, x)
    att = attention_heatmap(pred.model, x)
    for h in (cam, att):
        assert h.shape == (1, 64, 64) and h.min() >= 0 and h.max() <= 1
    assert att.max() == pytest.approx(1.0)


def test_overlay_colour_order_is_rgb_on_disk(tmp_path):
    gray = np.full((32, 32), 60, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:8, :8] = 1.0  # hot corner -> red in the jet colormap
    rgb = overlay(gray, heat)
    assert rgb[2, 2, 0] > rgb[2, 2, 2]  # in memory: RGB, red first
    path = save_overlay(tmp_path / "o.png", rgb)
    from PIL import Image

    disk = np.asarray(Image.open(path).convert("RGB"))
    assert disk[2, 2, 0] > 150 and disk[2, 2, 2] < 100  # a viewer shows red, not blue
    assert disk[20, 20, 2] > disk[20, 20, 0]  # cold region is blue


def test_faithfulness_pointing_game_and_energy():
    lesion = np.zeros((2, 20, 20), np.uint8)
    lesion[:, 5:10, 5:10] = 1
    inside = np.zeros((20, 20), np.float32)
    inside[7, 7] = 1.0
    outside = np.zeros((20, 20), np.float32)
    outside[15, 15] = 1.0
    f = faithfulness(np.stack([inside, outside]), lesion)
    assert f["pointing_game"] == 0.5 and f["energy_inside"] == 0.5 and f["n"] == 2
    assert f["lesion_area"] == pytest.approx(25 / 400)


def test_explain_cli_writes_overlays(run, images, tmp_path):
    out = tmp_path / "heat"
    p = _cli("explain", images[0], "--model", str(run / "model.pt"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    names = sorted(f.name for f in out.iterdir())
    assert len(names) == 2 and names[0].endswith("_attention.png") and names[1].endswith("_gradcam.png")


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


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory):
    from liverus.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    info = export_onnx(run / "model.pt", out)
    assert info["max_abs_diff_vs_pytorch"] < 1e-4
    return out


def test_onnx_matches_pytorch_and_carries_metadata(run, images, onnx_file):
    pt = Predictor.from_path(run / "model.pt")
    ox = Predictor.from_path(onnx_file)
    assert ox.backend == "onnxruntime" and ox.threshold == pt.threshold and ox.preprocess_cfg == pt.preprocess_cfg
    pre = [pt.prepare(read_image(f)) for f in images]
    assert np.abs(pt.probabilities(pre) - ox.probabilities(pre)).max() < 1e-4
    from liverus.export import export_onnx

    with pytest.raises(ValueError, match="already exists"):
        export_onnx(run / "model.pt", onnx_file)


# ---------------------------------------------------------------- serve (in-process)


@pytest.fixture(scope="module")
def client(run):
    from fastapi.testclient import TestClient

    from liverus.serve.app import create_app

    app = create_app(Predictor.from_path(run / "model.pt"), max_upload_bytes=200_000)
    with TestClient(app) as c:
        yield c


def test_health_and_page(client):
    assert client.get("/api/health").json()["status"] == "ok"
    page = client.get("/").text
    assert "not a diagnosis" in page and "custom_efficientnet_lite0" in page


def test_api_predict_matches_direct_prediction(client, run, images):
    pred = Predictor.from_path(run / "model.pt")
    data = Path(images[0]).read_bytes()
    r = client.post("/api/predict", files={"file": ("../../etc/passwd", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probability_malignant"] == pytest.approx(
        pred.predict([read_image(images[0])])[0].probability, abs=1e-5
    )
    assert body["label"] in ("benign", "malignant") and body["threshold"] == pytest.approx(pred.threshold, abs=1e-6)
    assert body["heatmap"].startswith("data:image/png;base64,") and body["model"] == pred.name


@pytest.mark.parametrize(
    "payload, status, match",
    [
        (b"", 400, "empty"),
        (b"GIF89a" + b"\0" * 100, 415, "unsupported file type"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 400, "could not read"),
        (b"\xff\xd8\xff\xe0" + b"\1" * 500, 400, "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000, 413, "too large"),
    ],
)
def test_api_rejects_bad_uploads(client, payload, status, match):
    r = client.post("/api/predict", files={"file": ("x", payload, "application/octet-stream")})
    assert r.status_code == status and match in r.json()["detail"]


def test_api_concurrent_requests_get_their_own_answers(client, run, images):
    pred = Predictor.from_path(run / "model.pt")
    expected = {f: pred.predict([read_image(f)])[0].probability for f in images}

    def call(f):
        r = client.post("/api/predict?heatmap=false", files={"file": ("a.png", Path(f).read_bytes(), "image/png")})
        return f, r.json()["probability_malignant"]

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, images * 3))
    for f, p in results:
        assert p == pytest.approx(expected[f], abs=1e-5)


@pytest.fixture(scope="module")
def roi_client(roi_run):
    from fastapi.testclient import TestClient

    from liverus.serve.app import create_app

    with TestClient(create_app(Predictor.from_path(roi_run / "model.pt"))) as c:
        yield c


def test_api_image_returns_the_decoded_upload(client, images):
    data = Path(images[0]).read_bytes()
    body = client.post("/api/image", files={"file": ("a.png", data, "image/png")}).json()
    img = cv2.imdecode(np.frombuffer(base64.b64decode(body["image"].split(",", 1)[1]), np.uint8), cv2.IMREAD_GRAYSCALE)
    expected = np.rint(read_image(images[0]) * 255)
    assert (body["height"], body["width"]) == img.shape == expected.shape
    assert np.abs(img.astype(float) - expected).max() <= 1
    assert client.post("/api/image", files={"file": ("x", b"GIF89a" + b"\0" * 99, "image/gif")}).status_code == 415


def test_api_fan_model_needs_no_box(client):
    assert client.get("/api/health").json()["needs_box"] is False


def test_api_roi_model_uses_the_drawn_box(roi_client, roi_run, images):
    assert roi_client.get("/api/health").json()["needs_box"] is True
    data = Path(images[0]).read_bytes()
    h, w = read_image(images[0]).shape
    box = (w * 0.3, h * 0.35, w * 0.6, h * 0.7)
    files = {"file": ("a.png", data, "image/png")}
    r = roi_client.post("/api/predict", files=files, data={"box": ",".join(map(str, box))})
    assert r.status_code == 200, r.text
    expected = Predictor.from_path(roi_run / "model.pt").predict([read_image(images[0])], boxes=[box])[0]
    assert r.json()["probability_malignant"] == pytest.approx(expected.probability, abs=1e-5)
    assert r.json()["box"] == pytest.approx(list(box))
    # Another box gives the prediction for that region, not a cached one.
    other = (0.0, 0.0, w * 0.25, h * 0.25)
    r2 = roi_client.post("/api/predict", files=files, data={"box": ",".join(map(str, other))})
    expected2 = Predictor.from_path(roi_run / "model.pt").predict([read_image(images[0])], boxes=[other])[0]
    assert r2.json()["probability_malignant"] == pytest.approx(expected2.probability, abs=1e-5)


@pytest.mark.parametrize(
    "box, match",
    [
        (None, "draw a box around the lesion"),
        ("1,2,3", "x0,y0,x1,y1"),
        ("a,b,c,d", "x0,y0,x1,y1"),
        ("0,0,nan,5", "x0,y0,x1,y1"),
        ("40,40,20,60", "is empty"),
        ("5000,5000,5100,5100", "outside"),
    ],
)
def test_api_roi_model_rejects_missing_or_bad_boxes(roi_client, images, box, match):
    data = {} if box is None else {"box": box}
    r = roi_client.post("/api/predict", files={"file": ("a.png", Path(images[0]).read_bytes(), "image/png")}, data=data)
    assert r.status_code == 400 and match in r.json()["detail"]


# ---------------------------------------------------------------- serve in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverus.cli", "serve", "--model", str(model), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not start: " + (proc.stdout.read() if proc.stdout else ""))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(run):
    yield from _serve(run / "model.pt")


@pytest.fixture(scope="module")
def roi_server(roi_run):
    yield from _serve(roi_run / "model.pt")


CHROMIUM = os.environ.get("LIVERUS_CHROMIUM", "/usr/bin/chromium")


def _chromium(pw):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; `make test` installs Debian's chromium")
    return pw.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


def test_browser_upload_shows_probability_label_and_heatmap(server, images, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _chromium(pw)
        page = browser.new_page()
        page.goto(server + "/")
        assert "not a diagnosis" in page.inner_text("#disclaimer")
        page.set_input_files("#file", images[0])
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        prob = page.inner_text("#probability")
        assert prob.endswith("%") and 0 <= float(prob.rstrip(" %")) <= 100
        assert page.inner_text("#label") in ("benign", "malignant")
        assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
        assert page.eval_on_selector("#heatmap", "img => img.naturalWidth") == 64
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        # A corrupt upload shows a clear message on the page.
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
        page.set_input_files("#file", str(bad))
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "could not read" in page.inner_text("#error")
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_browser_roi_model_lets_the_user_draw_the_lesion_box(roi_server, roi_run, images, tmp_path):
    from playwright.sync_api import sync_playwright

    h, w = read_image(images[1]).shape
    with sync_playwright() as pw:
        browser = _chromium(pw)
        page = browser.new_page()
        page.goto(roi_server + "/")
        page.wait_for_selector("#box-panel:not(.hidden)", timeout=30_000)
        page.set_input_files("#file", images[1])
        page.wait_for_function("document.getElementById('preview').naturalWidth > 0", timeout=30_000)
        # Without a box the page asks for one instead of sending the image.
        page.click("#submit")
        assert "Draw a box around the lesion" in page.inner_text("#error")
        # Drag from 20% to 60% of the displayed image: the box is sent in the image's own pixels.
        js = "img => { const b = img.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; }"
        r = page.eval_on_selector("#preview", js)
        page.mouse.move(r[0] + 0.2 * r[2], r[1] + 0.2 * r[3])
        page.mouse.down()
        page.mouse.move(r[0] + 0.4 * r[2], r[1] + 0.4 * r[3], steps=4)
        page.mouse.move(r[0] + 0.6 * r[2], r[1] + 0.6 * r[3], steps=4)
        page.mouse.up()
        box = [float(v) for v in page.inner_text("#box-text").split(",")]
        assert box == pytest.approx([0.2 * w, 0.2 * h, 0.6 * w, 0.6 * h], abs=2.5)
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        shown = float(page.inner_text("#probability").rstrip(" %")) / 100
        page.screenshot(path=str(tmp_path / "roi_page.png"), full_page=True)
        browser.close()
    expected = Predictor.from_path(roi_run / "model.pt").predict([read_image(images[1])], boxes=[tuple(box)])[0]
    assert shown == pytest.approx(expected.probability, abs=0.0015)  # the page rounds to 0.1 %


def test_serve_runs_on_the_onnx_export(onnx_file, run, images):
    from fastapi.testclient import TestClient

    from liverus.serve.app import create_app

    pt = Predictor.from_path(run / "model.pt")
    with TestClient(create_app(Predictor.from_path(onnx_file))) as c:
        assert c.get("/api/health").json()["backend"] == "onnxruntime"
        r = c.post("/api/predict", files={"file": ("x.png", Path(images[1]).read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "onnxruntime" and "heatmap" not in body
    assert body["probability_malignant"] == pytest.approx(pt.predict([read_image(images[1])])[0].probability, abs=1e-4)
