"""Server and index metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from calibclip.web import schema
from calibclip.web.deps import WebState, get_state

router = APIRouter(prefix="/api", tags=["api"])


@router.get("/health", response_model=schema.Health)
def health(state: WebState = Depends(get_state)) -> dict[str, Any]:
    """Liveness: the server is up and its indexes are loaded."""
    return {"status": "ok", "indexes": len(state.indexes), "version": state.version}


@router.get("/indexes", response_model=schema.IndexList)
def list_indexes(state: WebState = Depends(get_state)) -> dict[str, Any]:
    """The served indexes (the first is the default)."""
    return {"indexes": [state.index(name).info() for name in state.indexes]}
