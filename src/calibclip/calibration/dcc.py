"""Discriminative Concept Calibrator (DCC): masks the query's dominant (generic) words, re-encodes
the query and moves its embedding away from the generic concepts.

Per query, over its words (real, non-special tokens; ``n`` of them) with pooling-token attention
``a_j``:

1. word share ``s_j = n * a_j / sum_k a_k`` (1 = uniform share);
2. dominant: ``s_j >= word_ratio``;
3. masked: the dominant words with the ``m`` largest shares (ties: earlier position first), with
   ``m = min(max_masked_words, floor(max_mask_frac * n))``, and ``m = 0`` when ``n < min_words``;
4. the masked words are dropped (`TextBatch.drop_tokens`) and the query re-encoded: ``t_m``;
5. ``t_cal = |t| * (n(t) + text_mix * (n(t_m) - n(t)))`` with ``n(x) = x / |x|``; a query with
   no masked word keeps ``t_cal = t`` bit for bit.

Padding and special tokens never count (their attention is ignored, they are never dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibclip.calibration.config import CalibrationConfig
from calibclip.models.base import TextBatch


@dataclass
class WordSelection:
    """DCC decisions, ``[B, L]`` each: candidate words, their shares, dominant and masked ones."""

    words: torch.Tensor  # bool: real, non-special tokens
    share: torch.Tensor  # n * normalised attention (0 off words)
    dominant: torch.Tensor  # bool
    masked: torch.Tensor  # bool, subset of dominant


def select_words(attention: torch.Tensor, batch: TextBatch, cfg: CalibrationConfig) -> WordSelection:
    """Steps 1-3 on attention ``[B, L]`` of ``batch``."""
    words = batch.attention_mask.bool().to(attention.device) & ~batch.special_mask.bool().to(attention.device)
    a = torch.where(words, attention.float().clamp(min=0), torch.zeros((), device=attention.device))
    n = words.sum(1, keepdim=True)
    total = a.sum(1, keepdim=True)
    share = torch.where(total > 0, a * n / total.clamp(min=1e-12), words.float())
    share = torch.where(words, share, torch.zeros_like(share))
    dominant = words & (share >= float(cfg.word_ratio))
    budget = torch.minimum(
        torch.full_like(n, int(cfg.max_masked_words)), torch.floor(n * float(cfg.max_mask_frac)).long()
    )
    budget = torch.where(n < int(cfg.min_words), torch.zeros_like(budget), budget)
    if not cfg.textual:
        budget = torch.zeros_like(budget)
    key = torch.where(dominant, share, torch.full_like(share, -1.0))
    order = torch.argsort(-key, dim=1, stable=True)
    rank = torch.empty_like(order)
    b, length = share.shape
    rank.scatter_(1, order, torch.arange(length, device=share.device).expand(b, length))
    masked = dominant & (rank < budget)
    return WordSelection(words=words, share=share, dominant=dominant, masked=masked)


def combine(raw: torch.Tensor, masked: torch.Tensor, cfg: CalibrationConfig) -> torch.Tensor:
    """Step 5 for rows that were masked: ``|t| * (n(t) + gamma * (n(t_m) - n(t)))``."""
    t = raw.float()
    norm = t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    nt = t / norm
    nm = masked.float() / masked.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (norm * (nt + float(cfg.text_mix) * (nm - nt))).to(raw.dtype)
