"""Gallery indexing and search: `Index.build` / `Index.open` / `index.search` over a `VectorStore`
(a local folder, Milvus, or any backend registered in `calibclip.index.stores`; see docs/indexing-stores.md)."""

from calibclip.index.ann import AnnIndex
from calibclip.index.build import BuildReport, build_index
from calibclip.index.core import Index, Query, SearchResult
from calibclip.index.search import ExactSearcher
from calibclip.index.storage import ImageRecord, IndexStateError, SkippedFile, Storage, is_index_dir
from calibclip.index.stores import (
    AUTO_THRESHOLD,
    VectorStore,
    backend_table,
    open_store,
    parse_spec,
    register_store,
    store_schemes,
)

__all__ = [
    "AUTO_THRESHOLD",
    "AnnIndex",
    "BuildReport",
    "ExactSearcher",
    "ImageRecord",
    "Index",
    "IndexStateError",
    "Query",
    "SearchResult",
    "SkippedFile",
    "Storage",
    "VectorStore",
    "backend_table",
    "build_index",
    "is_index_dir",
    "open_store",
    "parse_spec",
    "register_store",
    "store_schemes",
]
