"""What the routes share, handed to them through FastAPI dependencies (`Depends`): the app's
`WebState` (served indexes, upload store, templates), the index a request names, and the
resolution of image references (indexed ids or upload ids) to sources."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Query, Request
from fastapi.templating import Jinja2Templates

from calibclip.web import schema
from calibclip.web.service import ServedIndex
from calibclip.web.uploads import UPLOAD_ID_RE, UploadStore

_ID_RE = re.compile(r"^[0-9]{1,12}$")


@dataclass
class WebState:
    """Everything the routes read, built once by `create_app` and kept as ``app.state.web``."""

    indexes: dict[str, ServedIndex]
    default: str
    uploads: UploadStore
    templates: Jinja2Templates
    version: str

    def index(self, name: str | None) -> ServedIndex:
        """The served index called ``name`` (default: the first), up to date with the disk.

        Raises:
            HTTPException: 404 for an unknown name.
        """
        key = name or self.default
        ix = self.indexes.get(key)
        if ix is None:
            raise HTTPException(404, f"unknown index {key[:100]!r}; served indexes: {', '.join(self.indexes)}")
        ix.refresh()
        return ix

    def resolve_reference(self, ix: ServedIndex, ref: str) -> int | Path:
        """An indexed id (int) or the stored file of an upload; anything else is a 404."""
        if UPLOAD_ID_RE.match(ref):
            path = self.uploads.path(ref)
            if path is None:
                raise HTTPException(
                    404, f"upload {ref!r} not found (uploads expire after {self.uploads.ttl_s:.0f} s); upload it again"
                )
            return path
        if not _ID_RE.match(ref):
            raise HTTPException(404, f"no such image {ref[:100]!r}: ids are integers from the index or upload ids")
        image_id = int(ref)
        if not ix.has(image_id):
            raise HTTPException(404, f"image {ref!r} is not in index {ix.name!r}")
        return image_id


def image_url(ix: ServedIndex, image_id: str, size: str = "full") -> str:
    return f"/api/images/{image_id}?index={quote(ix.name)}&size={size}"


def item(ix: ServedIndex, image_id: int) -> dict[str, Any]:
    """The API's description of an indexed image (id, relative path, URLs)."""
    sid = str(image_id)
    return {
        "id": sid,
        "path": ix.rel_path(image_id),
        "url": image_url(ix, sid),
        "thumb_url": image_url(ix, sid, "thumb"),
    }


def get_state(request: Request) -> WebState:
    return request.app.state.web


def index_from_query(
    index: str | None = Query(None, max_length=100, description="index name; default: the first"),
    state: WebState = Depends(get_state),
) -> ServedIndex:
    """The index named by the ``index`` query parameter."""
    return state.index(index)


def index_from_search(req: schema.SearchRequest, state: WebState = Depends(get_state)) -> ServedIndex:
    """The index named in a search request body."""
    return state.index(req.index)


def index_from_explain(req: schema.ExplainRequest, state: WebState = Depends(get_state)) -> ServedIndex:
    """The index named in an explain request body."""
    return state.index(req.index)


def index_from_match(req: schema.MatchRequest, state: WebState = Depends(get_state)) -> ServedIndex:
    """The index named in a re-ranker explanation request body."""
    return state.index(req.index)


def match_url(ix: ServedIndex, image_id: str, text: str) -> str:
    """URL of the re-ranker's word -> region heatmap PNG of (``text``, ``image_id``)."""
    return f"/api/match-heatmap/{image_id}?index={quote(ix.name)}&text={quote(text)}"
