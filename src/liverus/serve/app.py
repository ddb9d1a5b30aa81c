"""``liverus serve``: a FastAPI service and web page for radiologists (research use only).

* ``GET /``: the page: upload an image or DICOM, see the probability, the label, the operating points, the lesion
  source, the model's map and, for feature models, what drove the score.
* ``POST /api/predict`` (multipart field ``file``, optional field ``box`` = ``x0,y0,x1,y1`` around the lesion in the
  image's pixels, required by lesion-ROI models and refused by whole-image models; ``?heatmap=false`` to skip the
  map, ``?heatmap=METHOD`` for another map, labelled when it did not pass the faithfulness check): JSON with the
  probability of malignancy, label, threshold, operating points, model name and version; the map (``heatmap``:
  occlusion for feature models, none by default for CNNs; ``heatmap_method``, ``heatmap_caption``); for ensembles
  ``member_range`` (the lowest and highest of the fold models' probabilities); for feature models also
  ``contributions`` (each feature group's share of the log-odds), ``baseline_probability`` (the reference they are
  measured against) and ``training_lesions`` (each group's quartiles over the training lesions of each class).
* ``POST /api/image`` (multipart ``file``): the decoded image as PNG with its size, so the page can show any upload,
  DICOM included, and let the user draw the lesion box on it.
* ``POST /api/predict_lesion`` (field ``file`` repeated, up to eight images of one lesion, and for lesion models
  ``box`` repeated in the same order): one answer for the lesion, the mean log-odds of its images'
  (``liverus.evaluation.aggregate``), with each image's own probability.
* ``GET /api/health``: liveness, which model is loaded, whether it needs a lesion box (``needs_box``), its default
  map (``default_map``, null when none passed the faithfulness check) and every map it has (``maps``).
* ``/docs`` and ``/openapi.json`` only with ``--api-docs``.

Safety: the request body is read into memory and cut off at the size limit as it arrives (413; nothing a user sends
touches the disk); the file type is recognised from the bytes, not the name (415 otherwise); the image's dimensions
are read from its header and images above the pixel limit are refused before decoding (400); undecodable files get a
400 that says why; nothing the user sends is ever used as a path. The model is loaded once; concurrent requests are
batched dynamically (:mod:`liverus.serve.batching`) and Grad-CAM runs only for the requests that ask for it.
"""

from __future__ import annotations

import argparse
import base64
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from liverus.data.inputs import parse_box
from liverus.data.io import DataError
from liverus.data.uploads import ALLOWED_KINDS, decode_upload, sniff_kind
from liverus.engine.heatmaps import overlay
from liverus.engine.predictor import Predictor
from liverus.evaluation.aggregate import mean_log_odds
from liverus.serve.batching import DynamicBatcher
from liverus.serve.forms import Form, FormError, read_form

__all__ = ["create_app", "run_server", "render_page", "read_upload", "lesion_box", "DISCLAIMER"]

# Images of one lesion in one /api/predict_lesion request (each within the upload limit).
MAX_LESION_IMAGES = 8

DISCLAIMER = (
    "Research tool, not a diagnosis. liverus is not a medical device; its output must not be used on its own for "
    "clinical decisions."
)


# What the page says under each map.
CAPTIONS = {
    "occlusion": "Occlusion: each region's content hidden in turn (blurred); red regions raised the probability of "
    "malignancy, blue lowered it. The lesion outline is kept, so shape and margin are in the chart below.",
    "gradcam": "Grad-CAM: regions whose features raised the malignancy score (red).",
    "occlusion_views": "Occlusion of each view (the lesion crop and the whole scan): red regions raised the "
    "probability of malignancy, blue lowered it.",
    "attention": "The model's own spatial-attention map (red: attended).",
}


def _png_b64(rgb_or_gray: np.ndarray) -> str:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _problem(exc: Exception) -> str:
    return exc.problem if isinstance(exc, DataError) else str(exc)


