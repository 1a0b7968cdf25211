"""Top-K re-ranking: the K best candidates by raw similarity are re-ordered by the fused score
``lam * sim_raw + (1 - lam) * sim_cal`` and stay above every other candidate, which keep their
raw order below them."""

from __future__ import annotations

import numpy as np
import torch


def fuse_scores(
    sim_raw: torch.Tensor | np.ndarray, sim_cal: torch.Tensor | np.ndarray, top_k: int, lam: float
) -> torch.Tensor:
    """Fused float64 scores ``[Q, G]`` (numpy in, numpy out; torch in, torch out).

    Row by row: the ``K = min(top_k, G)`` largest ``sim_raw`` get
    ``sim_raw + (1 - lam) * (sim_cal - sim_raw)`` (= ``lam * raw + (1 - lam) * cal``, written so
    that ``cal == raw`` or ``lam == 1`` returns ``raw`` exactly); every other entry gets
    ``sim_raw - offset`` with ``offset = max(0, max(sim_raw) - min(fused top-K)) + 1`` so that it
    ranks below all of the top-K in its raw order. ``top_k = 0`` returns ``sim_raw``.
    Vectorised (topk + scatter); no loops.
    """
    as_numpy = isinstance(sim_raw, np.ndarray)
    raw = torch.as_tensor(sim_raw)
    cal = torch.as_tensor(sim_cal, device=raw.device)
    if raw.shape != cal.shape or raw.ndim != 2:
        raise ValueError(f"sim_raw and sim_cal must both be [Q, G]; got {tuple(raw.shape)} and {tuple(cal.shape)}")
    raw = raw.double()  # float64: shifting float32 scores by the offset never merges two of them
    cal = cal.double()
    k = min(int(top_k), raw.shape[1])
    if k <= 0 or raw.numel() == 0:
        out = raw.clone()
    else:
        idx = torch.topk(raw, k, dim=1).indices
        top_raw = torch.gather(raw, 1, idx)
        fused = top_raw + (1.0 - float(lam)) * (torch.gather(cal, 1, idx) - top_raw)
        out = place_topk(raw, idx, fused)
    return out.numpy() if as_numpy else out  # type: ignore[return-value]


def place_topk(sim_raw: torch.Tensor, idx: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """Scores ``[Q, G]`` (float64) where the candidates ``idx`` ``[Q, K]`` (each row's K best by
    ``sim_raw``) get their ``fused`` scores and every other entry keeps its raw order below all of
    them (``sim_raw - offset``, see `fuse_scores`)."""
    raw = sim_raw.double()
    fused = fused.double()
    if idx.shape[1] == raw.shape[1]:
        return torch.empty_like(raw).scatter_(1, idx, fused)
    if idx.shape[1] == 0:
        return raw.clone()
    offset = (raw.max(1, keepdim=True).values - fused.min(1, keepdim=True).values).clamp(min=0) + 1.0
    return (raw - offset).scatter_(1, idx, fused)
