"""HTML pages: the index list, the search page, the API docs page (Swagger UI served from this
server, not a CDN) and the favicon."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from calibclip.web.deps import WebState, get_state, item

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parents[1] / "static"


@router.get("/", response_class=HTMLResponse)
def home(request: Request, state: WebState = Depends(get_state)) -> Response:
    cards = []
    for name in state.indexes:
        ix = state.index(name)
        preview = [item(ix, i) for i in ix.sample(4, seed=0)]
        cards.append({**ix.info(), "preview": preview})
    return state.templates.TemplateResponse(request, "home.html", {"indexes": cards, "version": state.version})


@router.get("/search", response_class=HTMLResponse)
def search_page(
    request: Request, index: str | None = None, mode: str = "text", state: WebState = Depends(get_state)
) -> Response:
    if index is not None and index not in state.indexes:
        return RedirectResponse("/", status_code=303)
    ix = state.index(index)
    return state.templates.TemplateResponse(
        request,
        "search.html",
        {
            "index": ix.info(),
            "indexes": [i.info() for i in state.indexes.values()],
            "mode": "composed" if mode == "composed" else "text",
            "version": state.version,
        },
    )


@router.get("/docs", response_class=HTMLResponse)
def api_docs(request: Request, state: WebState = Depends(get_state)) -> Response:
    """Interactive documentation of the JSON API (Swagger UI over /openapi.json)."""
    return state.templates.TemplateResponse(request, "docs.html", {"version": state.version})


@router.get("/favicon.ico")
def favicon() -> Response:
    return FileResponse(
        STATIC / "favicon.ico", media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"}
    )
