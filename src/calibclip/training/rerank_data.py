"""Training data of the cross-modal re-ranker: hard candidates mined from the frozen dual
encoder's own top-K (token views come from `calibclip.data.tokens`)."""

from __future__ import annotations

import torch


def mine_candidates(
    text_pooled: torch.Tensor,
    image_pooled: torch.Tensor,
    positives: torch.Tensor,
    k: int,
    chunk: int = 2048,
) -> torch.Tensor:
    """Each caption's ``k`` best images by the frozen dual encoder's cosine similarity ``[Q, k]``,
    with the true image (``positives [Q]``) put in place of the last candidate when it is not among
    them (so every list holds exactly one positive, at its rank when it made the top-K)."""
    g = torch.nn.functional.normalize(image_pooled.float(), dim=-1)
    out = []
    for s in range(0, len(text_pooled), chunk):
        q = torch.nn.functional.normalize(text_pooled[s : s + chunk].float(), dim=-1)
        top = torch.topk(q @ g.T, k, dim=1).indices
        pos = positives[s : s + chunk]
        missing = ~(top == pos[:, None]).any(1)
        top[missing, -1] = pos[missing]
        out.append(top)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.int64)
