"""CalibCLIP explanations: dominant query words and per-image token heatmaps."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from calibclip.web import schema
from calibclip.web.deps import WebState, get_state, index_from_explain, index_from_query
from calibclip.web.service import ServedIndex

router = APIRouter(prefix="/api", tags=["api"])


@router.post("/explain", response_model=schema.ExplainResponse, responses=schema.ERRORS)
def explain(
    req: schema.ExplainRequest, ix: ServedIndex = Depends(index_from_explain), state: WebState = Depends(get_state)
) -> dict[str, Any]:
    """CalibCLIP explanation: the query's dominant words and, per image, the token heatmap."""
    text = (req.text or "").strip() or None
    if text is None and not req.ids:
        raise HTTPException(400, "give `text` and/or `ids` to explain")
    sources = [state.resolve_reference(ix, i) for i in req.ids]
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


@router.get(
    "/heatmap/{image_id}", responses={200: {"content": {"image/png": {}}}, **schema.ERRORS}, response_class=Response
)
def heatmap(
    image_id: str, ix: ServedIndex = Depends(index_from_query), state: WebState = Depends(get_state)
) -> Response:
    """PNG of an image with its CalibCLIP token treatment (suppress/decay/retain) overlaid."""
    source = state.resolve_reference(ix, image_id)
    return Response(ix.heatmap_png(source), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
