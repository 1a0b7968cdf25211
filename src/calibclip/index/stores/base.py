"""The `VectorStore` protocol: what `Index` and `build_index` need from a place that holds image
records, their vectors, the skipped-file list and the index metadata.

A backend implements this class and registers itself in `calibclip.index.stores` under a scheme
(``local``, ``milvus``, ...); `Index`, `build_index`, the CLI and the web app only ever talk to
this interface, so a new backend plugs in without touching them (see docs/indexing-stores.md).

Conventions every backend follows:

- Ids are positive integers assigned by the store in commit order and never reused; a changed
  file gets a new id. `ids` lists live ids in *storage order* (the order they were committed).
- Vectors are stored rounded to float16 (the local format); `vectors` returns those values as
  float32, un-normalised. Search is cosine similarity of the stored values.
- `commit_batch` is all-or-nothing as far as readers and a resumed build can tell: a build
  killed at any point resumes by re-encoding only what is not stored (same path, size, mtime).
- `search` takes normalised float32 queries and per-call parameters validated by
  `check_params` against `ann_kinds` (kind -> accepted parameter names).
- Token sets (optional, ``supports_tokens``): per-image float16 arrays of a fixed shape (the trained
  re-ranker's projected image tokens), metadata ``token_sets`` (name -> shape), committed with the
  vectors of the same batch (`commit_batch` ``tokens=``) and read with `tokens`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

#: One image row as stores return it: (id, relpath, size, mtime_ns, sha256, width, height).
RecordRow = tuple[int, str, int, int, str, "int | None", "int | None"]
#: A skipped file as `commit_batch` receives it: (relpath, size, mtime_ns, reason, message).
SkippedRow = tuple[str, "int | None", "int | None", str, str]


def no_tokens_message(scheme: str) -> str:
    """The one-line error of a backend that does not store the re-ranker's image tokens."""
    return (
        f"a {scheme} store does not hold the re-ranker's image tokens yet: build the index in a folder "
        "(calibclip index IMAGES_DIR --out DIR --rerank [PATH]) to re-rank"
    )


#: Above this many vectors ``auto`` picks the backend's default approximate kind.
AUTO_THRESHOLD = 200_000


