"""Contrastive Visual Enhancer (CVE): re-weights the visual tokens whose attention dominates the
pooled embedding and rebuilds the image embedding from the re-weighted tokens.

Per image, with ``a`` the token attention (sums to 1), ``N`` tokens on an ``h x w`` grid:

1. shares ``s_i = N a_i`` (1 = uniform share);
2. dominant: ``s_i >= dominant_ratio`` and i among the ``ceil(max_dominant_frac * N)`` largest
   (ties: lower index first);
3. neighbourhood mean ``m_i`` = mean of ``s`` over the *non-dominant* other tokens of the k x k
   window around i (window clipped at the border; if every neighbour is dominant, all count), so
   two adjacent spikes do not make each other look like a target region;
4. contrast ``c_i = s_i - m_i``;
5. region: target if ``m_i >= target_ratio`` else low-information;
6. treatment of dominant tokens: low-information -> suppress; target with ``c_i >= spike_contrast``
   -> decay; other target -> retain. Non-dominant tokens keep factor 1;
7. ``w'_i = a_i f_i / sum_j a_j f_j`` and
   ``v_cal = pooled + visual_strength * (sum_i w'_i t_i - sum_i a_i t_i)``.
   When no token changes (all factors 1) ``v_cal`` is ``pooled`` bit for bit.

Every step is per image: nothing depends on other images of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibclip.calibration.config import CalibrationConfig
from calibclip.models.base import ImageTokens

#: Treatment codes (per token), in the order used by explanations and plots.
CONTEXT, TARGET, RETAIN, DECAY, SUPPRESS = 0, 1, 2, 3, 4
TREATMENTS = ("context", "target", "retain", "decay", "suppress")


@dataclass
class CVEResult:
    """Everything the CVE decided, per image (all ``[B, N]`` unless noted)."""

    calibrated: torch.Tensor  # [B, D]
    share: torch.Tensor  # N * a_i
    neighbour_mean: torch.Tensor  # m_i
    contrast: torch.Tensor  # s_i - m_i
    dominant: torch.Tensor  # bool
    target: torch.Tensor  # bool, target region
    treatment: torch.Tensor  # long codes (CONTEXT..SUPPRESS)
    factor: torch.Tensor  # f_i
    weights: torch.Tensor  # w'_i (re-weighted, sums to 1)
    grid: tuple[int, int]


def neighbour_mean(
    share: torch.Tensor, grid: tuple[int, int], window: int, include: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``share`` ``[B, N]`` over each token's k x k neighbours on the grid, the token itself
    excluded and the window clipped at the border. With ``include`` (bool ``[B, N]``) only those
    neighbours count; a token with no counted neighbour gets the plain neighbour mean, and a 1x1
    grid returns ``share``."""
    h, w = grid
    b, n = share.shape
    if h * w != n:
        raise ValueError(f"token grid {grid} does not match {n} tokens")
    x = share.reshape(b, 1, h, w)
    kernel = torch.ones(1, 1, window, window, dtype=share.dtype, device=share.device)
    pad = window // 2

    def sums(values: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = F.conv2d(values * weight, kernel, padding=pad) - values * weight
        count = F.conv2d(weight, kernel, padding=pad) - weight
        return total, count

    total, count = sums(x, torch.ones_like(x))
    mean = torch.where(count > 0, total / count.clamp(min=1.0), x)
    if include is not None:
        sel_total, sel_count = sums(x, include.reshape(b, 1, h, w).to(share.dtype))
        mean = torch.where(sel_count > 0, sel_total / sel_count.clamp(min=1.0), mean)
    return mean.reshape(b, n)


def classify_tokens(attention: torch.Tensor, grid: tuple[int, int], cfg: CalibrationConfig) -> dict[str, torch.Tensor]:
    """Steps 1-6 on attention ``[B, N]``: shares, neighbourhood, dominance, region, treatment, factor."""
    a = attention.float()
    b, n = a.shape
    share = a * n
    budget = min(n, math.ceil(float(cfg.max_dominant_frac) * n))
    order = torch.argsort(-share, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=a.device).expand(b, n))
    dominant = (share >= float(cfg.dominant_ratio)) & (rank < budget)
    mean = neighbour_mean(share, grid, int(cfg.neighbourhood), include=~dominant)
    contrast = share - mean
    target = mean >= float(cfg.target_ratio)
    spike = contrast >= float(cfg.spike_contrast)
    treatment = torch.where(target, TARGET, CONTEXT)
    treatment = torch.where(dominant & ~target, SUPPRESS, treatment)
    treatment = torch.where(dominant & target & spike, DECAY, treatment)
    treatment = torch.where(dominant & target & ~spike, RETAIN, treatment)
    table = torch.tensor(
        [1.0, 1.0, float(cfg.retain_factor), float(cfg.decay_factor), float(cfg.suppress_factor)], device=a.device
    )
    factor = table[treatment]
    return {
        "share": share,
        "neighbour_mean": mean,
        "contrast": contrast,
        "dominant": dominant,
        "target": target,
        "treatment": treatment,
        "factor": factor,
    }


def enhance(view: ImageTokens, cfg: CalibrationConfig) -> CVEResult:
    """Run the CVE on a token view; ``result.calibrated`` has the dtype of ``view.pooled``."""
    pooled = view.pooled
    parts = classify_tokens(view.attention, view.grid, cfg)
    a = view.attention.float()
    if not cfg.visual:
        parts["factor"] = torch.ones_like(parts["factor"])
    factor = parts["factor"]
    raw_w = a * factor
    total = raw_w.sum(1, keepdim=True)
    # a row whose weights all vanish (every token suppressed to 0) keeps its attention
    weights = torch.where(total > 1e-12, raw_w / total.clamp(min=1e-12), a)
    changed = ((factor != 1.0) & (a > 0)).any(1) & (total[:, 0] > 1e-12) & (float(cfg.visual_strength) > 0)
    tokens = view.tokens.float()
    delta = torch.einsum("bn,bnd->bd", weights - a, tokens)
    calibrated = torch.where(changed[:, None], pooled.float() + float(cfg.visual_strength) * delta, pooled.float())
    calibrated = torch.where(changed[:, None], calibrated.to(pooled.dtype), pooled)
    return CVEResult(calibrated=calibrated, weights=weights, grid=tuple(view.grid), **parts)  # type: ignore[arg-type]
