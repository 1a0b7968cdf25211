"""Approximate nearest-neighbour search with FAISS (IVF-Flat and HNSW-Flat, inner product on
normalised vectors = cosine).

ANN structures are built lazily on the first approximate search and saved under
``INDEX_DIR/ann/<set>.<kind>.faiss`` with a JSON sidecar recording the index ``version`` they were
built from; a newer index version (any add/remove) makes them stale and they are rebuilt.

Defaults (chosen from bench/bench_index.py, see docs/indexing.md):
- ``auto`` uses exact search up to `AUTO_THRESHOLD` (stores/base.py) live vectors, IVF above it.
- IVF: ``nlist = clip(4 * sqrt(N), 16, 65536)`` k-means cells trained (`KMEANS_ITERATIONS` iterations) on
  at most 64 vectors per cell and at most `TRAIN_MAX` vectors (1e6 vectors: 4,000 cells from 65,536
  samples); ``nprobe`` (cells scanned per query) defaults to `DEFAULT_NPROBE`.
- HNSW: ``M = 32`` links per node, ``efConstruction = 80``; ``efSearch`` defaults to `DEFAULT_EF_SEARCH`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: 1e6 x 512 synthetic (bench/bench_ann.py): recall@10 0.957 at nprobe 24, 0.990 at 32, 1.000 at 64 (nlist 4000).
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 128
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
TRAIN_PER_CELL = 64
#: Largest k-means training sample (a 256k-vector sample made the 1e6 build take 268 s, for no recall gain).
TRAIN_MAX = 65536
KMEANS_ITERATIONS = 12


def ivf_nlist(n: int) -> int:
    return int(min(65536, max(16, round(4 * math.sqrt(max(n, 1))))))


def _faiss() -> Any:
    import faiss  # imported lazily: only approximate search needs it

    return faiss


class AnnIndex:
    """A FAISS index over normalised float32 vectors; results are positions in build order."""

    def __init__(self, kind: str, index: Any, params: dict[str, Any]):
        self.kind = kind
        self.index = index
        self.params = params

    @classmethod
    def build(cls, kind: str, vectors: np.ndarray, seed: int = 0, nlist: int | None = None) -> AnnIndex:
        """Build ``kind`` (ivf | hnsw) over normalised ``vectors`` ``[N, D]`` (``nlist``: IVF cells, default
        `ivf_nlist`)."""
        faiss = _faiss()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        if kind == "ivf":
            nlist = min(int(nlist or ivf_nlist(n)), max(1, n // 39))  # FAISS wants >= 39 training points per cell
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            m = min(nlist * TRAIN_PER_CELL, TRAIN_MAX)
            train = x if n <= m else x[np.sort(rng.choice(n, m, replace=False))]
            index.cp.seed = seed
            index.cp.niter = KMEANS_ITERATIONS
            index.cp.min_points_per_centroid = 1  # a 16-per-cell sample is enough here (no FAISS warning)
            index.train(train)
            index.add(x)
            params = {"nlist": nlist}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.add(x)
            params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        else:
            raise ValueError(f"cannot build ANN kind {kind!r}: use ivf or hnsw")
        return cls(kind, index, params)

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)`` ``[Q, k]``; per-call parameters (thread-safe, no shared state)."""
        faiss = _faiss()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or DEFAULT_NPROBE))
        else:
            params = faiss.SearchParametersHNSW(efSearch=max(int(ef_search or DEFAULT_EF_SEARCH), k))
        scores, pos = self.index.search(q, k, params=params)
        return scores, np.where(np.isfinite(scores), pos, -1)  # a non-finite (damaged) vector never ranks

    def memory_bytes(self) -> int:
        """Serialized size of the FAISS structure (vectors + graph/lists)."""
        return int(_faiss().serialize_index(self.index).nbytes)

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: Path, info: dict[str, Any]) -> None:
        """Write ``path`` (.faiss) and its ``.json`` sidecar atomically."""
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        faiss.write_index(self.index, tmp)
        os.replace(tmp, path)
        side = {"kind": self.kind, "params": self.params, **info}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(side, f)
        os.replace(tmp, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path, expect: dict[str, Any]) -> AnnIndex | None:
        """The saved index at ``path`` if its sidecar matches ``expect`` (else None: stale/missing)."""
        side_path = path.with_suffix(".json")
        if not path.exists() or not side_path.exists():
            return None
        try:
            side = json.loads(side_path.read_text())
        except (OSError, ValueError):
            return None
        if any(side.get(k) != v for k, v in expect.items()):
            return None
        return cls(side["kind"], _faiss().read_index(str(path)), side.get("params", {}))
