"""The ``milvus`` store: an index in Milvus collections through `pymilvus.MilvusClient`.

Specs: ``milvus:PATH.db`` is Milvus Lite (embedded: a file, no server; one process at a time may
open a given file); ``milvus:http(s)://HOST:PORT`` is a Milvus server or cluster (token from
``options["token"]`` or ``$CALIBCLIP_MILVUS_TOKEN``). A ``#NAME`` suffix picks the collection
prefix (default ``calibclip``), so one server holds many indexes.

Three collections per index, prefix P:

- ``P_images``: id (INT64 primary key, assigned in commit order, never reused), path, size,
  mtime_ns, sha256, width, height (-1 = unknown), ``raw`` and optionally ``calibrated``
  FLOAT_VECTOR fields holding the float16-rounded vectors (the same values the local store keeps);
- ``P_skipped``: path (primary key), size, mtime_ns, reason, message;
- ``P_meta``: key -> JSON value: model identity + preprocessing (``model_config``), calibration
  config, combiner, version, next id; stored files (the Combiner checkpoint) as base64 chunks.

Crash safety: a batch deletes the rows it replaces, inserts its rows, then advances ``next_id``
and ``version`` in ``P_meta``. Milvus applies each request atomically; a build killed between the
requests leaves images that are either stored (with their final record) or absent (re-encoded on
resume), never half-written; the next writer recovers ``next_id`` as ``max(id) + 1``.

Search: ``exact`` reads the vectors once into memory and runs calibclip's exact searcher (results
identical to the local store); ``ivf`` (Milvus IVF_FLAT, per-call ``nprobe``) and ``hnsw`` (Milvus
HNSW, per-call ``ef_search``) run inside Milvus with COSINE metric. A vector field carries one
Milvus index at a time: asking for the other kind rebuilds it (FLAT until an ANN kind is asked for).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibclip.index.search import ExactSearcher
from calibclip.index.storage import IndexStateError, SkippedFile
from calibclip.index.stores.base import RecordRow, SkippedRow, VectorStore, no_tokens_message

FORMAT_VERSION = 1
DEFAULT_PREFIX = "calibclip"
PATH_MAX = 4096
MESSAGE_MAX = 4096
VALUE_MAX = 65535
FILE_CHUNK = 48_000  # base64 characters per meta row
#: Milvus ANN build parameters (HNSW as the local FAISS one; IVF nlist by the same rule).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_NPROBE = 64
DEFAULT_EF_SEARCH = 128
QUERY_BATCH = 4096
QUERY_WINDOW = 16384  # Milvus's largest query limit
GET_BATCH = 1024
ANN_INDEX = {"ivf": "IVF_FLAT", "hnsw": "HNSW"}


def dependency_error() -> str | None:
    """None when pymilvus (+ milvus-lite) import, else the one-line fix."""
    try:
        import pymilvus  # noqa: F401
    except ImportError:
        return "the milvus store needs pymilvus and milvus-lite: pip install 'calibclip[milvus]'"
    return None


def _client_class() -> Any:
    error = dependency_error()
    if error:
        raise RuntimeError(error)
    from pymilvus import MilvusClient

    return MilvusClient


def split_location(location: str) -> tuple[str, str]:
    """``(uri, collection prefix)`` of ``PATH.db[#NAME]`` or ``http(s)://HOST:PORT[#NAME]``."""
    uri, _, prefix = location.partition("#")
    prefix = prefix or DEFAULT_PREFIX
    if not prefix.replace("_", "a").isalnum() or not prefix[0].isalpha():
        raise ValueError(f"milvus collection name {prefix!r}: use letters, digits and _ (starting with a letter)")
    if not (uri.startswith(("http://", "https://", "tcp://", "unix:")) or uri.endswith(".db")):
        raise ValueError(
            f"milvus:{location}: expected milvus:PATH.db (Milvus Lite) or milvus:http(s)://HOST:PORT (a server)"
        )
    return uri, prefix


def _nlist(n: int) -> int:
    return int(min(65536, max(16, round(4 * math.sqrt(max(n, 1))))))


class MilvusStore(VectorStore):
    """An index in Milvus (Lite file or server)."""

    scheme = "milvus"
    description = "Milvus: milvus:PATH.db (Milvus Lite, embedded) or milvus:http(s)://HOST:PORT (server + token)"
    ann_kinds = {"exact": (), "ivf": ("nprobe",), "hnsw": ("ef_search",)}
    default_ann = "hnsw"
    dependency_error = staticmethod(dependency_error)

    def __init__(
        self, client: Any, location: str, uri: str, prefix: str, writable: bool, options: Mapping[str, Any] | None
    ):
        self.client = client
        self.spec = f"milvus:{location}"
        self.uri, self.prefix = uri, prefix
        self.writable = writable
        self.options = dict(options or {})
        self.c_images, self.c_skipped, self.c_meta = f"{prefix}_images", f"{prefix}_skipped", f"{prefix}_meta"
        self._lock = threading.RLock()
        self._meta: dict[str, Any] | None = None
        self._ids: np.ndarray | None = None
        self._paths: dict[str, int] | None = None
        self._searchers: dict[str, ExactSearcher] = {}
        self._files: dict[str, Path] = {}

    # --- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str, writable: bool = False, options: Mapping[str, Any] | None = None) -> MilvusStore:
        uri, prefix = split_location(location)
        lite = uri.endswith(".db")
        if lite:
            path = Path(uri).expanduser()
            if not path.exists() and not writable:
                raise FileNotFoundError(f"milvus:{location}: no such Milvus Lite file; build an index there first")
            if not path.parent.is_dir():
                raise FileNotFoundError(f"milvus:{location}: folder {path.parent} does not exist")
            uri = str(path.resolve())
        token = (options or {}).get("token") or os.environ.get("CALIBCLIP_MILVUS_TOKEN", "")
        client_cls = _client_class()
        try:
            client = client_cls(uri=uri, token=token, timeout=float((options or {}).get("timeout", 10)))
            names = set(client.list_collections())
        except Exception as exc:
            raise RuntimeError(_connect_message(location, lite, exc)) from exc
        store = cls(client, location, uri, prefix, writable, options)
        try:
            if store.c_meta not in names:
                if store.c_images in names or store.c_skipped in names:
                    raise IndexStateError(
                        f"milvus:{location}: collection {store.c_images} exists but {store.c_meta} does not: it is not "
                        "a calibclip index (use another #NAME)"
                    )
                if not writable:
                    raise FileNotFoundError(
                        f"milvus:{location}: no calibclip index (collection {store.c_meta}); build one there first"
                    )
                store._create_meta()
            else:
                store._load(store.c_meta)
            fmt = store.get("format")
            if fmt is not None and fmt != FORMAT_VERSION:
                raise IndexStateError(
                    f"milvus:{location} has format {fmt!r}, this calibclip reads {FORMAT_VERSION}; rebuild it"
                )
            if fmt is not None:
                for c in (store.c_images, store.c_skipped):
                    if c not in names:
                        raise IndexStateError(
                            f"milvus:{location}: collection {c} is missing; the index is damaged, "
                            "rebuild it at another #NAME"
                        )
                    store._load(c)
                store._check_schema()
            if writable and fmt is not None:
                store._recover()
            if not writable:
                store._snapshot()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def read_meta(cls, location: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        uri, _ = split_location(location)
        if uri.endswith(".db") and not Path(uri).expanduser().exists():
            return {}
        return super().read_meta(location, options)

    def _load(self, collection: str) -> None:
        self.client.load_collection(collection)

    def _schema(self, fields: list[tuple[str, Any, dict[str, Any]]]) -> Any:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        for name, dtype, kw in fields:
            schema.add_field(name, dtype, **kw)
        return schema

    def _create(self, name: str, fields: list[tuple[str, Any, dict[str, Any]]], vectors: Sequence[str]) -> None:
        index = self.client.prepare_index_params()
        for v in vectors:
            index.add_index(v, index_type="FLAT", metric_type="COSINE")
        self.client.create_collection(name, schema=self._schema(fields), index_params=index, consistency_level="Strong")
        self._load(name)

    def _create_meta(self) -> None:
        from pymilvus import DataType

        self._create(
            self.c_meta,
            [
                ("key", DataType.VARCHAR, {"is_primary": True, "max_length": 512}),
                ("value", DataType.VARCHAR, {"max_length": VALUE_MAX}),
                ("v", DataType.FLOAT_VECTOR, {"dim": 2}),  # Milvus collections need a vector field
            ],
            ["v"],
        )

    def _check_schema(self) -> None:
        fields = {f["name"]: f for f in self.client.describe_collection(self.c_images)["fields"]}
        for name in self.vector_sets:
            dim = (fields.get(name) or {}).get("params", {}).get("dim")
            if dim is None or int(dim) != self.dim:
                raise IndexStateError(
                    f"{self.spec}: collection {self.c_images} has vector field {name!r} of dim {dim}, the index "
                    f"records {self.dim}; it was not written by this index: rebuild at another #NAME"
                )

    # --- metadata ----------------------------------------------------------------------------
    def _query_all(self, collection: str, fields: list[str], filter: str = "") -> Iterator[dict[str, Any]]:
        """Every row matching ``filter``: images by id ranges (ids are dense, below ``next_id``),
        the small collections in one query (an iterator when they outgrow Milvus's query window)."""
        if collection == self.c_images:
            top = int(self.get("next_id", 1))
            for start in range(0, top, QUERY_BATCH):
                cond = f"id >= {start} and id < {start + QUERY_BATCH}"
                yield from self.client.query(
                    collection, filter=f"({filter}) and {cond}" if filter else cond, output_fields=fields
                )
            return
        rows = self.client.query(collection, filter=filter, output_fields=fields, limit=QUERY_WINDOW)
        if len(rows) < QUERY_WINDOW:
            yield from rows
            return
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
        it = self.client.query_iterator(collection, batch_size=QUERY_BATCH, filter=filter, output_fields=fields)
        try:
            while rows := it.next():
                yield from rows
        finally:
            it.close()

    def meta(self) -> dict[str, Any]:
        with self._lock:
            if self._meta is None or self.writable:
                meta = {}
                for row in self._query_all(self.c_meta, ["key", "value"], filter='key like "m:%"'):
                    meta[row["key"][2:]] = json.loads(row["value"])
                if self.writable:
                    return meta
                self._meta = meta
            return dict(self._meta)

    def get(self, key: str, default: Any = None) -> Any:
        if not self.writable:
            return self.meta().get(key, default)
        rows = self.client.query(self.c_meta, filter=f"key == {json.dumps('m:' + key)}", output_fields=["value"])
        return json.loads(rows[0]["value"]) if rows else default

    def fresh(self, key: str, default: Any = None) -> Any:
        rows = self.client.query(self.c_meta, filter=f"key == {json.dumps('m:' + key)}", output_fields=["value"])
        return json.loads(rows[0]["value"]) if rows else default

    def _rows(self, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for k, v in values.items():
            text = json.dumps(v, sort_keys=True)
            if len(text.encode()) > VALUE_MAX:
                raise ValueError(
                    f"metadata {k!r} is {len(text.encode())} bytes; a Milvus store keeps at most {VALUE_MAX}"
                )
            rows.append({"key": "m:" + k, "value": text, "v": [0.0, 0.0]})
        return rows

    def set_meta(self, values: Mapping[str, Any]) -> None:
        self._require_writable()
        if values:
            self.client.upsert(self.c_meta, self._rows(values))

    def initialise(self, dim: int, vector_sets: Sequence[str], meta: Mapping[str, Any]) -> None:
        from pymilvus import DataType

        self._require_writable()
        for c in (self.c_images, self.c_skipped):
            if self.client.has_collection(c):
                self.client.drop_collection(c)
        self._create(
            self.c_images,
            [
                ("id", DataType.INT64, {"is_primary": True}),
                ("path", DataType.VARCHAR, {"max_length": PATH_MAX}),
                ("size", DataType.INT64, {}),
                ("mtime_ns", DataType.INT64, {}),
                ("sha256", DataType.VARCHAR, {"max_length": 64}),
                ("width", DataType.INT64, {}),
                ("height", DataType.INT64, {}),
                *[(name, DataType.FLOAT_VECTOR, {"dim": int(dim)}) for name in vector_sets],
            ],
            list(vector_sets),
        )
        self._create(
            self.c_skipped,
            [
                ("path", DataType.VARCHAR, {"is_primary": True, "max_length": PATH_MAX}),
                ("size", DataType.INT64, {}),
                ("mtime_ns", DataType.INT64, {}),
                ("reason", DataType.VARCHAR, {"max_length": 64}),
                ("message", DataType.VARCHAR, {"max_length": MESSAGE_MAX}),
                ("v", DataType.FLOAT_VECTOR, {"dim": 2}),
            ],
            ["v"],
        )
        old = {k: self.get(k) for k in ("version", "created", "next_id")}
        self.set_meta(
            {
                "format": FORMAT_VERSION,
                "dim": int(dim),
                "vector_sets": list(vector_sets),
                "version": int(old["version"] or 0) + 1,
                "created": old["created"] or time.time(),
                "updated": time.time(),
                "next_id": int(old["next_id"] or 1),
                "ann": {},
                **meta,
            }
        )
        self._paths = {}

    def _require_writable(self) -> None:
        if not self.writable:
            raise IndexStateError(f"{self.spec} was opened read-only")

    def _recover(self) -> None:
        """``next_id`` = max(stored id) + 1 when a killed run inserted rows without advancing it."""
        next_id = int(self.get("next_id", 1))
        while rows := self.client.query(
            self.c_images, filter=f"id >= {next_id}", output_fields=["id"], limit=QUERY_WINDOW
        ):
            next_id = max(int(r["id"]) for r in rows) + 1
        if next_id != int(self.get("next_id", 1)):
            self.set_meta({"next_id": next_id})

    def _snapshot(self) -> None:
        """A reader's view: metadata and live ids read once at open (Milvus has no read transactions)."""
        self.meta()
        if self.get("format") is None:
            self._ids = np.zeros(0, dtype=np.int64)
            return
        ids = [int(r["id"]) for r in self._query_all(self.c_images, ["id"])]
        self._ids = np.asarray(sorted(ids), dtype=np.int64)

    # --- writing -----------------------------------------------------------------------------
    def _path_ids(self) -> dict[str, int]:
        if self._paths is None:
            self._paths = {r["path"]: int(r["id"]) for r in self._query_all(self.c_images, ["id", "path"])}
        return self._paths

    def commit_batch(
        self,
        vectors: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, Any]],
        skipped: Sequence[SkippedRow] = (),
        removed: Sequence[str] = (),
        tokens: Mapping[str, np.ndarray] | None = None,
    ) -> list[int]:
        self._require_writable()
        if tokens:
            raise ValueError(no_tokens_message(self.scheme))
        n = len(records)
        sets = self.vector_sets
        if n and set(vectors) != set(sets):
            raise ValueError(f"batch has vector sets {sorted(vectors)}, index stores {sets}")
        dim = self.dim
        half: dict[str, np.ndarray] = {}
        for name in sets if n else ():
            arr = np.asarray(vectors[name], dtype=np.float32)
            if arr.shape != (n, dim):
                raise ValueError(f"vector set {name!r}: expected shape {(n, dim)}, got {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"vector set {name!r}: the encoder produced non-finite values")
            half[name] = arr.astype(np.float16).astype(np.float32)  # the values the local store keeps
        for r in records:
            if len(r["path"].encode()) > PATH_MAX:
                raise ValueError(f"path {r['path'][:80]!r}... is longer than {PATH_MAX} bytes")
        with self._lock:
            paths = self._path_ids()
            replaced = [r["path"] for r in records] + [s[0] for s in skipped] + list(removed)
            gone = [paths[p] for p in replaced if p in paths]
            if gone:
                self.client.delete(self.c_images, ids=gone)
            if replaced:
                self.client.delete(self.c_skipped, ids=replaced)
            for p in replaced:
                paths.pop(p, None)
            start = int(self.get("next_id", 1))
            ids = list(range(start, start + n))
            if n:
                rows = [
                    {
                        "id": i,
                        "path": r["path"],
                        "size": int(r["size"]),
                        "mtime_ns": int(r["mtime_ns"]),
                        "sha256": r["sha256"],
                        "width": _int(r.get("width")),
                        "height": _int(r.get("height")),
                        **{name: half[name][j] for name in sets},
                    }
                    for j, (i, r) in enumerate(zip(ids, records, strict=True))
                ]
                self.client.insert(self.c_images, rows)
                paths.update({r["path"]: i for i, r in zip(ids, records, strict=True)})
            if skipped:
                self.client.upsert(
                    self.c_skipped,
                    [
                        {
                            "path": p,
                            "size": _int(size),
                            "mtime_ns": _int(mtime),
                            "reason": reason,
                            "message": message[:MESSAGE_MAX],
                            "v": [0.0, 0.0],
                        }
                        for p, size, mtime, reason, message in skipped
                    ],
                )
            changes: dict[str, Any] = {"next_id": start + n, "updated": time.time()}
            if n or replaced:
                changes["version"] = int(self.get("version", 0)) + 1
            self.set_meta(changes)
        return ids

    def touch_images(self, updates: Sequence[tuple[str, int, int]]) -> None:
        self._require_writable()
        paths = self._path_ids()
        by_id = {paths[p]: (s, m) for p, s, m in updates if p in paths}
        sets = self.vector_sets
        fields = ["id", "path", "size", "mtime_ns", "sha256", "width", "height", *sets]
        ids = list(by_id)
        for s in range(0, len(ids), GET_BATCH):
            rows = self.client.get(self.c_images, ids=ids[s : s + GET_BATCH], output_fields=fields)
            for row in rows:
                row["size"], row["mtime_ns"] = by_id[int(row["id"])]
                for name in sets:
                    row[name] = np.asarray(row[name], dtype=np.float32)
            if rows:
                self.client.upsert(self.c_images, [{k: row[k] for k in fields} for row in rows])

    # --- reading -----------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        if self._ids is not None:
            return self._ids.copy()
        return np.asarray(sorted(self._path_ids().values()), dtype=np.int64)

    def count(self) -> int:
        if self._ids is not None:
            return len(self._ids)
        if self.get("format") is None:
            return 0
        rows = self.client.query(self.c_images, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def skipped(self) -> list[SkippedFile]:
        if self.get("format") is None:
            return []
        rows = self._query_all(self.c_skipped, ["path", "reason", "message"])
        return sorted((SkippedFile(r["path"], r["reason"], r["message"]) for r in rows), key=lambda s: s.relpath)

    def skipped_count(self) -> int:
        if self.get("format") is None:
            return 0
        return int(self.client.query(self.c_skipped, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def images_state(self) -> dict[str, tuple[int, int, str, int]]:
        if self.get("format") is None:
            return {}
        rows = self._query_all(self.c_images, ["id", "path", "size", "mtime_ns", "sha256"])
        return {r["path"]: (int(r["size"]), int(r["mtime_ns"]), r["sha256"], int(r["id"])) for r in rows}

    def skipped_state(self) -> dict[str, tuple[int | None, int | None]]:
        if self.get("format") is None:
            return {}
        rows = self._query_all(self.c_skipped, ["path", "size", "mtime_ns"])
        return {r["path"]: (_none(r["size"]), _none(r["mtime_ns"])) for r in rows}

    def _get(self, ids: Sequence[int], fields: list[str]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), GET_BATCH):
            for row in self.client.get(self.c_images, ids=ids[s : s + GET_BATCH], output_fields=fields):
                out[int(row["id"])] = row
        return out

    def records(self, ids: Sequence[int]) -> dict[int, RecordRow]:
        live = None if self._ids is None else set(self._ids.tolist())
        rows = self._get(
            [i for i in ids if live is None or int(i) in live],
            ["id", "path", "size", "mtime_ns", "sha256", "width", "height"],
        )
        return {
            i: (i, r["path"], int(r["size"]), int(r["mtime_ns"]), r["sha256"], _none(r["width"]), _none(r["height"]))
            for i, r in rows.items()
        }

    def lookup_path(self, relpath: str) -> int | None:
        if self.writable:
            return self._path_ids().get(relpath)
        with self._lock:
            if self._paths is None:
                live = set(self.ids().tolist())
                self._paths = {
                    r["path"]: int(r["id"])
                    for r in self._query_all(self.c_images, ["id", "path"])
                    if int(r["id"]) in live
                }
        return self._paths.get(relpath)

    def vectors(self, name: str, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        if name not in self.vector_sets:
            raise KeyError(name)
        want = self.ids() if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(want) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if name in self._searchers:  # already in memory: the exact searcher's matrix
            return self._from_memory(name, want)
        rows = self._get(np.unique(want).tolist(), ["id", name])
        missing = [int(i) for i in want if int(i) not in rows]
        if missing:
            raise KeyError(f"image id(s) {missing[:5]} not in index {self.spec}")
        return np.stack([np.asarray(rows[int(i)][name], dtype=np.float32) for i in want])

    def _from_memory(self, name: str, want: np.ndarray) -> np.ndarray:
        raw = self._raw[name]
        pos = np.searchsorted(self._raw_ids, want)
        pos = np.clip(pos, 0, len(self._raw_ids) - 1)
        if not np.array_equal(self._raw_ids[pos], want):
            raise KeyError(f"image id(s) {want[self._raw_ids[pos] != want][:5].tolist()} not in index {self.spec}")
        return raw[pos]

    def _live_set(self) -> set[int] | None:
        """The ids of a reader's snapshot (None for a writer: everything stored is live)."""
        if self._ids is None:
            return None
        if getattr(self, "_live", None) is None:
            self._live = set(self._ids.tolist())
        return self._live

    # --- search ------------------------------------------------------------------------------
    def searcher(self, name: str = "raw") -> ExactSearcher:
        """calibclip's exact searcher over all vectors of ``name``, read from Milvus once."""
        with self._lock:
            if name not in self._searchers:
                ids = self.ids()
                if not hasattr(self, "_raw"):
                    self._raw: dict[str, np.ndarray] = {}
                    self._raw_ids = ids
                rows = {int(r["id"]): r[name] for r in self._query_all(self.c_images, ["id", name])}
                mat = np.zeros((len(ids), self.dim), dtype=np.float32)
                for j, i in enumerate(ids.tolist()):
                    mat[j] = rows[i]
                self._raw[name] = mat
                half = mat.astype(np.float16)
                norms = np.linalg.norm(half.astype(np.float32), axis=1).astype(np.float32)
                self._searchers[name] = ExactSearcher(half, norms, np.arange(len(ids)))
            return self._searchers[name]

    def _index_kind(self, name: str) -> str | None:
        try:
            return self.client.describe_index(self.c_images, name).get("index_type")
        except Exception:
            return None

    def prepare_ann(self, kind: str, name: str = "raw") -> None:
        if kind == "exact":
            self.searcher(name)
            return
        want = ANN_INDEX[kind]
        with self._lock:
            if self._index_kind(name) == want:
                return
            n = self.count()
            params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION} if kind == "hnsw" else {"nlist": _nlist(n)}
            self.client.release_collection(self.c_images)
            self.client.drop_index(self.c_images, name)
            deadline = time.monotonic() + 120
            while name in self.client.list_indexes(self.c_images, field_name=name):  # the drop is asynchronous
                if time.monotonic() > deadline:
                    raise IndexStateError(f"{self.spec}: Milvus did not drop the {name!r} index within 120 s")
                time.sleep(0.2)
            index = self.client.prepare_index_params()
            index.add_index(name, index_type=want, metric_type="COSINE", params=params)
            self.client.create_index(self.c_images, index)
            self._load(self.c_images)

    def search(
        self,
        name: str,
        queries: np.ndarray,
        k: int,
        kind: str,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids()
        k = min(int(k), len(ids))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if kind == "exact" or k <= 0:
            scores, pos = self.searcher(name).search(q, k)
            return scores, ids[pos] if len(ids) else pos
        self.prepare_ann(kind, name)
        p = dict(params or {})
        if kind == "hnsw":
            sp = {"ef": max(int(p.get("ef_search") or DEFAULT_EF_SEARCH), k)}
        else:
            sp = {"nprobe": int(p.get("nprobe") or DEFAULT_NPROBE)}
        # No server-side filter (a filtered search costs ~100x here): ids outside this reader's
        # snapshot (rows committed after it opened) are dropped from the hits instead.
        hits = self.client.search(
            self.c_images,
            data=list(q),
            anns_field=name,
            limit=k,
            search_params={"metric_type": "COSINE", "params": sp},
            output_fields=[],
        )
        live = self._live_set()
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out = np.full((len(q), k), -1, dtype=np.int64)
        for r, row in enumerate(hits):
            kept = [hit for hit in row if live is None or int(hit["id"]) in live][:k]
            for j, hit in enumerate(kept):
                scores[r, j], out[r, j] = float(hit["distance"]), int(hit["id"])
        return scores, out

    # --- files -------------------------------------------------------------------------------
    def file_path(self, name: str) -> Path | None:
        with self._lock:
            if name in self._files and self._files[name].exists():
                return self._files[name]
            pattern = json.dumps("f:" + name + ":%")
            rows = list(self._query_all(self.c_meta, ["key", "value"], filter=f"key like {pattern}"))
            if not rows:
                return None
            data = b"".join(base64.b64decode(r["value"]) for r in sorted(rows, key=lambda r: r["key"]))
            digest = hashlib.sha256(data).hexdigest()[:16]
            folder = Path(tempfile.gettempdir()) / "calibclip-milvus-files" / digest
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            if not path.exists():
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            self._files[name] = path
            return path

    def put_file(self, name: str, src: str | Path) -> None:
        self._require_writable()
        text = base64.b64encode(Path(src).read_bytes()).decode()
        chunks = [text[s : s + FILE_CHUNK] for s in range(0, len(text), FILE_CHUNK)] or [""]
        self.delete_file(name)
        rows = [{"key": f"f:{name}:{j:06d}", "value": c, "v": [0.0, 0.0]} for j, c in enumerate(chunks)]
        for s in range(0, len(rows), 64):
            self.client.upsert(self.c_meta, rows[s : s + 64])
        self._files.pop(name, None)

    def delete_file(self, name: str) -> None:
        self._require_writable()
        self.client.delete(self.c_meta, filter=f"key like {json.dumps('f:' + name + ':%')}")

    def disk_bytes(self) -> int | None:
        if self.uri.endswith(".db"):
            path = Path(self.uri)
            files = [p for q in path.parent.glob(path.name + "*") for p in ([q] if q.is_file() else q.rglob("*"))]
            return sum(p.stat().st_size for p in files if p.is_file())  # Milvus Lite 3: a .db folder
        return None

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a connection that already failed
                pass


def _int(value: int | None) -> int:
    return -1 if value is None else int(value)


def _none(value: Any) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _grpc_cause(exc: BaseException) -> tuple[str, str] | None:
    """``(status name, details)`` of the gRPC error under a pymilvus exception (pymilvus reports every
    failed connect as "Fail connecting to server ... illegal connection params or server unavailable"
    and keeps the real answer, e.g. UNAUTHENTICATED, as the cause)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code, details = getattr(cur, "code", None), getattr(cur, "details", None)
        if callable(code) and callable(details):
            try:
                name = getattr(code(), "name", str(code()))
                return str(name), str(details() or "").strip().splitlines()[0] if details() else ""
            except Exception:  # not a grpc.RpcError after all
                pass
        cur = cur.__cause__ or cur.__context__
    return None


#: gRPC answers that mean "the server is there and refused these credentials".
AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def _connect_message(location: str, lite: bool, exc: Exception) -> str:
    detail = (str(getattr(exc, "message", "") or exc).strip() or type(exc).__name__).splitlines()[0]
    if lite:
        return (
            f"cannot open Milvus Lite file milvus:{location} ({detail}); is another process using it? "
            "(a Milvus Lite file is opened by one process at a time)"
        )
    cause = _grpc_cause(exc)
    if cause is not None:
        detail = f"gRPC {cause[0]}: {cause[1][:200]}" if cause[1] else f"gRPC {cause[0]}"
    if (cause is not None and cause[0] in AUTH_CODES) or any(
        w in detail.lower() for w in ("auth", "token", "credential", "permission", "denied", "unauthenticated")
    ):
        return (
            f"Milvus at {location} refused the token ({detail}); pass the right one (token option, "
            "$CALIBCLIP_MILVUS_TOKEN)"
        )
    hint = "check the address and that the server is running"
    if cause is not None and cause[0] == "DEADLINE_EXCEEDED":
        hint = "something accepted the connection but did not answer as Milvus does; check the address and port"
    elif "HTTP/2" in detail:
        hint = "something answered that is not a Milvus gRPC endpoint; check the address and port (19530 by default)"
    return f"cannot reach Milvus at {location} ({detail}); {hint}"
