"""Gallery indexing and search: `Index.build` / `Index.open` / `index.search` (see README "Indexing a folder and searching it")."""

from calibclip.index.ann import AUTO_THRESHOLD, AnnIndex
from calibclip.index.build import BuildReport, build_index
from calibclip.index.core import Index, Query, SearchResult
from calibclip.index.search import ExactSearcher
from calibclip.index.storage import ImageRecord, IndexStateError, SkippedFile, Storage, is_index_dir

__all__ = [
    "AUTO_THRESHOLD", "AnnIndex", "BuildReport", "ExactSearcher", "ImageRecord", "Index", "IndexStateError", "Query",
    "SearchResult", "SkippedFile", "Storage", "build_index", "is_index_dir",
]
