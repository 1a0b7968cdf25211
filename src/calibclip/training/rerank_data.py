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
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each caption's ``k`` best images by the frozen dual encoder's cosine similarity ``[Q, k]``,
    with the true image (``positives [Q]``) put in place of the last candidate when it is not among
    them (so every list holds exactly one positive, at its rank when it made the top-K).

    ``noise``: std of Gaussian noise added to the similarities before ranking (harder, more varied
    lists than the dual encoder's own top-K on the captions it was trained on)."""
    g = torch.nn.functional.normalize(image_pooled.float(), dim=-1)
    out = []
    for s in range(0, len(text_pooled), chunk):
        q = torch.nn.functional.normalize(text_pooled[s : s + chunk].float(), dim=-1)
        sim = q @ g.T
        if noise > 0:
            sim = sim + noise * torch.randn(sim.shape, generator=generator)
        top = torch.topk(sim, min(k, sim.shape[1]), dim=1).indices
        pos = positives[s : s + chunk]
        missing = ~(top == pos[:, None]).any(1)
        top[missing, -1] = pos[missing]
        out.append(top)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.int64)
