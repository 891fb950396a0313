"""Prediction service: FastAPI app + uvicorn runner (`python -m engine serve`).

    POST /predict   multipart field `images` (one or several files) -> boxes, scores, image size, timing
    GET  /health    {"status": "ok"}: answered on the event loop, never waits for inference
    GET  /model     what is loaded (backend, model name, input size, threshold, limits)
    GET  /docs      OpenAPI UI (/openapi.json)

The model is loaded once per worker process: a PyTorch checkpoint (engine.predict.Predictor) or an
exported ONNX model (engine.export.OnnxPredictor). Decoding and inference run in a thread pool of
`threads` threads, so a slow request never blocks /health or the accept loop; `workers` uvicorn
processes each hold their own model.

Bad requests get a 4xx with {"detail": "<one line>"}: 400 wrong or missing field / bad parameter,
401 missing or wrong token, 413 upload too large or too many images, 422 not an image, truncated,
or a decompression bomb. The body is counted while it streams in, so an oversized upload is
refused without being stored.

Access: bound to a loopback address the service is open unless SERVE_TOKEN is set; bound to any
other address it refuses to start without SERVE_TOKEN, and then /predict and /model need
`Authorization: Bearer <token>` (/health, /docs and /openapi.json stay open for probes and readers).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineError

TOKEN_ENV = "SERVE_TOKEN"
SETTINGS_ENV = "ENGINE_SERVE_SETTINGS"  # JSON ServeSettings, how uvicorn worker processes get theirs
IMAGES_FIELD = "images"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and headers on top of the image bytes
log = logging.getLogger(__name__)


class ServeError(EngineError):
    """The service cannot start as asked; one line."""


@dataclass
class ServeSettings:
    checkpoint: Optional[str] = None
    onnx: Optional[str] = None
    host: str = "127.0.0.1"
    device: str = "cpu"
    threads: int = 1
    intra_threads: int = 0  # threads inside one inference (torch / ONNX Runtime); 0 = the library's default
    max_image_mb: float = 10.0
    max_images: int = 8

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        return self.max_images * self.max_image_bytes + FORM_OVERHEAD_BYTES


def is_loopback(host: Optional[str]) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0, '' and every other address."""
    if not host:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(settings: ServeSettings, token: Optional[str]) -> None:
    """ServeError for a setting the service must not start with."""
    if bool(settings.checkpoint) == bool(settings.onnx):
        raise ServeError("give exactly one of --checkpoint or --onnx")
    if not is_loopback(settings.host) and not token:
        raise ServeError(f"refusing to listen on {settings.host} without a token: set {TOKEN_ENV} "
                         f"(clients send 'Authorization: Bearer <token>'), or bind to 127.0.0.1")
    if settings.threads < 1 or settings.max_images < 1 or settings.max_image_mb <= 0 or settings.intra_threads < 0:
        raise ServeError("--threads and --max-images must be at least 1, --intra-threads at least 0 "
                         "and --max-image-mb above 0")


# ----------------------------------------------------------------------------- the loaded model
class LoadedModel:
    """A Predictor or OnnxPredictor plus what /model reports about it."""

    def __init__(self, settings: ServeSettings):
        if settings.intra_threads:
            import torch

            torch.set_num_threads(settings.intra_threads)
        if settings.onnx:
            from engine.export import OnnxPredictor

            self.predictor = OnnxPredictor(settings.onnx, device=settings.device, threads=settings.intra_threads)
            meta = self.predictor.meta
            self.info = {"backend": "onnxruntime", "device": self.predictor.provider, "source": settings.onnx,
                         "model": meta.get("model"), "input_size": meta["input"]["size"],
                         "max_size": meta["input"]["max_size"], "score_threshold": meta.get("score_threshold", 0.5),
                         "class_names": meta.get("class_names"), "checkpoint": meta.get("source_checkpoint")}
        else:
            from engine.predict import Predictor

            self.predictor = Predictor(settings.checkpoint, device=settings.device)
            cfg = self.predictor.config
            self.info = {"backend": "pytorch", "device": str(self.predictor.device), "source": settings.checkpoint,
                         "model": cfg.model.name, "input_size": cfg.input.test_size, "max_size": cfg.input.max_size,
                         "score_threshold": cfg.eval.score_threshold, "class_names": None,
                         "checkpoint": str(Path(settings.checkpoint).resolve())}
        self.score_threshold = float(self.info["score_threshold"])


