"""The HTTP API (FastAPI; OpenAPI docs at ``/docs``) and the web page at ``/``.

Endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, so a forward in one request
does not block the event loop for the others.
"""

from __future__ import annotations

import hmac
import io
import logging
import math
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from .inputs import InputError, clean_text, decode_base64, open_image
from .media import MEDIA_FIELDS, OPENERS, decode_media_b64
from .service import OnlineService

log = logging.getLogger("queryshift.serve")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="a text query (searches the gallery's images)")
    image_b64: str | None = Field(None, description="an image file, base64 (searches the gallery's texts)")
    audio_b64: str | None = Field(None, description="an audio file (WAV, FLAC, OGG ...), base64, where the model "
                                                    "has an audio tower (searches the other tower's gallery)")
    video_b64: str | None = Field(None, description="a video file (MP4, WebM ...), base64, where the model has a "
                                                    "video tower (searches the other tower's gallery)")
    k: int = Field(10, description="how many gallery items to return")
    adapt: bool = Field(True, description="answer with the adapted parameters and adapt on this query "
                                          "(false: the source parameters, and the query is not kept)")


class Result(BaseModel):
    id: int
    score: float
    text: str | None = None
    image: str | None = None
    audio: str | None = None  # the gallery clip's name (its file or key in the dataset)
    video: str | None = None


class SearchResponse(BaseModel):
    results: list[Result]
    adapted: bool


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any endpoint reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:  # also a body without Content-Length (chunked) is counted
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)


def echoable(value, depth: int = 0):
    """A request value as strict, bounded JSON for an error message: a non-finite number as its name
    (``nan``, ``inf``; the default handler fails to serialise it and answers 500), long strings and deep or
    long containers cut short, anything else as text."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "..."
    if depth >= 6:
        return "..."
    if isinstance(value, dict):
        return {str(k)[:100]: echoable(v, depth + 1) for k, v in list(value.items())[:20]}
    if isinstance(value, (list, tuple)):
        return [echoable(v, depth + 1) for v in list(value)[:20]]
    return str(value)[:200]


def create_app(service: OnlineService) -> FastAPI:
    cfg = service.cfg

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # uvicorn's shutdown, on SIGTERM or SIGINT too: stop the worker, final snapshot

    app = FastAPI(title="queryshift serve", version=__version__, lifespan=lifespan,
                  description="Retrieval that answers each query at once and adapts its query encoder online "
                              f"({cfg.method} on {cfg.model}, gallery {cfg.data}).")
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        return JSONResponse({"detail": echoable(list(err.errors()))}, status_code=422)

    def authorised(authorization: Annotated[str | None, Header()] = None) -> None:
        if cfg.token is None:
            if cfg.loopback():
                return
            raise HTTPException(403, "the mutating endpoints need --token on a server that is not bound to a "
                                     "loopback address")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), cfg.token.encode()):
            raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health():
        worker = service.worker
        gallery = {f"{la.gallery_modality}s": la.gallery.shape[0] for la in service.lanes.values()}
        return {"status": "ok", "gallery": gallery,
                "modalities": list(service.lanes), "adapting": cfg.adapt,
                "worker_alive": bool(worker and worker.is_alive())}

    @app.get("/stats")
    def stats(history: Annotated[int | None, Query(ge=0, description="only the last N diagnostics points")] = None):
        return service.stats(history)

    def answer(text: str | None, image: bytes | None, k: int, adapt: bool, field: str,
               media: dict[str, bytes | None] | None = None, media_fields: dict[str, str] | None = None):
        given = {"text": text, "image": image, **(media or {})}
        given = {m: v for m, v in given.items() if v is not None}
        if len(given) != 1:
            names = ["'text'", f"'{field}'"] + [f"'{f}'" for f in (media_fields or {}).values()]
            raise InputError(422, f"give exactly one of {', '.join(names)}")
        (modality, value), = given.items()
        if modality == "text":
            return service.search("text", clean_text(value, cfg), k, adapt)
        if modality == "image":
            return service.search("image", open_image(value, cfg, field), k, adapt)
        if modality not in service.lanes:  # before decoding: a server without that lane refuses cheaply
            service.query_item(modality, None)
        return service.search(modality, OPENERS[modality](value, cfg, media_fields[modality]), k, adapt)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True)
    def search(req: SearchRequest):
        """Top-k gallery items for a text, or a base64 image, audio or video file, with the parameters in force
        now."""
        image = decode_base64(req.image_b64, cfg) if req.image_b64 is not None else None
        media = {m: decode_media_b64(getattr(req, f), cfg, f) if getattr(req, f) is not None else None
                 for m, f in MEDIA_FIELDS.items()}
        return answer(req.text, image, req.k, req.adapt, "image_b64", media, MEDIA_FIELDS)

    @app.post("/search/upload", response_model=SearchResponse, response_model_exclude_none=True)
    def search_upload(image: Annotated[UploadFile | None, File()] = None,
                      audio: Annotated[UploadFile | None, File()] = None,
                      video: Annotated[UploadFile | None, File()] = None,
                      text: Annotated[str | None, Form()] = None, k: Annotated[int, Form()] = 10,
                      adapt: Annotated[bool, Form()] = True):
        """The same as ``/search`` from a multipart form: an image, audio or video file or a text field."""
        raw = image.file.read(cfg.max_image_bytes + 1) if image is not None else None
        media = {"audio": audio.file.read(cfg.max_media_bytes + 1) if audio is not None else None,
                 "video": video.file.read(cfg.max_media_bytes + 1) if video is not None else None}
        return answer(text, raw, k, adapt, "image", media, {"audio": "audio", "video": "video"})

    @app.post("/reset", dependencies=[Depends(authorised)])
    def reset():
        """Every lane back to the source parameters (bearer token when the server has one)."""
        return service.reset()

    @app.post("/snapshot", dependencies=[Depends(authorised)])
    def snapshot():
        """Write a snapshot of the adapted state to --state-dir now (bearer token when the server has one)."""
        return service.snapshot()

    @app.get("/gallery/image/{index}", responses={200: {"content": {"image/png": {}}}})
    def gallery_image(index: int):
        """A gallery image as a PNG thumbnail (what text queries return)."""
        if not 0 <= index < len(service.dataset.images):
            raise HTTPException(404, f"no gallery image {index}; the gallery has {len(service.dataset.images)}")
        try:
            image = service.dataset.load_image(index)
        except ValueError as err:
            raise HTTPException(404, str(err)) from err
        image.thumbnail((256, 256))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app
