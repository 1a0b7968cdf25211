"""Exact nearest-neighbour search over stored (raw float16) vectors: cosine similarity by chunked
matrix product, arrays in, arrays out.

The gallery is normalised on the fly with the stored norms. When the live float32 normalised
matrix fits in ``CALIBCLIP_EXACT_CACHE_MB`` (default 2048 MiB) it is built once and kept in
memory; otherwise every query streams the memory-mapped float16 file in chunks.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

CHUNK_ROWS = 65536
#: Largest query x gallery score block computed at once (elements; 2**26 = 256 MiB of float32): a batch
#: of 1,000 queries over 1e6 in-memory vectors runs in ~15 blocks instead of one 4 GB score matrix.
SCORE_BLOCK = 1 << 26


def normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation to a float32 tensor (zero rows stay zero)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return torch.nn.functional.normalize(t.reshape(-1, t.shape[-1]), dim=-1)


def merge_topk(
    best_scores: torch.Tensor | None,
    best_pos: torch.Tensor | None,
    scores: torch.Tensor,
    offset: int,
    k: int,
    finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the running top-k ``(best_scores, best_pos)`` ``[Q, k]`` with a new score chunk whose
    first column is position ``offset`` (``finite``: the chunk is known to hold no NaN)."""
    kk = min(k, scores.shape[1])
    if not finite:
        scores = torch.nan_to_num(scores, nan=-torch.inf)  # a non-finite (damaged) row never ranks
    s, p = torch.topk(scores, kk, dim=1)
    p = p + offset
    if best_scores is not None:
        s, p = torch.cat([best_scores, s], 1), torch.cat([best_pos, p], 1)  # type: ignore[list-item]
        s, order = torch.topk(s, min(k, s.shape[1]), dim=1)
        p = torch.gather(p, 1, order)
    return s, p


class ExactSearcher:
    """Exact cosine top-k over the ``live_rows`` of a ``[rows, D]`` float16 (memory-mapped) matrix.

    Results are positions into ``live_rows`` (so callers map them to rows/ids); ties are broken by
    the lower position, as ``torch.topk`` on a stable order does.
    """

    def __init__(self, vectors: np.ndarray, norms: np.ndarray, live_rows: np.ndarray, cache_mb: float | None = None):
        self.vectors = vectors
        self.live_rows = np.asarray(live_rows, dtype=np.int64)
        self.all_live = len(self.live_rows) == len(vectors) and bool(
            len(self.live_rows) == 0 or self.live_rows[-1] == len(vectors) - 1
        )
        inv = 1.0 / np.maximum(np.asarray(norms, dtype=np.float32)[self.live_rows], 1e-12)
        self.inv_norms = torch.from_numpy(inv.astype(np.float32))
        if cache_mb is None:
            cache_mb = float(os.environ.get("CALIBCLIP_EXACT_CACHE_MB", "2048"))
        self.cache_bytes = cache_mb * 2**20
        self._matrix: torch.Tensor | None = None
        #: positions of the non-finite rows of ``_matrix`` (their scores are set to -inf by `search`)
        self._bad: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.live_rows)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Normalised float32 ``[stop - start, D]`` rows of the live gallery."""
        if self._matrix is not None:
            return self._matrix[start:stop]
        block = self.vectors[start:stop] if self.all_live else self.vectors[self.live_rows[start:stop]]
        return torch.from_numpy(np.asarray(block, dtype=np.float32)) * self.inv_norms[start:stop, None]

    def matrix(self) -> torch.Tensor | None:
        """The whole normalised live gallery in memory, if it fits the cache budget (built once)."""
        if self._matrix is None and len(self) * self.vectors.shape[1] * 4 <= self.cache_bytes:
            with self._lock:
                if self._matrix is None:
                    m = (
                        torch.cat(
                            [self.chunk(s, min(len(self), s + CHUNK_ROWS)) for s in range(0, len(self), CHUNK_ROWS)]
                        )
                        if len(self)
                        else torch.zeros(0, self.vectors.shape[1])
                    )
                    # rows of a damaged index (NaN): kept as they are (ANN builds see them), -inf in `search`
                    self._bad = (~torch.isfinite(m).all(dim=1)).nonzero().flatten()
                    self._matrix = m
        return self._matrix

    @torch.inference_mode()
    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine similarities of normalised ``queries`` ``[Q, D]``: ``(scores, positions)``
        each ``[Q, min(k, len)]``, best first; rows whose score is not finite (NaN vectors of a damaged
        index) come last as position -1 / score -inf."""
        q = normalize(queries)
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        full = self.matrix()
        # in memory and a finite query: only the columns of the known non-finite rows can be NaN, so they are
        # set to -inf directly instead of a NaN pass over every score; one score buffer is reused per block
        clean = full is not None and bool(torch.isfinite(q).all())
        step = max(CHUNK_ROWS, SCORE_BLOCK // max(len(q), 1)) if full is not None else CHUNK_ROWS
        best_s: torch.Tensor | None = None
        best_p: torch.Tensor | None = None
        buf: torch.Tensor | None = None
        for start in range(0, len(self), step):
            stop = min(len(self), start + step)
            block = self.chunk(start, stop)
            if not clean:
                best_s, best_p = merge_topk(best_s, best_p, q @ block.T, start, k)
                continue
            if buf is None or buf.shape[1] != stop - start:
                buf = torch.empty(len(q), stop - start)
            sims = torch.mm(q, block.T, out=buf)
            bad = self._bad[(self._bad >= start) & (self._bad < stop)] - start
            if len(bad):
                sims[:, bad] = -torch.inf
            best_s, best_p = merge_topk(best_s, best_p, sims, start, k, finite=True)
        scores, pos = best_s.numpy(), best_p.numpy()  # type: ignore[union-attr]
        return scores, np.where(np.isfinite(scores), pos, -1)  # -1 / -inf: no result (a non-finite row)

    def gather(self, positions: np.ndarray) -> torch.Tensor:
        """Normalised float32 vectors at ``positions`` (any shape ``[...]`` -> ``[..., D]``)."""
        pos = np.asarray(positions, dtype=np.int64)
        flat = pos.reshape(-1)
        if self._matrix is not None:
            out = self._matrix[torch.from_numpy(flat)]
        else:
            block = torch.from_numpy(np.asarray(self.vectors[self.live_rows[flat]], dtype=np.float32))
            out = block * self.inv_norms[torch.from_numpy(flat), None]
        return out.reshape(*pos.shape, -1)

    @torch.inference_mode()
    def scores_at(self, queries: np.ndarray | torch.Tensor, positions: np.ndarray) -> np.ndarray:
        """Cosine similarity of query ``i`` with the gallery items ``positions[i]`` ``[Q, K]``."""
        q = normalize(queries)
        g = self.gather(positions)
        return torch.einsum("qd,qkd->qk", q, g).numpy()
