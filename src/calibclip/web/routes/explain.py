"""Explanations: CalibCLIP's dominant query words and per-image token heatmaps, and the trained
re-ranker's word -> image region cross-attention for a re-ranked hit."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response

from calibclip.web import schema
from calibclip.web.deps import WebState, get_state, index_from_explain, index_from_match, index_from_query, match_url
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


def _indexed(ix: ServedIndex, state: WebState, image_id: str) -> int:
    """An indexed image id (the re-ranker's tokens are stored for indexed images only)."""
    source = state.resolve_reference(ix, image_id)
    if not isinstance(source, int):
        raise HTTPException(400, "re-ranker explanations are for indexed images (re-ranked hits), not uploads")
    return source


def _need_rerank(ix: ServedIndex) -> None:
    if not ix.can_rerank:
        try:
            ix.index.reranking()
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None


@router.post("/explain-match", response_model=schema.MatchResponse, responses=schema.ERRORS)
def explain_match(
    req: schema.MatchRequest, ix: ServedIndex = Depends(index_from_match), state: WebState = Depends(get_state)
) -> dict[str, Any]:
    """The trained re-ranker's view of (text, indexed image): which query words attended to which image
    regions (from the index's stored tokens), and its cosine, match and fused scores."""
    text = req.text.strip()
    if not text:
        raise HTTPException(400, "give the query `text`")
    _need_rerank(ix)
    image_id = _indexed(ix, state, req.id)
    exp = ix.explain_match(text, image_id).to_dict()
    return {"index": ix.name, "id": req.id, **exp, "heatmap_url": match_url(ix, req.id, text)}


@router.get(
    "/match-heatmap/{image_id}",
    responses={200: {"content": {"image/png": {}}}, **schema.ERRORS},
    response_class=Response,
)
def match_heatmap(
    image_id: str,
    text: str = Query(..., min_length=1, max_length=500, description="the query text"),
    ix: ServedIndex = Depends(index_from_query),
    state: WebState = Depends(get_state),
) -> Response:
    """PNG of an indexed image under each query word's re-ranker cross-attention (one panel per word)."""
    if not text.strip():
        raise HTTPException(400, "give the query `text`")
    _need_rerank(ix)
    png = ix.match_png(text.strip(), _indexed(ix, state, image_id))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
