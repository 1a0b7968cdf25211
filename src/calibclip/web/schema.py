"""Request and response models of the JSON API (they make up the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    status: Literal["ok"]
    indexes: int
    version: str


class IndexInfo(BaseModel):
    name: str
    count: int = Field(description="number of indexed images")
    model: str = Field(description="model the index was built with")
    combining: str = Field(description="how image + text queries are combined: 'combiner' or 'sum'")
    calibration: bool = Field(description="whether calibrated search is available")
    suggestions: bool = Field(description="whether suggested modifications (annotated captions) are available")
    rerank: bool = Field(False, description="whether re-ranking with the trained cross-modal re-ranker is available")


class IndexList(BaseModel):
    indexes: list[IndexInfo]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(None, max_length=100, description="index name; default: the first")
    text: str | None = Field(None, max_length=500, description="query text or modification text")
    reference: str | None = Field(
        None,
        max_length=100,
        description="reference image: an indexed image id (e.g. '12') or an upload id ('u-' + 32 hex digits)",
    )
    k: int = Field(20, ge=1, le=200, description="number of results")
    calibrate: bool = Field(False, description="CalibCLIP-calibrated search")
    rerank: bool = Field(
        False,
        description="re-score the top-K of a text query with the trained cross-modal re-ranker (the index's; "
        "needs an index built with `calibclip index ... --rerank`); combines with `calibrate`",
    )
    rerank_top_k: int | None = Field(
        None, ge=1, le=200, description="with `rerank`: candidates re-scored (default: the re-ranker's top_k)"
    )


class ImageItem(BaseModel):
    id: str = Field(description="image id; can be sent back as `reference`")
    path: str = Field(description="path of the image relative to the indexed folder")
    url: str = Field(description="URL of the image (append size=thumb for a thumbnail)")
    thumb_url: str


class SearchResult(ImageItem):
    score: float
    rank: int
    is_target: bool = Field(False, description="the annotated ground-truth target of this query")
    reranked: bool = Field(False, description="re-scored by the trained re-ranker (one of the top-K)")
    match_url: str | None = Field(
        None, description="for a re-ranked hit: PNG of the query words' cross-attention over the image"
    )


class SearchResponse(BaseModel):
    index: str
    query: dict
    target: str | None = Field(None, description="annotated target id when (reference, text) is an annotated pair")
    results: list[SearchResult]


class UploadResponse(BaseModel):
    id: str
    url: str
    thumb_url: str
    width: int
    height: int


class SampleResponse(BaseModel):
    index: str
    items: list[ImageItem]


class Suggestion(BaseModel):
    text: str
    target: str | None = Field(None, description="id of the annotated target image, when in the index")


class SuggestionResponse(BaseModel):
    index: str
    reference: str
    suggestions: list[Suggestion]


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(None, max_length=100)
    text: str | None = Field(None, max_length=500)
    ids: list[str] = Field(default_factory=list, max_length=50, description="image ids (indexed or upload) to explain")


class WordWeight(BaseModel):
    token: str
    weight: float = Field(description="attention of the pooling token to this word")
    dominant: bool = Field(description="CalibCLIP found this word dominant (generic)")
    masked: bool = Field(description="the word was masked in the calibrated query")


class ImageExplanation(BaseModel):
    id: str
    grid: list[int] = Field(description="[rows, cols] of the token grid")
    attention: list[float] = Field(description="row-major weight of each cell in the pooled embedding")
    treatment: list[str] = Field(
        description="row-major CalibCLIP treatment per cell: context, target, retain, decay or suppress"
    )
    heatmap_url: str = Field(description="PNG of the heatmap over the image")


class ExplainResponse(BaseModel):
    index: str
    dominant_words: list[str]
    tokens: list[WordWeight]
    images: list[ImageExplanation]


class MatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(None, max_length=100)
    text: str = Field(..., min_length=1, max_length=500, description="the query text")
    id: str = Field(..., max_length=100, description="an indexed image id (a re-ranked hit)")


class MatchResponse(BaseModel):
    index: str
    id: str
    text: str
    tokens: list[str] = Field(description="the query's words (special tokens left out)")
    grid: list[int] = Field(description="[rows, cols] of the image token grid")
    attention: list[list[float]] = Field(
        description="per word, its row-major cross-attention over the grid (last re-ranker block, mean over heads)"
    )
    similarity: float = Field(description="cosine similarity of the query and the image (dual encoder)")
    match: float = Field(description="the re-ranker's match score")
    fused: float = Field(description="similarity + fusion_weight * match (the plain re-ranked score)")
    heatmap_url: str = Field(description="PNG: the image under each word's attention")


class ErrorResponse(BaseModel):
    detail: str


#: Error responses shared by the API routes (documented in the OpenAPI document).
ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}

#: `ERRORS` plus the 503 of an overloaded server (answered with ``Retry-After``).
ERRORS_503: dict[int | str, dict] = {
    **ERRORS,
    503: {"model": ErrorResponse, "description": "server busy; retry after the Retry-After header's seconds"},
}
