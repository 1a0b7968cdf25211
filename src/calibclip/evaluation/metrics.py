"""Retrieval metrics: pure functions, similarity matrix in, dict of percentages out.

Ranking rule (used by every function here and by the reference implementation in the tests):
gallery items are ranked by descending similarity; **ties are broken by gallery index**
(the lower index ranks first), i.e. a *stable* descending sort. Formally, the rank of gallery
item ``j`` for a query is ``1 + #{g : s_g > s_j} + #{g < j : s_g == s_j}``.

Definitions (IRRA, ``utils/metrics.py::rank``):
- ``R@K`` (CMC): percentage of queries with at least one positive in the top K.
- ``AP``: mean over the positives (in rank order, m = 1..P) of ``m / rank_m``; ``mAP`` its mean.
- ``INP``: ``P / rank_P`` (rank of the hardest positive); ``mINP`` its mean.

Speed: no full sort. Only the ranks of the positives are needed. On the CPU, queries with few positives
(<= ``SCAN_MAX_POSITIVES``) get each positive's rank from one vectorised pass over the row:
``rank_j = 1 + #{g < j : s_g >= s_j} + #{g > j : s_g > s_j}`` (exact, ties included), which costs
``O(P G)`` whatever the scores look like (random scores are the worst case of the top-set path below).
For the other queries (or on a GPU): for most queries every positive
lies in a small ``topk`` of the row, and the ranks follow from comparisons inside it; the other
rows are compared with their (few) sorted positive scores by ``searchsorted`` (``O(G log P)``
instead of ``O(G log G)``), and exact ties with a positive are counted on the affected (query,
positive) pairs only. Queries are processed in chunks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]

#: Elements of a (queries x gallery) chunk processed at once (bounds temporary memory).
CHUNK_ELEMENTS = 1 << 23
#: ``topk`` sizes tried before counting over whole rows (see `iter_positive_ranks`).
TOP_LEVELS = (64, 1024)
#: Queries with at most this many positives are ranked by direct counting (`_ranks_by_scan`) on the CPU.
SCAN_MAX_POSITIVES = 16
#: Worker threads of `_ranks_by_scan` (NumPy releases the GIL inside the comparisons).
SCAN_THREADS = 2


def _as_similarity(similarity: np.ndarray | torch.Tensor) -> torch.Tensor:
    sim = similarity if isinstance(similarity, torch.Tensor) else torch.from_numpy(np.asarray(similarity))
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a 2-D (queries x gallery) matrix, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.to(torch.float64)
    elif sim.dtype in (torch.float16, torch.bfloat16):
        sim = sim.float()  # exact up-cast
    return sim


def _as_ids(ids: ArrayLike, n: int, what: str, device: torch.device) -> torch.Tensor:
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
    t = t.reshape(-1).to(device=device, dtype=torch.int64)
    if t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} entries but the similarity matrix has {n} along that axis")
    return t


class _Positives:
    """Each query's positives by grouping the gallery by id (no Q x G matrix): gallery indices
    ``order[start[q] : start[q] + count[q]]`` (ascending gallery index)."""

    def __init__(self, query_ids: torch.Tensor, gallery_ids: torch.Tensor):
        self.order = torch.argsort(gallery_ids, stable=True)
        sorted_ids = gallery_ids[self.order]
        self.start = torch.searchsorted(sorted_ids, query_ids, right=False)
        self.count = torch.searchsorted(sorted_ids, query_ids, right=True) - self.start

    def table(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``index [n, P]`` and ``valid [n, P]`` for a chunk of queries (P = its max count)."""
        start, count = self.start[rows], self.count[rows]
        width = int(count.max().item()) if count.numel() else 0
        offs = torch.arange(width, device=start.device)
        valid = offs[None, :] < count[:, None]
        pos = (start[:, None] + offs[None, :]).clamp(max=max(len(self.order) - 1, 0))
        return torch.where(valid, self.order[pos], torch.zeros_like(pos)), valid