class VectorStore(ABC):
    """Records, vectors, skipped files and metadata of one index, behind one interface.

    Class attributes a backend sets: ``scheme`` (the spec prefix), ``description`` (one line),
    ``ann_kinds`` (search kind -> accepted per-call parameter names; always includes ``exact``),
    ``default_ann`` (the kind ``auto`` uses above `AUTO_THRESHOLD` vectors).
    """

    scheme: ClassVar[str]
    description: ClassVar[str] = ""
    ann_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"exact": ()}
    default_ann: ClassVar[str] = "exact"
    #: Whether the backend stores token sets (the re-ranker's image tokens, `tokens`).
    supports_tokens: ClassVar[bool] = False

    spec: str  #: a spec `open_store` accepts for this store (a local store's is its folder)
    writable: bool

    # --- opening -----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def open(cls, location: str, writable: bool = False, options: Mapping[str, Any] | None = None) -> VectorStore:
        """Open the store at ``location`` (the spec without its scheme).

        Args:
            location: backend-specific location (a folder, a file, a URI).
            writable: take the single-writer role and create the store when it does not exist.
            options: backend options (e.g. ``token`` for a Milvus server).

        Raises:
            FileNotFoundError: read-only open of a store that does not exist.
            IndexStateError: the store exists but cannot be used (locked, damaged, other format).
        """

    @classmethod
    def check_new(cls, location: str, options: Mapping[str, Any] | None = None) -> None:
        """Raise ValueError when ``location`` holds something that is not a store of this kind
        (so that creating one there would clobber it). Default: accept."""
        return None

    @classmethod
    def read_meta(cls, location: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The metadata of the store at ``location``, ``{}`` when there is none yet."""
        try:
            store = cls.open(location, writable=False, options=options)
        except FileNotFoundError:
            return {}
        try:
            return store.meta()
        finally:
            store.close()

    # --- metadata ----------------------------------------------------------------------------
    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """All metadata: ``dim``, ``vector_sets``, ``version``, model identity (``model``,
        ``model_spec``, ``fingerprint``, ``model_config`` incl. preprocessing, ``precision``),
        ``root``, ``calibration``, ``combiner``, timestamps."""

    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value."""
        return self.meta().get(key, default)

    @abstractmethod
    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Update metadata keys (atomically where the backend can)."""

    @abstractmethod
    def initialise(self, dim: int, vector_sets: Sequence[str], meta: Mapping[str, Any]) -> None:
        """Set up an empty store (or reset one whose vector sets or model changed): no images."""

    def fresh(self, key: str, default: Any = None) -> Any:
        """The committed value of ``key`` now (a reader's `get` answers from its snapshot)."""
        return self.get(key, default)

    @property
    def dim(self) -> int:
        return int(self.get("dim"))

    @property
    def vector_sets(self) -> list[str]:
        return list(self.get("vector_sets", []))

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one consistent state where the backend can guarantee it."""
        yield

    # --- writing -----------------------------------------------------------------------------
    @abstractmethod
    def commit_batch(
        self,
        vectors: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, Any]],
        skipped: Sequence[SkippedRow] = (),
        removed: Sequence[str] = (),
        tokens: Mapping[str, np.ndarray] | None = None,
    ) -> list[int]:
        """Add ``records`` (dicts: path, size, mtime_ns, sha256, width, height) with vectors
        ``vectors[name][i]`` (float32 ``[n, dim]`` for every vector set) and, for every token set,
        ``tokens[name][i]`` (``[n, *shape]``), record ``skipped`` files and remove the images/skipped
        entries at ``removed`` paths. A record or skipped file replaces what the store had at its path.

        Returns:
            The ids given to ``records``, in order.

        Raises:
            ValueError: wrong vector sets, shapes or non-finite values (nothing is stored).
        """

    @abstractmethod
    def touch_images(self, updates: Sequence[tuple[str, int, int]]) -> None:
        """Record a new (size, mtime_ns) for ``(relpath, size, mtime_ns)`` whose content is unchanged."""

    def maintain(self) -> None:
        """Housekeeping after a build (the local store compacts dead rows). Default: nothing."""
        return None

    # --- reading -----------------------------------------------------------------------------
    @abstractmethod
    def ids(self) -> np.ndarray:
        """Live image ids (int64) in storage order."""

    @abstractmethod
    def count(self) -> int:
        """Number of live images."""

    @abstractmethod
    def skipped(self) -> list[Any]:
        """`SkippedFile` entries sorted by path."""

    def skipped_count(self) -> int:
        return len(self.skipped_state())

    @abstractmethod
    def images_state(self) -> dict[str, tuple[int, int, str, int]]:
        """relpath -> (size, mtime_ns, sha256, id) of every live image (the resume rule's input)."""

    @abstractmethod
    def skipped_state(self) -> dict[str, tuple[int | None, int | None]]:
        """relpath -> (size, mtime_ns) of every skipped file."""

    @abstractmethod
    def records(self, ids: Sequence[int]) -> dict[int, RecordRow]:
        """id -> `RecordRow` for the given ids (unknown ids are left out)."""

    @abstractmethod
    def lookup_path(self, relpath: str) -> int | None:
        """Id of the live image at ``relpath``."""

    @abstractmethod
    def vectors(self, name: str, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Stored float32 vectors ``[n, dim]`` of ``ids`` (default: all live, storage order).

        Raises:
            KeyError: an id that is not in the store.
        """

    def token_sets(self) -> dict[str, tuple[int, ...]]:
        """Token set name -> per-image shape (``{}`` when the index stores none)."""
        return {k: tuple(int(x) for x in v) for k, v in (self.get("token_sets") or {}).items()}

    def tokens(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored float16 token rows ``[n, *shape]`` of ``ids`` in token set ``name``.

        Raises:
            KeyError: an id that is not in the store, or no token set ``name``.
            ValueError: the backend stores no token sets.
        """
        raise ValueError(no_tokens_message(self.scheme))

    # --- search ------------------------------------------------------------------------------
    def resolve_kind(self, kind: str, n: int) -> str:
        """``auto`` -> ``exact`` up to `AUTO_THRESHOLD` vectors, else `default_ann`; other kinds checked."""
        if kind == "auto":
            return "exact" if n <= AUTO_THRESHOLD else self.default_ann
        if kind not in self.ann_kinds:
            raise ValueError(
                f"unknown ANN kind {kind!r} for a {self.scheme} store: use auto, " + ", ".join(self.ann_kinds)
            )
        return kind

    def check_params(self, kind: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Drop ``None`` values; refuse parameters that ``kind`` does not take (ValueError)."""
        given = {k: v for k, v in (params or {}).items() if v is not None}
        accepted = self.ann_kinds.get(kind, ())
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ValueError(
                f"search parameter(s) {unknown} do not apply to {kind!r} search on a {self.scheme} store "
                f"(it takes {list(accepted) or 'none'})"
            )
        for key, value in given.items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or int(value) < 1:
                raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
        return {k: int(v) for k, v in given.items()}

    @abstractmethod
    def search(
        self,
        name: str,
        queries: np.ndarray,
        k: int,
        kind: str,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine search of normalised float32 ``queries`` ``[Q, D]`` over vector set ``name``.

        ``kind`` is already resolved (a key of `ann_kinds`), ``params`` checked by `check_params`.

        Returns:
            ``(scores, ids)`` ``[Q, min(k, count)]``, best first; approximate kinds may pad with
            id -1 / score -inf.
        """

    def prepare_ann(self, kind: str, name: str = "raw") -> None:
        """Build (or load a saved) ANN structure ``kind`` over ``name`` now instead of on first search."""
        return None

    # --- files and housekeeping ------------------------------------------------------------------
    def file_path(self, name: str) -> Path | None:
        """A local path to the stored file ``name`` (e.g. the Combiner checkpoint), if it exists."""
        return None

    def put_file(self, name: str, src: str | Path) -> None:
        """Store a copy of ``src`` as file ``name`` (replacing one of that name)."""
        raise ValueError(f"a {self.scheme} store cannot hold files such as {name!r}")

    def delete_file(self, name: str) -> None:
        """Remove the stored file ``name`` if present."""
        return None

    def disk_bytes(self) -> int | None:
        """Bytes the store occupies (None when the backend cannot tell)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release connections, files and locks."""

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"
