"""Training losses of dual encoders (own code; facts from CLIP and IRRA's ``model/objectives.py``).

- `info_nce`: symmetric InfoNCE over a batch of ``B`` (image, text) pairs, positives on the diagonal,
  ``0.5 * (CE(s * I T^T, diag) + CE(s * T I^T, diag))`` on L2-normalised features, ``s = 1 / temperature``.
- `sdm`: IRRA's similarity-distribution matching. With ``q_ij = [id_i == id_j] / #{k: id_k == id_i}``
  and ``p = softmax(s * cos)`` row-wise, ``SDM = mean_i KL(p_i2t || q_i) + mean_i KL(p_t2i || q_i)``
  where ``KL(p || q) = sum_j p_j (log p_j - log(q_j + eps))`` (eps = 1e-8, as IRRA).
- `identity_loss`: cross-entropy of a linear classifier over identities on both modalities, averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of paired ``[B, D]`` features (normalised here)."""
    a, b = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = logit_scale * a @ b.t()
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def sdm(
    image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, logit_scale: torch.Tensor | float, eps: float = 1e-8
) -> torch.Tensor:
    """IRRA's similarity-distribution matching of paired ``[B, D]`` features with identities ``[B]``."""
    a, b = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    ids = ids.reshape(-1, 1)
    same = (ids == ids.t()).float()
    target = same / same.sum(1, keepdim=True)
    log_target = torch.log(target + eps)
    t2i = logit_scale * b @ a.t()
    total = image.new_zeros((), dtype=torch.float32)
    for logits in (t2i.t(), t2i):
        p = F.softmax(logits, dim=1)
        total = total + (p * (F.log_softmax(logits, dim=1) - log_target)).sum(1).mean()
    return total


def identity_loss(classifier: nn.Module, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IRRA's ID loss: ``0.5 * (CE(W image, id) + CE(W text, id))`` (features un-normalised, as IRRA)."""
    return 0.5 * (
        F.cross_entropy(classifier(image.float()), labels) + F.cross_entropy(classifier(text.float()), labels)
    )


class DualEncoderObjective(nn.Module):
    """Weighted sum of InfoNCE (learnable temperature), SDM (fixed temperature) and ID loss.

    Args:
        weights: ``{"infonce": w, "sdm": w, "id": w}`` (0 disables a term).
        temperature: initial InfoNCE temperature (learnable, clamped to >= 0.01).
        sdm_temperature: SDM temperature (IRRA: 0.02, fixed).
        embed_dim / num_identities: size of the ID classifier (only built when ``weights["id"] > 0``).
    """

    def __init__(
        self,
        weights: dict[str, float],
        temperature: float = 0.07,
        sdm_temperature: float = 0.02,
        embed_dim: int = 0,
        num_identities: int = 0,
        learn_temperature: bool = True,
    ):
        super().__init__()
        unknown = sorted(set(weights) - {"infonce", "sdm", "id"})
        if unknown:
            raise ValueError(f"unknown loss weight(s) {unknown}; valid: infonce, sdm, id")
        self.weights = {k: float(weights.get(k, 0.0)) for k in ("infonce", "sdm", "id")}
        if not any(self.weights.values()):
            raise ValueError("all loss weights are 0: set training.losses.infonce/sdm/id")
        if temperature <= 0 or sdm_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature} and {sdm_temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        self.sdm_scale = 1.0 / sdm_temperature
        self.classifier: nn.Module | None = None
        if self.weights["id"] > 0:
            if num_identities < 2 or embed_dim < 1:
                raise ValueError(f"the ID loss needs >= 2 identities and an embedding size, got {num_identities}")
            self.classifier = nn.Linear(embed_dim, num_identities)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts. ``ids``: identities (SDM); ``labels``: class indices (ID loss)."""
        parts: dict[str, torch.Tensor] = {}
        if self.weights["infonce"]:
            parts["infonce"] = info_nce(image, text, self.scale())
        if self.weights["sdm"]:
            parts["sdm"] = sdm(image, text, ids, self.sdm_scale)
        if self.classifier is not None:
            parts["id"] = identity_loss(self.classifier, image, text, labels if labels is not None else ids)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}  # type: ignore[return-value]
