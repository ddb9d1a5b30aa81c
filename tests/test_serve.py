"""The web service (liverus.serve): API in-process, the page in a real browser, the ONNX backend."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import start_server
from liverus.data import read_image
from liverus.engine.predictor import Predictor

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
    assert body["model"] == pred.name
    # A CNN's maps did not pass the faithfulness check: none by default, any on request, labelled.
    assert "heatmap" not in body and pred.default_method is None
    health = client.get("/api/health").json()
    assert health["default_map"] is None and health["maps"] == ["occlusion", "gradcam", "attention"]
    r = client.post("/api/predict?heatmap=gradcam", files={"file": ("a.png", data, "image/png")})
    body = r.json()
    assert body["heatmap"].startswith("data:image/png;base64,") and body["heatmap_method"] == "gradcam"
    assert "Not verified" in body["heatmap_caption"]
    r = client.post("/api/predict?heatmap=occlusion_views", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 400 and "occlusion, gradcam, attention" in r.json()["detail"]


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


def test_api_gives_one_answer_for_several_images_of_a_lesion(roi_client, roi_run, images):
    from liverus.evaluation.aggregate import mean_log_odds

    pred = Predictor.from_path(roi_run / "model.pt")
    boxes, files, want = [], [], []
    for i, path in enumerate(images[:3]):
        h, w = read_image(path).shape
        box = (w * 0.3, h * 0.3, w * (0.6 + 0.05 * i), h * 0.7)
        boxes.append(("box", (None, ",".join(map(str, box)))))
        files.append(("file", (f"{i}.png", Path(path).read_bytes(), "image/png")))
        want.append(pred.predict([read_image(path)], boxes=[box])[0].probability)
    r = roi_client.post("/api/predict_lesion", files=files + boxes)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_images"] == 3 and body["aggregation"] == "mean log-odds of the lesion's images"
    assert [im["probability_malignant"] for im in body["images"]] == pytest.approx(want, abs=1e-5)
    assert body["probability_malignant"] == pytest.approx(mean_log_odds(want), abs=1e-5)
    assert body["label"] == pred.card.label(body["probability_malignant"])
    # One box per image, in order; an image that fails names itself.
    r = roi_client.post("/api/predict_lesion", files=files + boxes[:2])
    assert r.status_code == 400 and "one box per image" in r.json()["detail"]
    bad = files[:1] + [("file", ("x.png", b"\x89PNG\r\n\x1a\ncorrupt", "image/png"))]
    r = roi_client.post("/api/predict_lesion", files=bad + boxes[:2])
    assert r.status_code in (400, 415) and r.json()["detail"].startswith("image 2: ")
    r = roi_client.post("/api/predict_lesion", files=files * 3 + boxes * 3)
    assert r.status_code == 400 and "at most 8 images" in r.json()["detail"]


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


def _serve(model: Path):
    try:
        proc, url = start_server(model)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
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


def _drag_box(page, start: float, end: float, *, via: float | None = None) -> None:
    """Drag on the page's preview image from ``start`` to ``end`` (fractions of its width and height), as a
    radiologist draws the lesion box; ``via`` adds a stop on the way."""
    js = "img => { const b = img.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; }"
    x, y, w, h = page.eval_on_selector("#preview", js)
    page.mouse.move(x + start * w, y + start * h)
    page.mouse.down()
    for f in ([via] if via is not None else []) + [end]:
        page.mouse.move(x + f * w, y + f * h, steps=4)
    page.mouse.up()


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
        # No map of a CNN passed the faithfulness check: none is shown until asked for, and then it says so.
        assert not page.is_visible("#heatmap") and page.is_visible("#map-anyway")
        page.click("#map-anyway")
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0", timeout=60_000)
        assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
        assert page.eval_on_selector("#heatmap", "img => img.naturalWidth") == 64
        caption = page.inner_text("#heatmap-caption")
        assert "Grad-CAM" in caption and "Not verified" in caption
        # Where the probability sits against the operating points, and what each is expected to give, in words.
        points = page.inner_text("#points")
        assert points.startswith(("At or above", "Below every operating point")), points
        assert "Operating points: rule-out" in points and "sensitivity" in points and "specificity" in points
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
        _drag_box(page, 0.2, 0.6, via=0.4)
        box = [float(v) for v in page.inner_text("#box-text").split(",")]
        assert box == pytest.approx([0.2 * w, 0.2 * h, 0.6 * w, 0.6 * h], abs=2.5)
        page.click("#submit")
        page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
        shown = float(page.inner_text("#probability").rstrip(" %")) / 100
        assert page.inner_text("#source") == "lesion: user box"  # where the lesion came from (and how it was read)
        assert not page.is_visible("#contributions")  # a CNN's score has no feature groups to show
        page.screenshot(path=str(tmp_path / "roi_page.png"), full_page=True)
        browser.close()
    expected = Predictor.from_path(roi_run / "model.pt").predict([read_image(images[1])], boxes=[tuple(box)])[0]
    assert shown == pytest.approx(expected.probability, abs=0.0015)  # the page rounds to 0.1 %


def test_serve_runs_on_the_onnx_export(onnx_file, run, images):
    from fastapi.testclient import TestClient

    from liverus.serve.app import create_app

    pt = Predictor.from_path(run / "model.pt")
    onnx = Predictor.from_path(onnx_file)
    assert not onnx.has_contributions
    with pytest.raises(ValueError, match="not the ONNX export"):
        onnx.contributions([onnx.prepare(read_image(images[1]))])
    with TestClient(create_app(onnx)) as c:
        assert c.get("/api/health").json()["backend"] == "onnxruntime"
        r = c.post("/api/predict", files={"file": ("x.png", Path(images[1]).read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "onnxruntime" and "heatmap" not in body
    assert body["probability_malignant"] == pytest.approx(pt.predict([read_image(images[1])])[0].probability, abs=1e-4)


def test_dynamic_batching_gives_the_answers_of_single_requests(run, images):
    from liverus.serve.batching import DynamicBatcher

    pred = Predictor.from_path(run / "model.pt")
    pre = [pred.prepare(read_image(f)) for f in images]
    batcher = DynamicBatcher(pred, max_batch=8, max_wait_ms=200)  # a long window: every request lands in one batch
    futures = [batcher.submit(p, heatmap=i % 2 == 0) for i, p in enumerate(pre)]
    results = [f.result(timeout=120) for f in futures]
    assert max(r.batch_size for r in results) == len(pre)  # they shared one forward pass
    for i, (p, r) in enumerate(zip(pre, results, strict=True)):
        assert r.probability == pytest.approx(float(pred.probabilities([p])[0]), abs=1e-5)
        if i % 2 == 0:  # Grad-CAM only where it was asked for, equal to the single-image map
            np.testing.assert_allclose(r.heatmap, pred.heatmap(p), atol=1e-4)
        else:
            assert r.heatmap is None
    alone = DynamicBatcher(pred, max_batch=1)
    assert alone.submit(pre[0]).result(timeout=60).batch_size == 1
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(pred, max_batch=0)
