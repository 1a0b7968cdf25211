"""Composed image retrieval metrics (percentages), vectorised over queries x gallery.

Ranks use one tie rule everywhere: a gallery item is ranked before the target when its score
is higher, or equal with a smaller gallery index (the order of a stable descending sort).

- `composed_ranks`: 0-based rank of each query's target, optionally excluding one gallery item
  per query (CIRR removes the reference image from its own ranking).
- `recall_at_k`: percentage of queries whose target rank is below K.
- `fashioniq_metrics`: ``<cat>_R@10 <cat>_R@50 avg_R@10 avg_R@50 avg``.
- `cirr_metrics`: ``R@1 R@5 R@10 R@50 Rsubset@1 Rsubset@2 Rsubset@3 avg`` with
  avg = (R@5 + Rsubset@1) / 2; Rsubset ranks the target among the query's image set without
  the reference.
- `cirr_submission`: the two test-server JSON objects (top-50 and subset top-3 names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


#: Queries ranked per block (bounds the temporary ``[block, G]`` masks).
BLOCK = 1024


def _tensor(x: ArrayLike, dtype: torch.dtype | None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if dtype is None:  # scores: keep a floating dtype (comparisons are exact in any of them)
        return t if t.is_floating_point() else t.double()
    return t.to(dtype)


def _rank_of(scores: torch.Tensor, index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of ``target`` among the columns of ``scores`` ``[Q, N]`` whose gallery indices are
    ``index`` ``[Q, N]`` (excluded columns carry -inf)."""
    t_score = scores.gather(1, (index == target[:, None]).float().argmax(1, keepdim=True))
    before = (scores > t_score) | ((scores == t_score) & (index < target[:, None]))
    return before.sum(1)


@torch.inference_mode()
def composed_ranks(scores: ArrayLike, target: ArrayLike, exclude: ArrayLike | None = None) -> torch.Tensor:
    """0-based rank of ``target[q]`` in row ``q`` of ``scores`` ``[Q, G]``; ``exclude[q]`` (a
    gallery index, -1 for none) is removed from the ranking first."""
    s = _tensor(scores, None)
    t = _tensor(target, torch.int64)
    if s.ndim != 2 or t.shape != (s.shape[0],):
        raise ValueError(f"scores must be [Q, G] and target [Q]; got {tuple(s.shape)} and {tuple(t.shape)}")
    if ((t < 0) | (t >= s.shape[1])).any():
        raise ValueError("every query needs a target index inside the gallery")
    e = _tensor(exclude, torch.int64) if exclude is not None else torch.full_like(t, -1)
    if (e == t).any():
        raise ValueError("a query's excluded image (its reference) is also its target")
    ranks = []
    for start in range(0, s.shape[0], BLOCK):
        block = s[start : start + BLOCK].clone()
        bt, be = t[start : start + BLOCK], e[start : start + BLOCK]
        rows = torch.nonzero(be >= 0).squeeze(1)
        block[rows, be[rows]] = float("-inf")
        t_score = block.gather(1, bt[:, None])
        index = torch.arange(block.shape[1])
        before = (block > t_score) | ((block == t_score) & (index[None, :] < bt[:, None]))
        ranks.append(before.sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)


def recall_at_k(ranks: ArrayLike, ks: Sequence[int], prefix: str = "") -> dict[str, float]:
    """``{f"{prefix}R@{k}": percent of ranks < k}``."""
    r = _tensor(ranks, torch.int64)
    return {f"{prefix}R@{k}": float((r < k).double().mean().item() * 100.0) if len(r) else 0.0 for k in ks}


def fashioniq_metrics(per_category: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> dict[str, float]:
    """FashionIQ metrics from ``{category: (scores [Q, G], target [Q])}`` (gallery = the
    category's split images; the reference is not removed, as in the original protocol)."""
    out: dict[str, float] = {}
    for cat, (scores, target) in per_category.items():
        out.update(recall_at_k(composed_ranks(scores, target), (10, 50), prefix=f"{cat}_"))
    cats = list(per_category)
    out["avg_R@10"] = float(np.mean([out[f"{c}_R@10"] for c in cats]))
    out["avg_R@50"] = float(np.mean([out[f"{c}_R@50"] for c in cats]))
    out["avg"] = (out["avg_R@10"] + out["avg_R@50"]) / 2.0
    return out


@torch.inference_mode()
def subset_ranks(scores: ArrayLike, reference: ArrayLike, target: ArrayLike, subsets: ArrayLike) -> torch.Tensor:
    """0-based rank of the target among its image set ``subsets[q]`` (gallery indices, -1 padding)
    without the reference."""
    s = _tensor(scores, None)
    ref, t, sub = _tensor(reference, torch.int64), _tensor(target, torch.int64), _tensor(subsets, torch.int64)
    valid = (sub >= 0) & (sub != ref[:, None])
    if not bool((valid & (sub == t[:, None])).any(1).all()):
        raise ValueError("every query's target must be a member of its image set")
    sub_scores = s.gather(1, sub.clamp(min=0)).masked_fill(~valid, float("-inf"))
    return _rank_of(sub_scores, sub, t)


def cirr_metrics(
    scores: ArrayLike,
    reference: ArrayLike,
    target: ArrayLike,
    subsets: ArrayLike | None,
    ks: Sequence[int] = (1, 5, 10, 50),
) -> dict[str, float]:
    """CIRR metrics; without ``subsets`` only ``R@k`` (the keys the CSS benchmark reports)."""
    out = recall_at_k(composed_ranks(scores, target, exclude=reference), ks)
    if subsets is not None:
        out.update(
            {
                k.replace("R@", "Rsubset@"): v
                for k, v in recall_at_k(subset_ranks(scores, reference, target, subsets), (1, 2, 3)).items()
            }
        )
        out["avg"] = (out["R@5"] + out["Rsubset@1"]) / 2.0
    return out


@torch.inference_mode()
def cirr_submission(
    scores: ArrayLike,
    reference: ArrayLike,
    subsets: ArrayLike,
    pair_ids: Sequence[int],
    names: Sequence[str],
    version: str = "rc2",
    top: int = 50,
    top_subset: int = 3,
) -> tuple[dict[str, object], dict[str, object]]:
    """The CIRR test-server files: ``{"version", "metric": "recall", "<pairid>": [top-50 names]}``
    and ``{"version", "metric": "recall_subset", "<pairid>": [top-3 names]}`` (reference removed)."""
    s = _tensor(scores, None).clone()
    ref, sub = _tensor(reference, torch.int64), _tensor(subsets, torch.int64)
    s[torch.arange(len(ref)), ref] = float("-inf")
    k = min(top, s.shape[1] - 1)
    best = torch.topk(s, k, dim=1).indices
    valid = (sub >= 0) & (sub != ref[:, None])
    sub_scores = s.gather(1, sub.clamp(min=0)).masked_fill(~valid, float("-inf"))
    order = torch.argsort(-sub_scores, dim=1, stable=True)[:, :top_subset]
    sub_best = sub.gather(1, order)
    sub_ok = valid.gather(1, order)
    recall: dict[str, object] = {"version": version, "metric": "recall"}
    subset: dict[str, object] = {"version": version, "metric": "recall_subset"}
    for q, pid in enumerate(pair_ids):
        recall[str(int(pid))] = [names[i] for i in best[q].tolist()]
        subset[str(int(pid))] = [names[i] for i, ok in zip(sub_best[q].tolist(), sub_ok[q].tolist()) if ok]
    return recall, subset
