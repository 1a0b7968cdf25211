"""The ``local`` store: one folder holding fp16 memory maps + SQLite metadata (`Storage`, see
storage.py for the layout and the crash-safety rule) + FAISS files built lazily (ann.py).

A read-only open takes one snapshot (metadata + live rows of the same commit): searches see that
state even while another process adds batches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibclip.index.ann import AnnIndex
from calibclip.index.search import ExactSearcher
from calibclip.index.storage import SkippedFile, Storage, is_index_dir, read_meta
from calibclip.index.stores.base import RecordRow, SkippedRow, VectorStore


class LocalStore(VectorStore):
    """An index folder (today's on-disk format, unchanged)."""

    scheme = "local"
    description = "a folder: float16 memory maps + SQLite + FAISS (exact, IVF-Flat, HNSW)"
    ann_kinds = {"exact": (), "ivf": ("nprobe",), "hnsw": ("ef_search",)}
    default_ann = "ivf"
    supports_tokens = True

    def __init__(self, storage: Storage):
        self.storage = storage
        self.directory = storage.directory
        self.spec = str(storage.directory)
        self.writable = storage.writable
        self._lock = threading.RLock()
        self._searchers: dict[str, ExactSearcher] = {}
        self._ann: dict[str, AnnIndex] = {}
        self._snap: tuple[dict[str, Any], np.ndarray, np.ndarray] | None = None
        self._token_maps: dict[tuple[str, int], np.ndarray] = {}
        if not self.writable:
            with storage.snapshot():  # metadata and rows of the same commit
                meta = storage.meta()
                rows, ids = storage.row_ids()
            self._snap = (meta, rows, ids)
            self._id_order = np.argsort(ids, kind="stable")

    @classmethod
    def open(cls, location: str, writable: bool = False, options: Mapping[str, Any] | None = None) -> LocalStore:
        if writable:
            cls.check_new(location)
        return cls(Storage(location, writable=writable))

    @classmethod
    def check_new(cls, location: str, options: Mapping[str, Any] | None = None) -> None:
        out = Path(location)
        if out.exists() and not is_index_dir(out) and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an index; give a new folder (or an existing index to update)")

    @classmethod
    def read_meta(cls, location: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return read_meta(location)

    # --- metadata ----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return dict(self._snap[0]) if self._snap is not None else self.storage.meta()

    def get(self, key: str, default: Any = None) -> Any:
        return self._snap[0].get(key, default) if self._snap is not None else self.storage.get(key, default)

    def fresh(self, key: str, default: Any = None) -> Any:
        return self.storage.get(key, default)

    def set_meta(self, values: Mapping[str, Any]) -> None:
        self.storage.set_meta(dict(values))

    def initialise(self, dim: int, vector_sets: Sequence[str], meta: Mapping[str, Any]) -> None:
        self.storage.initialise(dim, vector_sets, dict(meta))

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        with self.storage.snapshot():
            yield

    # --- writing -----------------------------------------------------------------------------
    def commit_batch(
        self,
        vectors: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, Any]],
        skipped: Sequence[SkippedRow] = (),
        removed: Sequence[str] = (),
        tokens: Mapping[str, np.ndarray] | None = None,
    ) -> list[int]:
        self.storage.commit_batch(dict(vectors), records, skipped, removed, tokens=dict(tokens or {}))  # type: ignore[arg-type]
        return [self.storage.lookup_path(r["path"]) for r in records]  # type: ignore[misc]

    def touch_images(self, updates: Sequence[tuple[str, int, int]]) -> None:
        self.storage.touch_images(updates)

    def maintain(self) -> None:
        from calibclip.index.build import COMPACT_FRACTION

        st = self.storage
        if st.rows - st.count() > COMPACT_FRACTION * max(st.rows, 1):
            st.compact()

    # --- reading -----------------------------------------------------------------------------
    def _rows_ids(self) -> tuple[np.ndarray, np.ndarray]:
        return self._snap[1:] if self._snap is not None else self.storage.row_ids()  # type: ignore[return-value]

    def ids(self) -> np.ndarray:
        return self._rows_ids()[1].copy()

    def count(self) -> int:
        return len(self._rows_ids()[1]) if self._snap is not None else self.storage.count()

    def skipped(self) -> list[SkippedFile]:
        return self.storage.skipped()

    def skipped_count(self) -> int:
        return self.storage.skipped_count()

    def images_state(self) -> dict[str, tuple[int, int, str, int]]:
        return self.storage.images_state()

    def skipped_state(self) -> dict[str, tuple[int | None, int | None]]:
        return self.storage.skipped_state()

    def records(self, ids: Sequence[int]) -> dict[int, RecordRow]:
        return {i: r[:7] for i, r in self.storage.records(ids).items()}  # type: ignore[misc]

    def lookup_path(self, relpath: str) -> int | None:
        return self.storage.lookup_path(relpath)

    def _positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions (storage order) of ``ids``; KeyError for ids not in the snapshot."""
        all_ids = self._rows_ids()[1]
        order = self._id_order if self._snap is not None else np.argsort(all_ids, kind="stable")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        sorted_ids = all_ids[order]
        where = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0 or not np.array_equal(sorted_ids[where], ids):
            missing = ids if len(sorted_ids) == 0 else ids[sorted_ids[where] != ids]
            raise KeyError(f"image id(s) {missing[:5].tolist()} not in index {self.spec}")
        return order[where]

    def _committed_rows(self) -> int:
        return int(self.get("rows", 0))

    def vectors(self, name: str, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        rows, all_ids = self._rows_ids()
        pos = np.arange(len(all_ids)) if ids is None else self._positions(ids)
        data = self.storage.vectors(name, self._committed_rows())
        return np.asarray(data[rows[pos]], dtype=np.float32)

    def tokens(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        if name not in self.token_sets():
            raise KeyError(f"index {self.spec} has no token set {name!r}")
        rows, _ = self._rows_ids()
        pos = self._positions(ids)
        committed = self._committed_rows()
        with self._lock:
            key = (name, committed)
            data = self._token_maps.get(key)
            if data is None:
                data = self._token_maps[key] = self.storage.tokens(name, committed)
        return np.asarray(data[rows[pos]], dtype=np.float16)

    # --- search ------------------------------------------------------------------------------
    def searcher(self, name: str = "raw") -> ExactSearcher:
        """The exact searcher over vector set ``name`` (shared, lazily created)."""
        with self._lock:
            if name not in self._searchers:
                rows = self._committed_rows()
                self._searchers[name] = ExactSearcher(
                    self.storage.vectors(name, rows), self.storage.norms(name, rows), self._rows_ids()[0]
                )
            return self._searchers[name]

    def ann_index(self, kind: str, name: str = "raw") -> AnnIndex:
        """The FAISS index ``kind`` (ivf | hnsw) over vector set ``name``: loaded from
        ``INDEX_DIR/ann/`` when current, else built (and saved when the folder is writable)."""
        key = f"{name}.{kind}"
        with self._lock:
            if key not in self._ann:
                path = self.directory / "ann" / f"{key}.faiss"
                n = self.count()
                expect = {
                    "version": self.get("version"),
                    "generation": self.get("generation"),
                    "count": n,
                    "kind": kind,
                }
                ann = AnnIndex.load(path, expect)
                if ann is None:
                    searcher = self.searcher(name)
                    matrix = searcher.matrix()
                    if matrix is None:
                        matrix = torch.cat([searcher.chunk(s, min(n, s + 65536)) for s in range(0, n, 65536)])
                    ann = AnnIndex.build(kind, matrix.numpy())
                    try:
                        ann.save(path, expect)
                    except OSError as exc:
                        warnings.warn(
                            f"could not save the {kind} index under {path.parent} ({exc}); kept in memory", stacklevel=2
                        )
                self._ann[key] = ann
            return self._ann[key]

    def prepare_ann(self, kind: str, name: str = "raw") -> None:
        if kind != "exact":
            self.ann_index(kind, name)

    def search(
        self,
        name: str,
        queries: np.ndarray,
        k: int,
        kind: str,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self._rows_ids()[1]
        k = min(int(k), len(ids))
        params = dict(params or {})
        if kind == "exact" or k <= 0:
            scores, pos = self.searcher(name).search(queries, k)
        else:
            scores, pos = self.ann_index(kind, name).search(
                np.asarray(queries, dtype=np.float32), k, nprobe=params.get("nprobe"), ef_search=params.get("ef_search")
            )
            scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        pos = np.asarray(pos, dtype=np.int64)
        out = np.where(pos >= 0, ids[np.clip(pos, 0, None)], -1) if len(ids) else pos
        return scores, out

    # --- files -------------------------------------------------------------------------------
    def file_path(self, name: str) -> Path | None:
        path = self.directory / name
        return path if path.is_file() else None

    def put_file(self, name: str, src: str | Path) -> None:
        dst = self.directory / name
        shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
        os.replace(dst.with_name(dst.name + ".tmp"), dst)

    def delete_file(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())

    def close(self) -> None:
        self.storage.close()
