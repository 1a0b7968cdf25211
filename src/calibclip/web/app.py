"""The web demo and JSON API (FastAPI; served by uvicorn through ``calibclip serve``).

Pages are server-rendered Jinja2 templates plus one small static script; every page action
goes through the JSON API below, which FastAPI documents at ``/openapi.json`` (and ``/docs``).

Security model: images are only ever served by id (indexed ids map to paths recorded in the
index; upload ids map to files in a private temporary directory) — no path from a request is
opened. Errors are JSON ``{"detail": ...}`` with a 4xx status; unexpected failures are logged
server-side and answered with a generic 500 message, never a stack trace.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from calibclip.web import schema
from calibclip.web.service import ImageNotFound, ServedIndex, image_bytes
from calibclip.web.uploads import UPLOAD_ID_RE, UploadError, UploadStore

log = logging.getLogger("calibclip.web")
HERE = Path(__file__).resolve().parent
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schema.ErrorResponse},
    404: {"model": schema.ErrorResponse},
    422: {"model": schema.ErrorResponse},
}
_ID_RE = re.compile(r"^[0-9]{1,12}$")


@dataclass
class WebConfig:
    """Everything `create_app` needs; JSON-serialisable so that worker processes can rebuild it."""

    index_dirs: list[str]
    model: Optional[str] = None
    captions: Optional[str] = None
    upload_dir: Optional[str] = None
    max_upload_bytes: int = 10 * 1024 * 1024
    upload_ttl_s: float = 3600.0
    device: str = "cpu"
    threads: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "WebConfig":
        return cls(**json.loads(text))


def _names(dirs: Sequence[str]) -> list[str]:
    """Unique URL-safe names for the served indexes (from their folder names)."""
    names: list[str] = []
    for d in dirs:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(d).resolve().name).strip("-.") or "index"
        base = base[:56]
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def create_app(config: WebConfig, indexes: Sequence[ServedIndex] | None = None) -> FastAPI:
    """Build the ASGI app. ``indexes`` (already opened) skips opening ``config.index_dirs``."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if indexes is None:
        if not config.index_dirs:
            raise ValueError("no index to serve: pass at least one INDEX_DIR built with `calibclip index`")
        names = _names(config.index_dirs)
        indexes = [
            ServedIndex.open(name, d, model=config.model, captions=config.captions if i == 0 else None,
                             device=config.device)
            for i, (name, d) in enumerate(zip(names, config.index_dirs))
        ]
    served: dict[str, ServedIndex] = {ix.name: ix for ix in indexes}
    default_name = indexes[0].name
    uploads = UploadStore(config.upload_dir, max_bytes=config.max_upload_bytes, ttl_s=config.upload_ttl_s)
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    from calibclip import __version__

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        uploads.close()

    app = FastAPI(
        lifespan=lifespan,
        title="calibclip",
        version=__version__,
        description="Text, calibrated and composed image retrieval over calibclip indexes.",
        openapi_tags=[{"name": "api", "description": "JSON API used by the pages"}],
    )
    app.state.indexes = served
    app.state.uploads = uploads
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # ---- errors: JSON, 4xx for the client's mistakes, generic 500 otherwise -----------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(ImageNotFound)
    async def _image_gone(request: Request, exc: ImageNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error (see the server log)"}, status_code=500)

    @app.middleware("http")
    async def _limit_upload_body(request: Request, call_next: Any) -> Response:
        if request.url.path == "/api/upload" and request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "uploads need a Content-Length header"}, status_code=411)
            if int(length) > uploads.max_bytes + 64 * 1024:  # multipart overhead allowance
                return JSONResponse(
                    {"detail": f"upload too large: the limit is {uploads.max_bytes:,} bytes"}, status_code=413
                )
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    # ---- helpers ---------------------------------------------------------------------------
    def get_index(name: str | None) -> ServedIndex:
        key = name or default_name
        ix = served.get(key)
        if ix is None:
            raise HTTPException(404, f"unknown index {key!r}; served indexes: {', '.join(served)}")
        return ix

    def image_url(ix: ServedIndex, image_id: str, size: str = "full") -> str:
        return f"/api/images/{image_id}?index={quote(ix.name)}&size={size}"

    def item(ix: ServedIndex, image_id: int) -> dict[str, Any]:
        sid = str(image_id)
        return {"id": sid, "path": ix.rel_path(image_id), "url": image_url(ix, sid), "thumb_url": image_url(ix, sid, "thumb")}

    def resolve_reference(ix: ServedIndex, ref: str) -> int | Path:
        """An indexed id (int) or the stored file of an upload; anything else is a 404."""
        if UPLOAD_ID_RE.match(ref):
            path = uploads.path(ref)
            if path is None:
                raise HTTPException(
                    404, f"upload {ref!r} not found (uploads expire after {uploads.ttl_s:.0f} s); upload it again"
                )
            return path
        if not _ID_RE.match(ref):
            raise HTTPException(404, f"no such image {ref[:100]!r}: ids are integers from the index or upload ids")
        image_id = int(ref)
        if not ix.has(image_id):
            raise HTTPException(404, f"image {ref!r} is not in index {ix.name!r}")
        return image_id

    # ---- pages -----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request) -> Response:
        cards = []
        for ix in served.values():
            preview = [item(ix, i) for i in ix.sample(4, seed=0)]
            cards.append({**ix.info(), "preview": preview})
        return templates.TemplateResponse(request, "home.html", {"indexes": cards, "version": __version__})

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request, index: Optional[str] = None, mode: str = "text") -> Response:
        if index is not None and index not in served:
            return RedirectResponse("/", status_code=303)
        ix = get_index(index)
        return templates.TemplateResponse(
            request,
            "search.html",
            {
                "index": ix.info(),
                "indexes": [i.info() for i in served.values()],
                "mode": "composed" if mode == "composed" else "text",
                "version": __version__,
            },
        )

    # ---- API -------------------------------------------------------------------------------
    @app.get("/api/health", response_model=schema.Health, tags=["api"])
    def health() -> dict[str, Any]:
        """Liveness: the server is up and its indexes are loaded."""
        return {"status": "ok", "indexes": len(served), "version": __version__}

    @app.get("/api/indexes", response_model=schema.IndexList, tags=["api"])
    def list_indexes() -> dict[str, Any]:
        """The served indexes (the first is the default)."""
        return {"indexes": [ix.info() for ix in served.values()]}

    @app.post("/api/search", response_model=schema.SearchResponse, responses=_ERRORS, tags=["api"])
    def search(req: schema.SearchRequest) -> dict[str, Any]:
        """Text search (``text``), image search (``reference``) or composed search (both)."""
        ix = get_index(req.index)
        text = (req.text or "").strip() or None
        if text is None and req.reference is None:
            raise HTTPException(400, "give a query: `text`, `reference` (image id or upload id), or both")
        image = resolve_reference(ix, req.reference) if req.reference is not None else None
        if req.calibrate and not ix.can_calibrate:
            raise HTTPException(400, f"index {ix.name!r} has no calibrated features; rebuild it with calibration")
        hits = ix.search(text=text, image=image, k=req.k, calibrate=req.calibrate)
        target = ix.annotated_target(image, text) if isinstance(image, int) and text else None
        results = []
        for hit in hits:
            entry = item(ix, hit.id)
            entry.update(score=float(hit.score), rank=int(hit.rank), is_target=hit.id == target)
            results.append(entry)
        return {
            "index": ix.name,
            "query": {"text": text, "reference": req.reference, "k": req.k, "calibrate": req.calibrate},
            "target": None if target is None else str(target),
            "results": results,
        }

    @app.post("/api/upload", response_model=schema.UploadResponse, status_code=201, responses={
        400: {"model": schema.ErrorResponse}, 411: {"model": schema.ErrorResponse},
        413: {"model": schema.ErrorResponse}, 422: {"model": schema.ErrorResponse}}, tags=["api"])
    def upload(file: UploadFile = File(..., description="an image file (JPEG, PNG, WebP, ...)")) -> dict[str, Any]:
        """Upload a reference image; returns an id usable as `reference` (expires after a while)."""
        data = file.file.read(uploads.max_bytes + 1)
        try:
            upload_id = uploads.add(data)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        from PIL import Image

        with Image.open(uploads.path(upload_id)) as img:  # our own re-encoded JPEG
            width, height = img.size
        url = f"/api/images/{upload_id}?size=full"
        return {"id": upload_id, "url": url, "thumb_url": f"/api/images/{upload_id}?size=thumb", "width": width, "height": height}

    @app.get("/api/images/{image_id}", responses={200: {"content": {"image/jpeg": {}}}, **_ERRORS}, tags=["api"],
             response_class=Response)
    def get_image(
        image_id: str,
        index: Optional[str] = Query(None, max_length=100),
        size: str = Query("full", pattern="^(thumb|full)$"),
    ) -> Response:
        """An indexed image (by id) or an upload (by upload id), as JPEG: thumbnail or full size."""
        ix = get_index(index)
        source = resolve_reference(ix, image_id)
        data = image_bytes(ix, source, thumb=size == "thumb")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/sample", response_model=schema.SampleResponse, responses=_ERRORS, tags=["api"])
    def sample(
        index: Optional[str] = Query(None, max_length=100),
        n: int = Query(12, ge=1, le=100),
        seed: Optional[int] = Query(None, ge=0, le=2**31 - 1),
        annotated: bool = Query(False, description="only images with suggested modifications"),
    ) -> dict[str, Any]:
        """A random sample of the gallery (candidate references)."""
        ix = get_index(index)
        ids = ix.sample(n, seed, annotated=annotated)
        return {"index": ix.name, "items": [item(ix, i) for i in ids]}

    @app.get("/api/suggestions", response_model=schema.SuggestionResponse, responses=_ERRORS, tags=["api"])
    def suggestions(
        reference: str = Query(..., max_length=100),
        index: Optional[str] = Query(None, max_length=100),
    ) -> dict[str, Any]:
        """Annotated modification texts for a reference image (empty when the index has none)."""
        ix = get_index(index)
        image = resolve_reference(ix, reference)
        pairs = ix.suggestions_for(image) if isinstance(image, int) else []
        return {
            "index": ix.name,
            "reference": reference,
            "suggestions": [{"text": t, "target": None if g is None else str(g)} for t, g in pairs],
        }

    @app.post("/api/explain", response_model=schema.ExplainResponse, responses=_ERRORS, tags=["api"])
    def explain(req: schema.ExplainRequest) -> dict[str, Any]:
        """CalibCLIP explanation: the query's dominant words and, per image, the token heatmap."""
        ix = get_index(req.index)
        text = (req.text or "").strip() or None
        if text is None and not req.ids:
            raise HTTPException(400, "give `text` and/or `ids` to explain")
        sources = [resolve_reference(ix, i) for i in req.ids]
        words = ix.explain_text(text) if text else []
        images = ix.explain_images(sources) if sources else []
        out_images = []
        for image_id, exp in zip(req.ids, images):
            url = f"/api/heatmap/{image_id}?index={quote(ix.name)}"
            out_images.append({"id": image_id, **exp, "heatmap_url": url})
        return {
            "index": ix.name,
            "dominant_words": [w["token"] for w in words if w["dominant"]],
            "tokens": words,
            "images": out_images,
        }

    @app.get("/api/heatmap/{image_id}", responses={200: {"content": {"image/png": {}}}, **_ERRORS}, tags=["api"],
             response_class=Response)
    def heatmap(image_id: str, index: Optional[str] = Query(None, max_length=100)) -> Response:
        """PNG of an image with its CalibCLIP token treatment (suppress/decay/retain) overlaid."""
        ix = get_index(index)
        source = resolve_reference(ix, image_id)
        return Response(ix.heatmap_png(source), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: the config comes from ``CALIBCLIP_WEB_CONFIG`` (JSON)."""
    raw = os.environ.get("CALIBCLIP_WEB_CONFIG")
    if not raw:
        raise RuntimeError("CALIBCLIP_WEB_CONFIG is not set; start the server with `calibclip serve INDEX_DIR`")
    return create_app(WebConfig.from_json(raw))


__all__ = ["WebConfig", "create_app", "app_from_env"]
