"""The reference repository's ``calibclip.evaluation`` names (``metrics.py``, ``retrieval.py``,
``evaluator.compute_similarity``) over calibclip's exact metrics and top-K re-ranking.

Differences from the reference, all on purpose: ranks use calibclip's stable rule (ties broken by
gallery index) instead of an unstable ``argsort``; a query whose person id has no image in the gallery
is an error (the reference scores it 0 and lets it lower the means); `RetrievalEngine.two_stage_retrieval`
re-ranks only the top ``top_k`` candidates, as its documentation says (the reference fuses every column).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from calibclip.calibration.rerank import fuse_scores
from calibclip.evaluation.evaluator import compute_similarity
from calibclip.evaluation.metrics import ArrayLike, retrieval_metrics

__all__ = [
    "RetrievalEngine",
    "compute_ap",
    "compute_map",
    "compute_metrics",
    "compute_minp",
    "compute_minp_all",
    "compute_rank",
    "compute_similarity",
]


def _row(similarity: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """A single query's ``[G]`` scores as a ``[1, G]`` matrix."""
    if similarity.ndim != 1:
        raise ValueError(f"expected the scores of one query, shape [G], got {tuple(similarity.shape)}")
    return similarity[None]


def compute_rank(
    similarity: np.ndarray | torch.Tensor,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    topk: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Rank-K accuracy (CMC) of a ``[Q, G]`` similarity matrix.

    Args:
        similarity: ``[Q, G]`` scores, higher = more similar.
        query_pids: Person id of each query ``[Q]``.
        gallery_pids: Person id of each gallery image ``[G]``.
        topk: The K values.

    Returns:
        ``{"R@K": percent of queries with a same-id image in the top K}``.

    Raises:
        ValueError: a query id absent from the gallery, bad shapes or non-finite scores.
    """
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids, ks=tuple(topk))
    return {f"R@{k}": metrics[f"R@{k}"] for k in topk}


def compute_ap(similarity: np.ndarray | torch.Tensor, query_pid: int, gallery_pids: ArrayLike) -> float:
    """Average precision of one query.

    Args:
        similarity: The query's ``[G]`` scores.
        query_pid: The query's person id.
        gallery_pids: Person id of each gallery image ``[G]``.

    Returns:
        AP as a fraction in [0, 1].

    Raises:
        ValueError: ``query_pid`` has no image in the gallery, or bad shapes.
    """
    return retrieval_metrics(_row(similarity), [int(query_pid)], gallery_pids, ks=(1,))["mAP"] / 100.0


def compute_map(similarity: np.ndarray | torch.Tensor, query_pids: ArrayLike, gallery_pids: ArrayLike) -> float:
    """Mean average precision (percent) of a ``[Q, G]`` similarity matrix; arguments as `compute_rank`."""
    return retrieval_metrics(similarity, query_pids, gallery_pids, ks=(1,))["mAP"]


def compute_minp(similarity: np.ndarray | torch.Tensor, query_pid: int, gallery_pids: ArrayLike) -> float:
    """Inverse negative penalty of one query: ``P / rank of its last positive``, a fraction in [0, 1];
    arguments as `compute_ap`."""
    return retrieval_metrics(_row(similarity), [int(query_pid)], gallery_pids, ks=(1,))["mINP"] / 100.0


def compute_minp_all(similarity: np.ndarray | torch.Tensor, query_pids: ArrayLike, gallery_pids: ArrayLike) -> float:
    """Mean inverse negative penalty (percent) of a ``[Q, G]`` matrix; arguments as `compute_rank`."""
    return retrieval_metrics(similarity, query_pids, gallery_pids, ks=(1,))["mINP"]


def compute_metrics(
    similarity: np.ndarray | torch.Tensor,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    topk: Sequence[int] = (1, 5, 10),
    compute_map_flag: bool = True,
    compute_minp_flag: bool = True,
) -> dict[str, float]:
    """All person-retrieval metrics in percent (one pass of `calibclip.evaluation.retrieval_metrics`).

    Args:
        similarity: ``[Q, G]`` scores.
        query_pids: Person id of each query ``[Q]``.
        gallery_pids: Person id of each gallery image ``[G]``.
        topk: The K of each ``R@K``.
        compute_map_flag: Include ``mAP``.
        compute_minp_flag: Include ``mINP``.

    Returns:
        ``{"R@K", ..., "mAP", "mINP"}`` in percent.

    Raises:
        ValueError: as `compute_rank`.
    """
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids, ks=tuple(topk))
    out = {f"R@{k}": metrics[f"R@{k}"] for k in topk}
    if compute_map_flag:
        out["mAP"] = metrics["mAP"]
    if compute_minp_flag:
        out["mINP"] = metrics["mINP"]
    return out


class RetrievalEngine:
    """Standard and two-stage retrieval over feature matrices (the reference's ``RetrievalEngine``).

    Args:
        lambda_weight: Weight of the original similarity in the fused score of the re-ranked candidates.
        top_k: Candidates (by original similarity) that the second stage re-ranks.
    """

    def __init__(self, lambda_weight: float = 0.5, top_k: int = 100):
        if not 0.0 <= float(lambda_weight) <= 1.0:
            raise ValueError(f"lambda_weight must be in [0, 1], got {lambda_weight}")
        if int(top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.lambda_weight = float(lambda_weight)
        self.top_k = int(top_k)

    def compute_similarity(
        self, query_features: torch.Tensor, gallery_features: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """``[Q, G]`` similarity (cosine when ``normalize``); see `compute_similarity`."""
        return compute_similarity(query_features, gallery_features, normalize)

    def two_stage_retrieval(
        self, query_features: torch.Tensor, query_disc_features: torch.Tensor, gallery_features: torch.Tensor
    ) -> torch.Tensor:
        """Stage 1 ranks by the original query features; stage 2 re-ranks the ``top_k`` best with
        ``lambda_weight * original + (1 - lambda_weight) * discriminative`` cosine similarity.

        Args:
            query_features: Original query features ``[Q, D]``.
            query_disc_features: Discriminative (calibrated) query features ``[Q, D]``.
            gallery_features: Gallery features ``[G, D]``.

        Returns:
            ``[Q, G]`` float32 scores whose descending order is the final ranking: the ``top_k``
            candidates carry their fused score and rank above every other item, which keep their
            original order (`calibclip.calibration.rerank.fuse_scores`).
        """
        sim = compute_similarity(query_features, gallery_features).float()
        disc = compute_similarity(query_disc_features, gallery_features).float()
        return fuse_scores(sim, disc, top_k=self.top_k, lam=self.lambda_weight).float()

    def retrieve(
        self,
        query_features: torch.Tensor,
        gallery_features: torch.Tensor,
        query_disc_features: torch.Tensor | None = None,
        top_k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and rankings.

        Args:
            query_features: Query features ``[Q, D]``.
            gallery_features: Gallery features ``[G, D]``.
            query_disc_features: Discriminative query features ``[Q, D]``: two-stage retrieval when given.
            top_k: Keep only this many ranked indices per query (default: all ``G``).

        Returns:
            ``(similarity [Q, G], indices [Q, G or top_k])``, indices in descending score order (ties:
            lower gallery index first).
        """
        if query_disc_features is not None:
            similarity = self.two_stage_retrieval(query_features, query_disc_features, gallery_features)
        else:
            similarity = self.compute_similarity(query_features, gallery_features)
        indices = torch.argsort(similarity, dim=-1, descending=True, stable=True)
        if top_k is not None:
            indices = indices[:, : int(top_k)]
        return similarity, indices