# ----------------------------------------------------------------------------- body size limit
class BodyLimit:
    """ASGI middleware: 413 for a request whose body is (or is declared) larger than max_bytes.

    A declared Content-Length over the cap is answered before anything is read; otherwise the
    bytes are counted as they arrive and reading stops at the cap."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self._message())
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(self._message())
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, self._message())

    def _message(self) -> str:
        return f"request too large (the limit is {self.max_bytes / 2**20:.1f} MB)"


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on and it becomes the 413 response."""

    def __init__(self, detail: str):
        super().__init__(413, detail, headers={"Connection": "close"})


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- the app
def _one_line_validation(exc) -> str:
    """FastAPI's validation errors as one line that names the field."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        field = ".".join(loc) or "request"
        if field == IMAGES_FIELD and err.get("type") == "missing":
            parts.append(f"missing multipart field '{IMAGES_FIELD}' (one or several image files, "
                         f"Content-Type multipart/form-data)")
        else:
            parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)[:500] or "invalid request"


def create_app(settings: ServeSettings, token: Optional[str] = None, model: Optional[LoadedModel] = None):
    """The FastAPI app; loads the model unless one is given."""
    from engine.predict import ImageError, load_image

    model = model or LoadedModel(settings)
    pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="infer")
    bearer = HTTPBearer(auto_error=False, description=f"the service's {TOKEN_ENV}")
    app = FastAPI(title="Plate detector", version="1", description="License-plate detection service. "
                  "POST images to /predict; boxes are [x1, y1, x2, y2] in the image's pixels.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if not token:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            raise HTTPException(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _one_line_validation(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({exc.__class__.__name__})"}, status_code=500)

    @app.get("/health", summary="liveness and readiness")
    async def health():
        return {"status": "ok"}

    @app.get("/model", summary="what is loaded", dependencies=[Depends(authorize)])
    async def model_info():
        return {**model.info, "limits": {"max_image_mb": settings.max_image_mb, "max_images": settings.max_images,
                                         "max_request_mb": round(settings.max_request_bytes / 2**20, 2)},
                "threads": settings.threads, "intra_threads": settings.intra_threads}

    def decode_and_predict(name: str, data: bytes) -> dict:
        start = time.perf_counter()
        image = load_image(data, name=name)
        decode_ms = (time.perf_counter() - start) * 1000
        result = model.predictor.predict(image)
        return {**result, "timing": {"decode_ms": round(decode_ms, 2), **result["timing"]}}

    @app.post("/predict", summary="detect plates in one or several images", dependencies=[Depends(authorize)])
    async def predict(images: list[UploadFile] = File(..., description="one or several image files"),
                      score_threshold: Optional[float] = Query(None, ge=0.0, le=1.0,
                                                               description="default: the model's threshold")):
        start = time.perf_counter()
        if len(images) > settings.max_images:
            raise HTTPException(413, f"too many images ({len(images)}; the limit is {settings.max_images})")
        threshold = model.score_threshold if score_threshold is None else score_threshold
        loop = asyncio.get_running_loop()
        out = []
        for index, upload in enumerate(images):
            name = upload.filename or f"image {index + 1}"
            data = await upload.read(settings.max_image_bytes + 1)
            if len(data) > settings.max_image_bytes:
                raise HTTPException(413, f"{name}: file too large (the limit is {settings.max_image_mb:g} MB)")
            try:
                result = await loop.run_in_executor(pool, decode_and_predict, name, data)
            except ImageError as exc:
                raise HTTPException(422, str(exc)) from None
            keep = [i for i, s in enumerate(result["scores"]) if s >= threshold]
            out.append({"filename": name, "width": result["width"], "height": result["height"],
                        "boxes": [result["boxes"][i] for i in keep], "scores": [result["scores"][i] for i in keep],
                        "timing": {**result["timing"], "total_ms": result["ms"] + result["timing"]["decode_ms"]}})
        return {"model": model.info["model"], "backend": model.info["backend"], "score_threshold": threshold,
                "images": out, "timing": {"request_ms": round((time.perf_counter() - start) * 1000, 2)}}

    app.state.model = model
    return app


def app_from_env():
    """uvicorn factory for worker processes: settings from ENGINE_SERVE_SETTINGS, token from SERVE_TOKEN."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    return create_app(settings, token=os.environ.get(TOKEN_ENV) or None)


def serve(checkpoint: Optional[str] = None, onnx: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, threads: int = 1, device: str = "cpu", max_image_mb: float = 10.0,
          max_images: int = 8, intra_threads: int = 0) -> None:
    """Check the settings, load the model (once per worker) and run uvicorn until interrupted."""
    import uvicorn

    settings = ServeSettings(checkpoint=checkpoint, onnx=onnx, host=host, device=device, threads=threads,
                             intra_threads=intra_threads, max_image_mb=max_image_mb, max_images=max_images)
    token = os.environ.get(TOKEN_ENV) or None
    check_settings(settings, token)
    if workers < 1:
        raise ServeError("--workers must be at least 1")
    if workers == 1:
        app = create_app(settings, token=token)  # a bad checkpoint fails here, before the port is opened
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    LoadedModel(settings)  # fail fast on a bad model before starting the workers
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    uvicorn.run("engine.serve:app_from_env", factory=True, host=host, port=port, workers=workers, log_level="info")