@cache
def _templates() -> Environment:
    """The page's template environment; the model name is escaped, since it comes from the weights file."""
    return Environment(
        loader=PackageLoader("liverus.serve", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",)),
        keep_trailing_newline=True,
    )


def render_page(model_name: str, max_upload_bytes: int) -> str:
    """The web page (``templates/index.html.j2``) for a model and an upload limit."""
    page = _templates().get_template("index.html.j2")
    return page.render(disclaimer=DISCLAIMER, model=model_name, max_mb=f"{max_upload_bytes / 2**20:.0f}")


def read_upload(form: Form, max_upload_bytes: int, max_pixels: int | None) -> tuple[np.ndarray, str]:
    """The upload (field ``file``) as a gray image and its file type, or the HTTP error that says what is wrong with
    it: missing or empty (400), too large (413), not an image type we read (415), not decodable (400)."""
    raw = form.fields.get("file")
    if raw is None:
        raise HTTPException(400, "no file: send the image in the multipart field 'file'")
    if not raw:
        raise HTTPException(400, "the uploaded file is empty")
    if len(raw) > max_upload_bytes:
        raise HTTPException(413, f"upload too large (limit {max_upload_bytes // 2**20} MB)")
    kind = sniff_kind(raw[:132])
    if kind not in ALLOWED_KINDS:
        raise HTTPException(415, f"unsupported file type; upload one of: {', '.join(sorted(ALLOWED_KINDS))}")
    try:
        return decode_upload(raw, max_pixels), kind
    except (DataError, ValueError) as exc:
        raise HTTPException(400, f"could not read the image: {_problem(exc)}") from None


def lesion_box(
    form: Form, image: np.ndarray, *, needs_box: bool, proposes_box: bool
) -> tuple[float, float, float, float] | None:
    """The lesion box of the form (field ``box``, ``x0,y0,x1,y1`` in the image's pixels), or the HTTP 400 that says
    why it cannot be used: a lesion model without a box and without a segmenter to propose one, a whole-image model
    given one, or a box that is empty, inverted or outside the image."""
    text = form.fields.get("box", b"").decode("utf-8", "replace").strip()
    try:
        box = parse_box(text)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if box is None and needs_box and not proposes_box:
        raise HTTPException(
            400, "this model analyses the lesion region: draw a box around the lesion (box=x0,y0,x1,y1)"
        )
    if box is not None and not needs_box:
        raise HTTPException(400, "this model analyses the whole image and takes no lesion box; leave box empty")
    if box is not None:
        h, w = image.shape
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise HTTPException(400, f"the lesion box {text!r} is empty or inverted (need x0 < x1 and y0 < y1)")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise HTTPException(400, f"the lesion box {text!r} lies (partly) outside the {w}x{h} image")
    return box


@dataclass
class _Service:
    """What the routes answer, around one loaded predictor; the routes only read the request and hand it over."""

    predictor: Predictor
    batcher: DynamicBatcher
    max_upload_bytes: int
    max_pixels: int | None

    @property
    def needs_box(self) -> bool:
        return self.predictor.needs_lesion

    @property
    def proposes_box(self) -> bool:
        return self.needs_box and self.predictor.segmenter is not None

    def health(self) -> dict:
        """Liveness, the model, whether it needs a lesion box and which maps it has."""
        p = self.predictor
        return {
            "status": "ok",
            "model": p.name,
            "version": p.version,
            "backend": p.backend,
            "classes": list(p.classes),
            "needs_box": self.needs_box,
            "proposes_box": self.proposes_box,
            "default_map": p.default_method,
            "maps": list(p.methods),
        }

    def image_of(self, form: Form) -> tuple[np.ndarray, str]:
        return read_upload(form, self.max_upload_bytes, self.max_pixels)

    async def preview(self, form: Form) -> dict:
        """The decoded upload as PNG with its size and, where the model has a segmenter, a proposed lesion box."""
        img, kind = await run_in_threadpool(self.image_of, form)
        u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)  # decode_upload gives [0, 1]
        out = {"image": _png_b64(u8), "width": int(img.shape[1]), "height": int(img.shape[0]), "file_type": kind}
        if self.proposes_box:
            # The radiologist sees the proposed lesion box drawn and accepts it or draws another.
            proposal = await run_in_threadpool(self.predictor.propose_lesion, img)
            out["proposed_box"] = [round(v, 1) for v in proposal.box] if proposal.box else None
        return out

    def verdict(self, prob: float, class_probabilities: np.ndarray | None = None) -> dict:
        """What every answer says of a probability: label, threshold, operating points and the model. A three-class
        model's answer gives every class's probability and the most probable class instead (``threshold`` null, no
        operating points: they are a binary model's)."""
        p = self.predictor
        model = {"model": p.name, "version": p.version, "backend": p.backend}
        if p.is_three_class:
            return {
                "probability_malignant": round(prob, 6),
                "class_probabilities": {c: round(float(q), 6) for c, q in zip(p.classes, class_probabilities,
                                                                             strict=True)},
                "label": p.label_of(class_probabilities),
                "threshold": None,
                "operating_points": {},
                "operating_point_rates": {},
                "crossed": [],
                **model,
            }  # fmt: skip
        return {
            "probability_malignant": round(prob, 6),
            "label": p.card.label(prob),
            "threshold": round(p.threshold, 6),
            "operating_points": {k: round(v, 6) for k, v in p.card.operating_points.items()},
            "operating_point_rates": p.card.operating_point_rates,
            "crossed": p.card.crossed(prob),
            **model,
        }

    def analyse(self, form: Form, heatmap: bool | str) -> dict:
        """One image: the verdict, the lesion source, the map asked for (``heatmap``: a method, or the default map)
        and, where the model has them, the ensemble's range and the feature groups' contributions."""
        p = self.predictor
        image, kind = self.image_of(form)
        box = lesion_box(form, image, needs_box=self.needs_box, proposes_box=self.proposes_box)
        try:
            pre = p.prepare(image, box=box)
        except (DataError, ValueError) as exc:
            raise HTTPException(400, f"could not analyse the image: {_problem(exc)}") from None
        method = heatmap if isinstance(heatmap, str) else p.default_method if heatmap else None
        # Grad-CAM is batched with the other requests; occlusion scores its own hidden copies of this image.
        result = self.batcher.submit(pre, heatmap=method == "gradcam").result()
        prob = result.probability
        out = {
            **self.verdict(prob, result.class_probabilities),
            "file_type": kind,
            "box": list(box) if box else None,
            "lesion_source": pre.lesion_source,
            "image": _png_b64(pre.image),
            "disclaimer": DISCLAIMER,
        }
        if result.heatmap is not None:
            out["heatmap"] = _png_b64(overlay(pre.image, result.heatmap))
        elif method is not None:
            out["heatmap"] = _png_b64(p.heatmap_figure(pre, image, prob, method, lesion_source=pre.lesion_source))
        if "heatmap" in out:
            out["heatmap_method"] = method
            note = p.method_note(method)
            out["heatmap_caption"] = CAPTIONS[method] + (f" {note}." if note else "")
        spread = p.member_range([pre])
        if spread is not None:
            out["member_range"] = [round(float(v), 6) for v in spread[0]]
        if p.has_contributions:
            found = p.contributions([pre])
            out["contributions"] = found.as_dicts()[0]
            out["baseline_probability"] = round(float(found.baseline_probability[0]), 6)
            out["training_lesions"] = found.training_context()
        return out

    def analyse_lesion(self, form: Form) -> dict:
        """Several images of one lesion: each image's answer, and the lesion's (the mean log-odds of its images')."""
        files, boxes = form.lists.get("file", []), form.lists.get("box", [])
        if self.predictor.is_three_class:
            raise HTTPException(400, "a three-class model answers per image: send each image to /api/predict")
        if not files:
            raise HTTPException(400, "no file: send the lesion's images in repeated multipart fields 'file'")
        if len(files) > MAX_LESION_IMAGES:
            raise HTTPException(400, f"at most {MAX_LESION_IMAGES} images of one lesion, got {len(files)}")
        if boxes and len(boxes) != len(files):
            raise HTTPException(400, f"give one box per image, in order: {len(files)} images, {len(boxes)} boxes")
        images = []
        for i, raw in enumerate(files):
            one = Form(fields={"file": raw, **({"box": boxes[i]} if boxes else {})})
            try:
                answer = self.analyse(one, heatmap=False)
            except HTTPException as exc:
                raise HTTPException(exc.status_code, f"image {i + 1}: {exc.detail}") from None
            images.append({k: answer[k] for k in ("probability_malignant", "lesion_source", "box", "file_type")})
        prob = mean_log_odds([im["probability_malignant"] for im in images])
        return {
            **self.verdict(prob),
            "aggregation": "mean log-odds of the lesion's images",
            "n_images": len(images),
            "images": images,
            "disclaimer": DISCLAIMER,
        }

    def heatmap_choice(self, flag: str) -> bool | str:
        """``?heatmap=``: a map of this model by name, or true/false for the default map or none (400 otherwise)."""
        methods = self.predictor.methods
        if flag not in ("true", "false", "1", "0", "yes", "no", *methods):
            maps = ", ".join(methods) or "none"
            raise HTTPException(400, f"heatmap must be true, false or a map of this model ({maps}), got {flag!r}")
        return flag if flag in methods else flag in ("true", "1", "yes")


