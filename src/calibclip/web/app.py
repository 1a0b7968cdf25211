"""The web demo and JSON API (FastAPI; served by uvicorn through ``calibclip serve``).

Pages are server-rendered Jinja2 templates plus one small static script; every page action
goes through the JSON API below, which FastAPI documents at ``/openapi.json`` (and ``/docs``).

Security model: images are only ever served by id (indexed ids map to paths recorded in the
index; upload ids map to files in a private temporary directory) — no path from a request is
opened. Request bodies are capped per route before they are read, the Host header must name an
allowed host, state-changing requests from other origins are refused, and pages carry a strict
Content-Security-Policy (see `calibclip.web.security`). Errors are JSON ``{"detail": ...}`` with a
4xx status; unexpected failures are logged server-side and answered with a generic 500 message,
never a stack trace.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from calibclip.web.batching import BatchSettings, Overloaded
from calibclip.web.deps import WebState
from calibclip.web.routes import ROUTERS
from calibclip.web.security import BodyLimit, HostGuard, default_allowed_hosts, normalise_hosts
from calibclip.web.service import ImageNotFound, ServedIndex
from calibclip.web.uploads import UploadStore

log = logging.getLogger("calibclip.web")
HERE = Path(__file__).resolve().parent
#: Largest JSON body of `POST /api/search` (its fields fit in about 1 KB); `/api/explain` gets 4x
#: (50 ids), every other route this much too (none reads a body but the upload, which has its own).
JSON_BODY_LIMIT = 8 * 1024
#: Allowance for the multipart framing around an upload.
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class WebConfig:
    """Everything `create_app` needs; JSON-serialisable so that worker processes can rebuild it."""

    index_dirs: list[str]
    model: str | None = None
    captions: str | None = None
    upload_dir: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    upload_ttl_s: float = 3600.0
    device: str = "cpu"
    threads: int | None = None
    host: str = "127.0.0.1"
    allowed_hosts: list[str] | None = None
    max_json_bytes: int = JSON_BODY_LIMIT
    batch_window_ms: float = BatchSettings.window_ms
    batch_size: int = BatchSettings.max_batch
    batch_queue: int = BatchSettings.max_queue
    request_timeout_s: float = BatchSettings.timeout_s
    refresh_s: float | None = 1.0

    def batching(self) -> BatchSettings:
        """The micro-batching settings (validated)."""
        return BatchSettings(self.batch_window_ms, self.batch_size, self.batch_queue, self.request_timeout_s)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> WebConfig:
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
    """Build the ASGI app. ``indexes`` (already opened) skips opening ``config.index_dirs``.

    Raises:
        ValueError: no index to serve, or a malformed allowed host.
    """
    hosts = normalise_hosts(config.allowed_hosts or default_allowed_hosts(config.host))
    batching = config.batching()
    if config.refresh_s is not None and config.refresh_s < 0:
        raise ValueError(f"refresh interval must be >= 0 s (or None: never), got {config.refresh_s}")
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if indexes is None:
        if not config.index_dirs:
            raise ValueError("no index to serve: pass at least one INDEX_DIR built with `calibclip index`")
        names = _names(config.index_dirs)
        indexes = [
            ServedIndex.open(
                name,
                d,
                model=config.model,
                captions=config.captions if i == 0 else None,
                device=config.device,
                batching=batching,
                refresh_s=config.refresh_s,
            )
            for i, (name, d) in enumerate(zip(names, config.index_dirs))
        ]
    from calibclip import __version__

    state = WebState(
        indexes={ix.name: ix for ix in indexes},
        default=indexes[0].name,
        uploads=UploadStore(config.upload_dir, max_bytes=config.max_upload_bytes, ttl_s=config.upload_ttl_s),
        templates=Jinja2Templates(directory=str(HERE / "templates")),
        version=__version__,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.uploads.close()
        for ix in state.indexes.values():
            ix.close()

    app = FastAPI(
        lifespan=lifespan,
        title="calibclip",
        version=__version__,
        description="Text, calibrated and composed image retrieval over calibclip indexes.",
        openapi_tags=[{"name": "api", "description": "JSON API used by the pages"}],
        docs_url=None,  # served by routes/pages.py from the local Swagger UI bundle
        redoc_url=None,
    )
    app.state.web = state
    app.state.indexes = state.indexes
    app.state.uploads = state.uploads
    _mount_swagger_ui(app)  # before /static, which would shadow it
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for router in ROUTERS:
        app.include_router(router)
    _install_error_handlers(app)
    # outermost first: Host / same-origin check and headers, then body caps, then the app
    app.add_middleware(
        BodyLimit,
        limits={
            "/api/search": config.max_json_bytes,
            "/api/explain": 4 * config.max_json_bytes,
            "/api/upload": state.uploads.max_bytes + MULTIPART_OVERHEAD,
        },
        default=config.max_json_bytes,
        length_required=["/api/upload"],
    )
    app.add_middleware(HostGuard, allowed_hosts=hosts, docs_path="/docs")
    return app


def _mount_swagger_ui(app: FastAPI) -> None:
    """Swagger UI 5 (OpenAPI 3.1) files from the ``fastapi-offline`` package, at /static/swagger-ui/."""
    import fastapi_offline

    files = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount("/static/swagger-ui", StaticFiles(directory=str(files)), name="swagger-ui")


def _install_error_handlers(app: FastAPI) -> None:
    """Errors are JSON ``{"detail": ...}``: 4xx for the client's mistakes, a generic 500 otherwise."""

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

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ImageNotFound)
    async def _image_gone(request: Request, exc: ImageNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error (see the server log)"}, status_code=500)


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: the config comes from ``CALIBCLIP_WEB_CONFIG`` (JSON)."""
    raw = os.environ.get("CALIBCLIP_WEB_CONFIG")
    if not raw:
        raise RuntimeError("CALIBCLIP_WEB_CONFIG is not set; start the server with `calibclip serve INDEX_DIR`")
    return create_app(WebConfig.from_json(raw))


__all__ = ["WebConfig", "create_app", "app_from_env"]