def _ranks_in_top(
    top_val: torch.Tensor, top_idx: torch.Tensor, pos_val: torch.Tensor, pos_idx: torch.Tensor
) -> torch.Tensor:
    """Ranks of positives ``[n, P]`` given each row's top set ``[n, K]`` that contains every
    gallery item scoring >= the row's lowest positive (items outside it can never outrank one)."""
    n, width = pos_val.shape
    out = torch.empty(n, width, dtype=torch.int64, device=pos_val.device)
    step = max(1, CHUNK_ELEMENTS // max(width * top_val.shape[1], 1))
    for s in range(0, n, step):
        tv, ti = top_val[s : s + step, None, :], top_idx[s : s + step, None, :]
        pv, pj = pos_val[s : s + step, :, None], pos_idx[s : s + step, :, None]
        beats = (tv > pv) | ((tv == pv) & (ti < pj))
        out[s : s + step] = beats.sum(2) + 1
    return out


def _ranks_by_count(rows: torch.Tensor, pos_val: torch.Tensor, pos_idx: torch.Tensor) -> torch.Tensor:
    """Ranks of positives ``[n, P]`` for whole rows ``[n, G]`` (padding positives hold +inf).

    Each row is compared with its sorted positive scores by ``searchsorted``: with
    ``c_g = #{positives < s_g}``, ``#{g: s_g > v_i} = #{g: c_g >= i}`` (a histogram of c).
    Exact ties with a positive are then counted directly on the affected pairs only.
    """
    n, n_g = rows.shape
    width = pos_val.shape[1]
    dev = rows.device
    pv, perm = torch.sort(pos_val, dim=1, stable=True)
    pj = torch.gather(pos_idx, 1, perm)
    offset = (torch.arange(n, device=dev) * (width + 1))[:, None]
    rows = rows.contiguous()

    def count_at_least(side: str) -> torch.Tensor:
        c = torch.searchsorted(pv, rows, side=side)
        hist = torch.bincount((c + offset).reshape(-1), minlength=n * (width + 1)).reshape(n, width + 1)
        return hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [:, i-1] = #{g: c_g >= i}

    greater = count_at_least("left")  # #{g: s_g > v_i}
    ties = count_at_least("right") - greater  # #{g: s_g == v_i}, the positive itself included
    rank = greater + 1
    r, c = torch.nonzero(ties > 1, as_tuple=True)
    if r.numel():
        ar = torch.arange(n_g, device=dev)
        step = max(1, CHUNK_ELEMENTS // max(n_g, 1))
        for t in range(0, r.numel(), step):
            rr, cc = r[t : t + step], c[t : t + step]
            same = rows[rr] == pv[rr, cc][:, None]
            rank[rr, cc] += (same & (ar[None, :] < pj[rr, cc][:, None])).sum(1)
    out = torch.empty_like(rank)
    out.scatter_(1, perm, rank)
    return out


def _scan_rows(rows: np.ndarray, pos_idx: np.ndarray, count: np.ndarray, out: np.ndarray) -> None:
    for r in range(rows.shape[0]):
        row = rows[r]
        for c in range(int(count[r])):
            j = int(pos_idx[r, c])
            v = row[j]
            out[r, c] = 1 + np.count_nonzero(row[:j] >= v) + np.count_nonzero(row[j + 1 :] > v)


def _ranks_by_scan(rows: torch.Tensor, pos_idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ranks of positives ``[n, P]`` (CPU rows ``[n, G]``; ``valid`` is a prefix mask per row) by
    counting, per positive ``j`` with score ``v``: ``1 + #{g < j: s_g >= v} + #{g > j: s_g > v}``.
    One pass over the row per positive, exact with ties; padding entries are left 0."""
    rows_np = rows.contiguous().numpy()
    idx_np = pos_idx.numpy()
    count = valid.sum(1).numpy()
    out = np.zeros(pos_idx.shape, dtype=np.int64)
    n = rows_np.shape[0]
    workers = max(1, min(SCAN_THREADS, n // 64))
    if workers == 1:
        _scan_rows(rows_np, idx_np, count, out)
    else:
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(0, n, workers + 1).astype(int)
        with ThreadPoolExecutor(workers) as pool:
            jobs = [
                pool.submit(_scan_rows, rows_np[a:b], idx_np[a:b], count[a:b], out[a:b]) for a, b in pairwise(bounds)
            ]
            for job in jobs:
                job.result()
    return torch.from_numpy(out)


def iter_positive_ranks(
    similarity: np.ndarray | torch.Tensor, query_ids: ArrayLike, gallery_ids: ArrayLike
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(first_query, ranks [n, P], valid [n, P])`` per chunk of queries: the 1-based ranks
    of every positive under the stable descending order, sorted ascending per row (padding
    ``G + 1``). Raises ValueError when a query has no positive or the matrix holds NaN or +inf
    (-inf is a valid score: it ranks last).

    On the CPU, queries with at most ``SCAN_MAX_POSITIVES`` positives are ranked by direct counting
    (`_ranks_by_scan`). The others are mostly resolved from a ``topk`` of ``TOP_LEVELS[0]`` items: when the row's
    lowest-scoring positive beats the K-th item, every item that can outrank a positive is in
    that top set. Remaining rows try the next level, then count over the whole row.
    """
    sim = _as_similarity(similarity)
    n_q, n_g = sim.shape
    dev = sim.device
    q_ids = _as_ids(query_ids, n_q, "query_ids", dev)
    g_ids = _as_ids(gallery_ids, n_g, "gallery_ids", dev)
    positives = _Positives(q_ids, g_ids)
    if n_q and bool((positives.count == 0).any()):
        bad = torch.nonzero(positives.count == 0).reshape(-1)
        raise ValueError(
            f"{bad.numel()} of {n_q} queries have no matching gallery item (e.g. query {int(bad[0])} with id "
            f"{int(q_ids[bad[0]])}); every query id must occur in gallery_ids"
        )
    chunk = max(1, CHUNK_ELEMENTS // max(n_g, 1))
    inf = torch.tensor(float("inf"), dtype=sim.dtype, device=dev)
    for s in range(0, n_q, chunk):
        rows = sim[s : s + chunk]
        if rows.numel():
            top = rows.amax(1)  # NaN propagates
            if bool((torch.isnan(top) | torch.isposinf(top)).any()):
                raise ValueError("similarity contains NaN or +inf values")
        idx, ok = positives.table(slice(s, s + chunk))
        n, width = idx.shape
        pos_val = torch.where(ok, torch.gather(rows, 1, idx), inf)  # padding never outranks anything
        lowest = pos_val.min(1).values
        rank = torch.empty(n, width, dtype=torch.int64, device=dev)
        todo = torch.arange(n, device=dev)
        if dev.type == "cpu" and SCAN_MAX_POSITIVES > 0:
            few = positives.count[s : s + n] <= SCAN_MAX_POSITIVES
            if bool(few.any()):
                sel = todo[few]
                scanned = rows if len(sel) == n else rows.index_select(0, sel)
                rank[sel] = _ranks_by_scan(scanned, idx[sel], ok[sel])
                todo = todo[~few]
        for k in TOP_LEVELS:
            if not todo.numel():
                break
            k = min(k, n_g)
            top_val, top_idx = torch.topk(rows if len(todo) == n else rows.index_select(0, todo), k, dim=1)
            done = (top_val[:, -1] < lowest[todo]) | (k == n_g)
            sel = todo[done]
            rank[sel] = _ranks_in_top(top_val[done], top_idx[done], pos_val[sel], idx[sel])
            todo = todo[~done]
        if todo.numel():
            rank[todo] = _ranks_by_count(rows.index_select(0, todo), pos_val[todo], idx[todo])
        rank = torch.where(ok, rank, torch.full_like(rank, n_g + 1))
        yield s, torch.sort(rank, dim=1).values, ok


def positive_ranks(
    similarity: np.ndarray | torch.Tensor, query_ids: ArrayLike, gallery_ids: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """All positive ranks at once: ``ranks [Q, P]`` and ``valid [Q, P]`` (see `iter_positive_ranks`)."""
    parts = list(iter_positive_ranks(similarity, query_ids, gallery_ids))
    n_g = int(_as_similarity(similarity).shape[1])
    width = max((r.shape[1] for _, r, _ in parts), default=0)
    ranks = (
        torch.cat([F.pad(r, (0, width - r.shape[1]), value=n_g + 1) for _, r, _ in parts])
        if parts
        else torch.zeros(0, 0, dtype=torch.int64)
    )
    valid = (
        torch.cat([F.pad(v, (0, width - v.shape[1]), value=False) for _, _, v in parts])
        if parts
        else torch.zeros(0, 0, dtype=torch.bool)
    )
    return ranks, valid


def retrieval_metrics(
    similarity: np.ndarray | torch.Tensor,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Person-retrieval metrics (IRRA definitions) of a ``[Q, G]`` similarity matrix (NumPy or
    torch, higher = more similar) with integer ``query_ids [Q]`` and ``gallery_ids [G]``.

    Returns ``{"R@1", "R@5", "R@10", "mAP", "mINP"}`` (one ``R@K`` per ``ks``) in percent.
    Ties: stable descending order (lower gallery index first); see the module docstring.
    """
    n_q = int(_as_similarity(similarity).shape[0])
    if n_q == 0:
        raise ValueError("no queries: the similarity matrix has zero rows")
    first = torch.empty(n_q, dtype=torch.int64)
    ap = torch.empty(n_q, dtype=torch.float64)
    inp = torch.empty(n_q, dtype=torch.float64)
    for s, ranks, valid in iter_positive_ranks(similarity, query_ids, gallery_ids):
        n = ranks.shape[0]
        n_pos = valid.sum(1)
        m = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
        precision = torch.where(valid, m[None, :] / ranks.double(), torch.zeros((), dtype=torch.float64))
        first[s : s + n] = ranks[:, 0].cpu()
        ap[s : s + n] = (precision.sum(1) / n_pos).cpu()
        inp[s : s + n] = (n_pos / torch.gather(ranks, 1, (n_pos - 1)[:, None])[:, 0].double()).cpu()
    out = {f"R@{k}": float((first <= k).double().mean() * 100) for k in ks}
    out["mAP"] = float(ap.mean() * 100)
    out["mINP"] = float(inp.mean() * 100)
    return out


def recall_at_k(
    similarity: np.ndarray | torch.Tensor,
    query_ids: ArrayLike,
    gallery_ids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """``{"R@K": percent of queries with a positive in the top K}`` (same ranking rule)."""
    metrics = retrieval_metrics(similarity, query_ids, gallery_ids, ks)
    return {f"R@{k}": metrics[f"R@{k}"] for k in ks}


def caption_metrics(
    similarity: np.ndarray | torch.Tensor, caption_image: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Caption retrieval of a ``[captions, images]`` similarity matrix where caption ``i`` was
    written for image ``caption_image[i]``.

    Returns ``t2i_R@K`` (the caption's image in the top K images) and ``i2t_R@K`` (any of the
    image's captions in the top K captions), in percent. Images without a caption are not
    i2t queries.
    """
    sim = _as_similarity(similarity)
    cap_img = _as_ids(caption_image, sim.shape[0], "caption_image", sim.device)
    n_img = sim.shape[1]
    t2i = recall_at_k(sim, cap_img, torch.arange(n_img, device=sim.device), ks)
    has_caption = torch.zeros(n_img, dtype=torch.bool, device=sim.device)
    has_caption[cap_img] = True
    images = torch.nonzero(has_caption).reshape(-1)
    sim_t = sim.T.contiguous()  # [images, captions]; a strided gather would be several times slower
    if len(images) < n_img:
        sim_t = sim_t.index_select(0, images)
    i2t = recall_at_k(sim_t, images, cap_img, ks)
    return {**{f"t2i_{k}": v for k, v in t2i.items()}, **{f"i2t_{k}": v for k, v in i2t.items()}}


def ground_truth_metrics(
    similarity: np.ndarray | torch.Tensor,
    ground_truth: dict[int, Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    compute_map: bool = True,
    compute_minp: bool = True,
) -> dict[str, float]:
    """Retrieval metrics with explicit positives per query (the reference repository's
    ``Evaluator.evaluate(similarity_matrix, ground_truth)``), as **fractions** in [0, 1].

    Args:
        similarity: ``[Q, G]`` scores, higher = more similar (NumPy or torch).
        ground_truth: ``{query row: [positive gallery columns, ...]}``; only these queries count.
        ks: the K of each ``R@K``.
        compute_map: also return ``mAP`` (mean over queries of AP, IRRA's definition).
        compute_minp: also return ``mINP`` (mean of ``P / rank of the last positive``).

    Returns:
        ``{"R@K": fraction of the queries with a positive in the top K, ..., "mAP", "mINP"}``. Ranks
        follow this module's rule (stable descending order, ties broken by gallery index).

    Raises:
        ValueError: an empty ``ground_truth``, a query without positives, or a row / column index
            outside the matrix.
    """
    sim = _as_similarity(similarity).double()
    n_q, n_g = sim.shape
    if not ground_truth:
        raise ValueError("ground_truth is empty: give {query_index: [positive gallery indices]}")
    rows: list[int] = []
    cols: list[int] = []
    for q, positives in ground_truth.items():
        pos = sorted({int(p) for p in positives})
        if not 0 <= int(q) < n_q:
            raise ValueError(f"ground_truth query {q} is outside the similarity matrix's {n_q} rows")
        if not pos:
            raise ValueError(f"ground_truth query {q} has no positive gallery index (its metrics are undefined)")
        if pos[0] < 0 or pos[-1] >= n_g:
            raise ValueError(
                f"ground_truth query {q} names gallery index {pos[0] if pos[0] < 0 else pos[-1]}, "
                f"outside the matrix's {n_g} columns"
            )
        rows += [int(q)] * len(pos)
        cols += pos
    q_idx = torch.as_tensor(rows, device=sim.device)
    g_idx = torch.as_tensor(cols, device=sim.device)
    ranks = torch.empty(len(rows), dtype=torch.int64, device=sim.device)
    gallery = torch.arange(n_g, device=sim.device)
    step = max(1, CHUNK_ELEMENTS // max(n_g, 1))
    for s in range(0, len(rows), step):
        r, c = q_idx[s : s + step], g_idx[s : s + step]
        row = sim[r]  # [pairs, G]
        own = row.gather(1, c[:, None])
        ahead = (row > own) | ((row == own) & (gallery[None, :] < c[:, None]))
        ranks[s : s + step] = 1 + ahead.sum(1)
    # group the pairs per query, positives in rank order
    order = torch.argsort(q_idx * (n_g + 1) + ranks)
    q_sorted, r_sorted = q_idx[order], ranks[order].double()
    queries, counts = torch.unique_consecutive(q_sorted, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    m = torch.arange(len(rows), device=sim.device) - torch.repeat_interleave(starts, counts) + 1
    first = r_sorted[starts]
    out = {f"R@{k}": float((first <= k).double().mean()) for k in ks}
    if compute_map:
        ap = torch.zeros(len(queries), dtype=torch.float64, device=sim.device)
        ap.index_add_(0, torch.repeat_interleave(torch.arange(len(queries), device=sim.device), counts), m / r_sorted)
        out["mAP"] = float((ap / counts).mean())
    if compute_minp:
        last = r_sorted[starts + counts - 1]
        out["mINP"] = float((counts / last).mean())
    return out