def create_app(
    predictor: Predictor,
    *,
    max_upload_bytes: int = 20 * 2**20,
    max_pixels: int | None = None,
    api_docs: bool = False,
    max_batch: int = 16,
    batch_wait_ms: float = 5.0,
) -> FastAPI:
    """Build the app around a loaded predictor.

    Args:
        predictor: the model (loaded once, shared by all requests).
        max_upload_bytes: uploads larger than this are refused with 413.
        max_pixels: images larger than this (width x height) are refused with 400 (default: the reader's limit).
        api_docs: serve the OpenAPI schema and ``/docs`` (off by default: a deployment need not describe itself).
        max_batch: requests arriving together run as one batch of at most this many (1: no batching).
        batch_wait_ms: how long a batch waits for company after its first request.
    """
    batcher = DynamicBatcher(predictor, max_batch=max_batch, max_wait_ms=batch_wait_ms)
    service = _Service(predictor, batcher, max_upload_bytes, max_pixels)
    docs = {} if api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="liverus", version=predictor.version or "0", description=DISCLAIMER, **docs)
    page = render_page(predictor.name, max_upload_bytes)

    @app.exception_handler(FormError)
    async def form_error(_request: Request, exc: FormError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict:
        return service.health()

    @app.post("/api/image")
    async def image(request: Request) -> dict:
        return await service.preview(await read_form(request, max_upload_bytes))

    @app.post("/api/predict_lesion")
    async def predict_lesion(request: Request) -> dict:
        form = await read_form(
            request,
            max_upload_bytes * MAX_LESION_IMAGES,
            max_fields=2 * MAX_LESION_IMAGES + 2,  # room to refuse a ninth image in words
            repeated=("file", "box"),
        )
        return await run_in_threadpool(service.analyse_lesion, form)

    @app.post("/api/predict")
    async def predict(request: Request) -> dict:
        choice = service.heatmap_choice(request.query_params.get("heatmap", "true").lower())
        form = await read_form(request, max_upload_bytes)
        return await run_in_threadpool(service.analyse, form, choice)

    return app


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    predictor = Predictor.from_path(args.model, segmenter=args.segmenter, box_average=args.box_average)
    app = create_app(
        predictor,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        api_docs=args.api_docs,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
    )
    print(f"liverus serve: {predictor.name} ({predictor.backend}) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
