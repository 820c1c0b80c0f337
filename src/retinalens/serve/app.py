"""The FastAPI application: one HTML page (its script and style under /static), the model card, the REST API.

    POST /api/predict            multipart, one or many files -> class, probabilities, referral, gate
    POST /api/volume             multipart, the B-scans of one OCT volume -> the volume's answer and each B-scan's
    GET  /api/analyses/{id}      the stored record;  GET /api/analyses/{id}/heatmap.png  the Grad-CAM overlay;
    GET  /api/analyses/{id}/image  the stored image (its metadata removed)
    POST /api/feedback           {"analysis_id", "label"}: a clinician confirms or corrects a label
    GET  /api/model              the model card;  GET /healthz;  GET /openapi.json (the contract), /docs
    GET  /login, POST /login     the page's login when an API token is set (a cookie; scripts send the Bearer header)

Blocking work runs in threads, so that the event loop keeps serving while a model runs: inference
through the batcher (images of concurrent requests together, `threads` model calls at a time), heat
maps one at a time under the service's lock, the database in anyio's default pool.

Bad input is a 4xx with a JSON {"detail": ...}, never a 500: validation errors are reported without
echoing the input (a lone surrogate or a NaN could not be encoded back), storage failures are 507/503
naming what failed (the server log says which, without any request data). security.Guard, outermost,
checks Host, Origin and the token, adds the security headers and writes the access log.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name
# fastapi.Request from the lazily imported module, so they must be real objects.
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..bundle.card import served_card_markdown
from ..data.dicom import DicomTooLarge
from ..errors import ImageDecodeError, RetinaLensError
from ._deps import require
from .batching import Batcher
from ..feedback.store import StorageError, UnknownAnalysis
from .limits import BodyLimit
from .pages import docs_page, index_page, model_card_page
from .security import COOKIE, Guard, csp_for_page, session_value
from .service import ServeConfig, Service
from .uploads import ImageTooLarge
from .volume import VOLUME_DESCRIPTION, in_slice_order, per_file, volume_answer, with_frames

LOG = logging.getLogger("uvicorn.error")
IMAGE_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png", "tiff": "image/tiff", "bmp": "image/bmp",
               "webp": "image/webp"}
ANALYSIS_ID = "^[0-9a-f]{32}$"  # uuid4().hex: anything else is no id of ours, refused before any lookup
LOGIN_PAGE = ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>RetinaLens: log in</title>'
              '<link rel="icon" href="data:,"></head><body><h1>RetinaLens</h1><form method="post" action="/login">'
              '<label>API token <input type="password" name="token" autocomplete="current-password" required></label> '
              '<button type="submit">Log in</button></form>{error}</body></html>\n')

_PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "description": "One or more images (JPEG, PNG, TIFF, BMP, WebP; judged by content)."}}}}}}}

_PREDICT_DESCRIPTION = (
    "One result per file, in order: `{index, name, id, label, probabilities, referral, p_referral, refer, gate, "
    "heatmap}`, or `{index, name, error}` for a file that is not an image. When the quality gate refuses an image "
    "(`gate.ok` false: ungradable), it has no result: `label`, `referral`, `refer`, `probabilities` and `p_referral` "
    "are null, and the model's raw output is only in `probabilities_unvalidated`, which must not be shown as a "
    "class probability. A multi-frame DICOM file (an OCT volume) is answered as a volume, as `POST /api/volume` "
    "answers one: it is not in `results` but in `volumes`, one `{index, name, volume, results}` per such file "
    "(`index` its position in the request, `results` its frames in file order, `volume` the eye-level answer "
    "with `grouping` \"file\"); `volumes` is empty when no file is one.")


def create_app(cfg: ServeConfig, service: Service | None = None) -> Any:
    """The ASGI app. Loads the model and opens the feedback store now, so that bad input fails before serving."""
    fastapi = require("fastapi")
    anyio = require("anyio")
    responses = require("fastapi.responses")
    from starlette.datastructures import UploadFile

    service = service or Service(cfg)
    batcher = Batcher(service.predict, calls=cfg.model_calls, max_batch=cfg.max_batch)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()

    app = fastapi.FastAPI(
        title="RetinaLens", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Deep-learning triage of retinal images. Research only, not a medical device.")
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes)
    app.add_middleware(Guard, allowed_hosts=cfg.host_names, token=cfg.token, routes=app.routes)  # last: outermost
    app.state.service = service
    # The page's script and style sheet, as files: a Content-Security-Policy of `script-src 'self'` forbids inline ones.
    app.mount("/static", require("starlette.staticfiles").StaticFiles(packages=[("retinalens.serve", "static")]),
              name="static")

    def http_error(status: int, message: str) -> Any:
        return fastapi.HTTPException(status_code=status, detail=message)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(_request: Any, exc: Any) -> Any:
        # Where and what, never the input: FastAPI's own handler echoes it and fails on what JSON cannot hold.
        errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()]
        return responses.JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StorageError)
    async def storage(request: Any, exc: StorageError) -> Any:
        route = getattr(request.scope.get("route"), "path", "?")
        LOG.error("%s %s: %s", request.method, route, exc)  # the store's message: what failed, no request data
        return responses.JSONResponse({"detail": str(exc)}, status_code=507 if exc.full else 503)

    def page(html: str) -> Any:
        return responses.HTMLResponse(html, headers={"Content-Security-Policy": csp_for_page(html)})

    @app.get("/", response_class=responses.HTMLResponse, include_in_schema=False)
    async def index() -> Any:
        return page(index_page(service.model_card()))

    @app.get("/model", response_class=responses.HTMLResponse, include_in_schema=False)
    async def model_page() -> Any:
        return page(model_card_page(service.model_card(), served_card_markdown(service.model.bundle)))

    @app.get("/docs", response_class=responses.HTMLResponse, include_in_schema=False)
    async def docs() -> Any:
        return page(docs_page(app.openapi()))

    @app.get("/login", response_class=responses.HTMLResponse, include_in_schema=False)
    async def login_page() -> Any:
        return page(LOGIN_PAGE.format(error=""))

    @app.post("/login", include_in_schema=False)
    async def login(request: fastapi.Request) -> Any:
        form = await request.form(max_files=0, max_fields=4)
        given = str(form.get("token") or "")
        if not cfg.token or not hmac.compare_digest(given.encode(), cfg.token.encode()):
            return responses.HTMLResponse(LOGIN_PAGE.format(error="<p>Wrong token.</p>"), status_code=401)
        answer = responses.RedirectResponse("/", status_code=303)
        answer.set_cookie(COOKIE, session_value(cfg.token), httponly=True, samesite="strict", path="/")
        return answer

    @app.get("/healthz", summary="Liveness: the model is loaded and the feedback storage takes writes",
             responses={503: {"description": "degraded: the images folder or the database cannot be written"}})
    async def healthz() -> Any:
        problem = await anyio.to_thread.run_sync(service.store.health)
        if problem:
            return responses.JSONResponse({"status": "degraded", "storage": problem, "model": service.version.sha256},
                                          status_code=503)
        return {"status": "ok", "model": service.version.sha256}

    @app.get("/api/model", summary="The model card (from the bundle manifest) and the upload limits")
    async def model_card() -> dict[str, Any]:
        return service.model_card()

    @app.post("/api/predict", summary="Analyse one or many images", openapi_extra=_PREDICT_BODY,
              description=_PREDICT_DESCRIPTION,
              responses={400: {"description": "no files, or too many"},
                         413: {"description": "over the upload limit, an image of too many pixels, or a DICOM file of too many frames"},
                         503: {"description": "the feedback storage cannot be written"},
                         507: {"description": "the feedback storage is full"}})
    async def predict(request: fastapi.Request) -> dict[str, Any]:
        expanded, sniffed, predictions, results = await analyse(request, with_frames)
        return {"model": service.version.sha256, **per_file(expanded, sniffed, predictions, results)}

    @app.post("/api/volume", summary="Analyse uploaded B-scans as one OCT volume", openapi_extra=_PREDICT_BODY,
              description=VOLUME_DESCRIPTION, responses={400: {"description": "no files, or too many"},
                                                          413: {"description": "over the upload limit"}})
    async def volume(request: fastapi.Request) -> dict[str, Any]:
        _, sniffed, predictions, results = await analyse(request, in_slice_order)
        return {"model": service.version.sha256, "volume": volume_answer(sniffed, predictions), "results": results}

    async def analyse(request: fastapi.Request, order: Any) -> tuple[Any, list[Any], list[Any], list[Any]]:
        """The uploaded files, multi-frame ones expanded to their frames by `order` (serve/volume.py), sniffed,
        predicted (through the batcher) and stored: (the expansion, uploads, model results of the readable
        ones, one response result per upload)."""
        form = await request.form(max_files=cfg.max_files, max_fields=cfg.max_files)
        try:
            files = [(value.filename, await value.read()) for _, value in form.multi_items()
                     if isinstance(value, UploadFile)]
        finally:
            await form.close()
        try:
            expanded = await anyio.to_thread.run_sync(order, files)  # a DICOM volume's frames are decoded here
        except DicomTooLarge as exc:
            raise http_error(413, str(exc)) from None
        except ImageDecodeError as exc:
            raise http_error(422, str(exc)) from None
        if not expanded.files:
            raise http_error(400, "no files: send images as multipart/form-data field 'files'")
        try:
            sniffed = service.sniff(expanded.files)  # reads headers only: cheap enough for the event loop
        except ImageTooLarge as exc:
            raise http_error(413, str(exc)) from None
        for k, error in expanded.errors.items():  # a multi-frame file that cannot be read whole
            sniffed[k].error = error
        predictions = await batcher.predict([u.data for u in sniffed if not u.error])
        results = await anyio.to_thread.run_sync(service.record, sniffed, predictions)
        return expanded, sniffed, predictions, results

    @app.get("/api/analyses/{analysis_id}", summary="A stored analysis with its latest feedback",
             responses={404: {"description": "no such analysis"}})
    async def analysis(analysis_id: str = fastapi.Path(pattern=ANALYSIS_ID)) -> dict[str, Any]:
        try:
            return await anyio.to_thread.run_sync(service.analysis, analysis_id)
        except UnknownAnalysis as exc:
            raise http_error(404, str(exc)) from None

    @app.get("/api/analyses/{analysis_id}/heatmap.png", summary="Grad-CAM overlay for the predicted class",
             response_class=responses.Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such analysis"}})
    async def heatmap(analysis_id: str = fastapi.Path(pattern=ANALYSIS_ID)) -> Any:
        try:
            png = await anyio.to_thread.run_sync(service.heatmap_png, analysis_id)
        except UnknownAnalysis as exc:
            raise http_error(404, str(exc)) from None
        return responses.Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/analyses/{analysis_id}/image", summary="The stored image (metadata removed), e.g. a volume's B-scan",
             response_class=responses.Response, responses={404: {"description": "no such analysis"}})
    async def stored_image(analysis_id: str = fastapi.Path(pattern=ANALYSIS_ID)) -> Any:
        try:
            record = await anyio.to_thread.run_sync(service.analysis, analysis_id)
            data = await anyio.to_thread.run_sync(service.store.read_image, record)
        except UnknownAnalysis as exc:
            raise http_error(404, str(exc)) from None
        return responses.Response(data, media_type=IMAGE_TYPES.get(record["image"].rsplit(".", 1)[-1], "image/png"),
                                  headers={"Cache-Control": "private, max-age=86400"})

    @app.post("/api/feedback", summary="Confirm or correct the label of an analysed image",
              responses={404: {"description": "no such analysis"},
                         422: {"description": "a label that is not one of the model's classes, or a malformed body"}})
    async def feedback(analysis_id: str = fastapi.Body(..., pattern=ANALYSIS_ID),
                       label: str = fastapi.Body(..., max_length=64)) -> dict[str, Any]:
        try:
            return await anyio.to_thread.run_sync(service.feedback, analysis_id, label)
        except UnknownAnalysis as exc:
            raise http_error(404, str(exc)) from None
        except RetinaLensError as exc:
            raise http_error(422, str(exc)) from None

    return app


def _version() -> str:
    from .._version import __version__

    return __version__
