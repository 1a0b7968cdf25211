"""Search (text, image, composed; calibrated or not), gallery samples and suggested modifications."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from calibclip.web import schema
from calibclip.web.deps import WebState, get_state, index_from_query, index_from_search, item, match_url
from calibclip.web.service import ServedIndex

router = APIRouter(prefix="/api", tags=["api"])


@router.post("/search", response_model=schema.SearchResponse, responses=schema.ERRORS_503)
def search(
    req: schema.SearchRequest, ix: ServedIndex = Depends(index_from_search), state: WebState = Depends(get_state)
) -> dict[str, Any]:
    """Text search (``text``), image search (``reference``) or composed search (both)."""
    text = (req.text or "").strip() or None
    if text is None and req.reference is None:
        raise HTTPException(400, "give a query: `text`, `reference` (image id or upload id), or both")
    image = state.resolve_reference(ix, req.reference) if req.reference is not None else None
    if req.calibrate and not ix.can_calibrate:
        raise HTTPException(400, f"index {ix.name!r} has no calibrated features; rebuild it with calibration")
    depth = 0
    if req.rerank:
        if image is not None or text is None:
            raise HTTPException(
                400, "re-ranking applies to text queries (text->image), not to image or composed queries"
            )
        try:
            depth = ix.rerank_depth(req.rerank_top_k)  # the index's re-ranker, or why there is none
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
    hits = ix.search(
        text=text, image=image, k=req.k, calibrate=req.calibrate, rerank=req.rerank, rerank_top_k=req.rerank_top_k
    )
    target = ix.annotated_target(image, text) if isinstance(image, int) and text else None
    results = []
    for hit in hits:
        entry = item(ix, hit.id)
        reranked = bool(req.rerank) and hit.rank <= depth
        entry.update(
            score=float(hit.score),
            rank=int(hit.rank),
            is_target=hit.id == target,
            reranked=reranked,
            match_url=match_url(ix, str(hit.id), text) if reranked and text else None,
        )
        results.append(entry)
    return {
        "index": ix.name,
        "query": {
            "text": text,
            "reference": req.reference,
            "k": req.k,
            "calibrate": req.calibrate,
            "rerank": req.rerank,
            "rerank_top_k": depth if req.rerank else None,
        },
        "target": None if target is None else str(target),
        "results": results,
    }


@router.get("/sample", response_model=schema.SampleResponse, responses=schema.ERRORS)
def sample(
    ix: ServedIndex = Depends(index_from_query),
    n: int = Query(12, ge=1, le=100),
    seed: int | None = Query(None, ge=0, le=2**31 - 1),
    annotated: bool = Query(False, description="only images with suggested modifications"),
) -> dict[str, Any]:
    """A random sample of the gallery (candidate references)."""
    ids = ix.sample(n, seed, annotated=annotated)
    return {"index": ix.name, "items": [item(ix, i) for i in ids]}


@router.get("/suggestions", response_model=schema.SuggestionResponse, responses=schema.ERRORS)
def suggestions(
    reference: str = Query(..., max_length=100),
    ix: ServedIndex = Depends(index_from_query),
    state: WebState = Depends(get_state),
) -> dict[str, Any]:
    """Annotated modification texts for a reference image (empty when the index has none)."""
    image = state.resolve_reference(ix, reference)
    pairs = ix.suggestions_for(image) if isinstance(image, int) else []
    return {
        "index": ix.name,
        "reference": reference,
        "suggestions": [{"text": t, "target": None if g is None else str(g)} for t, g in pairs],
    }
