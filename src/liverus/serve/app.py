"""``liverus serve``: a FastAPI service and web page for radiologists (research use only).

* ``GET /``: the page: upload an image or DICOM, see the probability, the label and the heatmap beside the image.
* ``POST /api/predict`` (multipart field ``file``, optional field ``box`` = ``x0,y0,x1,y1`` around the lesion in the
  image's pixels, required by lesion-ROI models; ``?heatmap=false`` to skip the heatmap): JSON with the probability
  of malignancy, label, threshold, model name and version.
* ``POST /api/image`` (multipart ``file``): the decoded image as PNG with its size, so the page can show any upload,
  DICOM included, and let the user draw the lesion box on it.
* ``GET /api/health``: liveness, which model is loaded and whether it needs a lesion box (``needs_box``).

Safety: uploads are read into memory up to a size limit (413 beyond it), their type is recognised from the bytes, not
the name (415 otherwise), undecodable files get a 400 that says why, and nothing the user sends is ever used as a
path. The model is loaded once; a lock inside :class:`~liverus.engine.predictor.Predictor` serialises inference.
"""

from __future__ import annotations

import argparse
import base64
import io
from importlib import resources

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from liverus.data.inputs import parse_box
from liverus.data.io import DataError
from liverus.data.uploads import ALLOWED_KINDS, decode_upload, sniff_kind
from liverus.engine.heatmaps import overlay
from liverus.engine.predictor import Predictor

__all__ = ["create_app", "run_server"]

DISCLAIMER = (
    "Research tool, not a diagnosis. liverus is not a medical device; its output must not be used on its own for "
    "clinical decisions."
)


def _png_b64(rgb_or_gray: np.ndarray) -> str:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _problem(exc: Exception) -> str:
    return exc.problem if isinstance(exc, DataError) else str(exc)


def create_app(predictor: Predictor, *, max_upload_bytes: int = 20 * 2**20) -> FastAPI:
    """Build the app around a loaded predictor.

    Args:
        predictor: the model (loaded once, shared by all requests).
        max_upload_bytes: uploads larger than this are refused with 413.
    """
    app = FastAPI(title="liverus", version=predictor.version or "0", description=DISCLAIMER)
    page = resources.files("liverus.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    page = page.replace("{{DISCLAIMER}}", DISCLAIMER).replace("{{MODEL}}", predictor.name)
    page = page.replace("{{MAX_MB}}", f"{max_upload_bytes / 2**20:.0f}")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refuse declared oversize bodies before reading them; the streamed read below enforces the rest.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload too large (limit {max_upload_bytes // 2**20} MB)"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    needs_box = predictor.preprocess_cfg.crop == "roi"

    @app.get("/api/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": predictor.name,
            "version": predictor.version,
            "backend": predictor.backend,
            "needs_box": needs_box,
        }

    def read_upload(file: UploadFile) -> tuple[np.ndarray, str]:
        """The upload as a gray image, or the HTTP error that says what is wrong with it."""
        data = io.BytesIO()
        while chunk := file.file.read(1 << 20):
            data.write(chunk)
            if data.tell() > max_upload_bytes:
                raise HTTPException(413, f"upload too large (limit {max_upload_bytes // 2**20} MB)")
        raw = data.getvalue()
        if not raw:
            raise HTTPException(400, "the uploaded file is empty")
        kind = sniff_kind(raw)
        if kind not in ALLOWED_KINDS:
            raise HTTPException(415, f"unsupported file type; upload one of: {', '.join(sorted(ALLOWED_KINDS))}")
        try:
            return decode_upload(raw, kind), kind
        except (DataError, ValueError) as exc:
            raise HTTPException(400, f"could not read the image: {_problem(exc)}") from None

    @app.post("/api/image")
    def image(file: UploadFile = File(...)) -> dict:
        img, kind = read_upload(file)
        u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)  # decode_upload gives [0, 1]
        return {"image": _png_b64(u8), "width": int(img.shape[1]), "height": int(img.shape[0]), "file_type": kind}

    @app.post("/api/predict")
    def predict(file: UploadFile = File(...), box: str | None = Form(None), heatmap: bool = Query(True)) -> dict:
        image, kind = read_upload(file)
        try:
            lesion_box = parse_box(box)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if needs_box and lesion_box is None:
            raise HTTPException(
                400, "this model analyses the lesion region: draw a box around the lesion (box=x0,y0,x1,y1)"
            )
        try:
            pre = predictor.prepare(image, box=lesion_box)
        except (DataError, ValueError) as exc:
            raise HTTPException(400, f"could not analyse the image: {_problem(exc)}") from None
        prob = float(predictor.probabilities([pre])[0])
        out = {
            "probability_malignant": round(prob, 6),
            "label": predictor.card.label(prob),
            "threshold": round(predictor.threshold, 6),
            "model": predictor.name,
            "version": predictor.version,
            "backend": predictor.backend,
            "file_type": kind,
            "box": list(lesion_box) if lesion_box else None,
            "image": _png_b64(pre.image),
            "disclaimer": DISCLAIMER,
        }
        if heatmap and predictor.model is not None:
            out["heatmap"] = _png_b64(overlay(pre.image, predictor.heatmap(pre)))
        return out

    return app


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    predictor = Predictor.from_path(args.model)
    app = create_app(predictor, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"liverus serve: {predictor.name} ({predictor.backend}) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
