"""Images by id (indexed images and uploads) and the upload of reference images."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, HTTPException, Query, UploadFile
from fastapi.responses import Response

from calibclip.web import schema
from calibclip.web.deps import WebState, get_state, index_from_query
from calibclip.web.service import ServedIndex
from calibclip.web.uploads import UploadError

router = APIRouter(prefix="/api", tags=["api"])


@router.post(
    "/upload",
    response_model=schema.UploadResponse,
    status_code=201,
    responses={
        400: {"model": schema.ErrorResponse},
        411: {"model": schema.ErrorResponse},
        413: {"model": schema.ErrorResponse},
        422: {"model": schema.ErrorResponse},
    },
)
def upload(
    file: UploadFile = File(..., description="an image file (JPEG, PNG, WebP, ...)"),
    state: WebState = Depends(get_state),
) -> dict[str, Any]:
    """Upload a reference image; returns an id usable as `reference` (expires after a while)."""
    uploads = state.uploads
    data = file.file.read(uploads.max_bytes + 1)
    try:
        upload_id = uploads.add(data)
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    width, height = uploads.size(upload_id)
    return {
        "id": upload_id,
        "url": f"/api/images/{upload_id}?size=full",
        "thumb_url": f"/api/images/{upload_id}?size=thumb",
        "width": width,
        "height": height,
    }


@router.get(
    "/images/{image_id}", responses={200: {"content": {"image/jpeg": {}}}, **schema.ERRORS}, response_class=Response
)
def get_image(
    image_id: str,
    ix: ServedIndex = Depends(index_from_query),
    size: str = Query("full", pattern="^(thumb|full)$"),
    state: WebState = Depends(get_state),
) -> Response:
    """An indexed image (by id) or an upload (by upload id), as JPEG: thumbnail or full size."""
    source = state.resolve_reference(ix, image_id)
    data = ix.image_bytes(source, thumb=size == "thumb")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
