"""A small fake `Encoder` with constructed token maps (attention and features known exactly),
used by the calibration tests; plus tests of the fake's own contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclip.data.transforms import ImageTransform
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens

SOT, EOT, PAD = 1, 2, 0
VOCAB = ["a", "man", "woman", "with", "red", "blue", "backpack", "dog", "runs", "on", "the", "grass", "hat", "in"]
#: pooling-token attention mass of each word (the EOT->token attention is proportional to it)
SALIENCE = {"man": 8.0, "woman": 8.0, "dog": 8.0, "a": 0.5, "the": 0.5, "with": 0.6, "on": 0.6, "in": 0.6}


class FakeEncoder(Encoder):
    """Images: ``[B, 3, 4h, 4w]`` pixels are average-pooled 4x4 into an ``h x w`` token grid; channel 0
    (clamped at 0, plus 1e-3) is each token's attention mass, tokens are ``cell @ proj`` and
    ``pooled = sum_i a_i token_i`` (attention pooling). Texts: a fixed vocabulary; attention from
    EOT proportional to `SALIENCE` (SOT gets a large mass on purpose: special tokens must never
    be masked); ``pooled = sum_j a_j emb_j`` over real tokens only (padding-exact)."""

    name = "fake"
    pad_id = PAD

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = dim
        self.proj = nn.Parameter(torch.randn(3, dim, generator=g), requires_grad=False)
        self.emb = nn.Parameter(torch.randn(len(VOCAB) + 3, dim, generator=g), requires_grad=False)
        sal = torch.ones(len(VOCAB) + 3)
        sal[SOT] = 20.0
        sal[EOT] = 1.0
        for w, s in SALIENCE.items():
            sal[VOCAB.index(w) + 3] = s
        self.register_buffer("salience", sal)
        self.preprocess = ImageTransform(size=(24, 24), mode="resize", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        rows = [[SOT] + [VOCAB.index(w) + 3 for w in t.lower().split()] + [EOT] for t in texts]
        length = max((len(r) for r in rows), default=2)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        mask = (ids != PAD).long()
        return TextBatch(ids, mask, (ids == SOT) | (ids == EOT), list(texts))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Optional hook used by explanations."""
        names = {SOT: "<sot>", EOT: "<eot>", PAD: ""}
        return [names.get(int(i)) or VOCAB[int(i) - 3] for i in ids]

    def text_tokens(self, text: TextBatch) -> TextTokens:
        mask = text.attention_mask.bool()
        mass = torch.where(mask, self.salience[text.input_ids], torch.zeros(()))
        att = mass / mass.sum(1, keepdim=True)
        tokens = self.emb[text.input_ids] * mask[..., None]
        pooled = torch.einsum("bl,bld->bd", att, tokens)
        return TextTokens(pooled=pooled, tokens=tokens, attention=att, batch=text)

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).pooled  # type: ignore[arg-type]

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        cells = F.avg_pool2d(pixels.float(), 4)
        h, w = cells.shape[-2:]
        flat = cells.flatten(2).transpose(1, 2)  # [B, N, 3]
        mass = flat[..., 0].clamp(min=0) + 1e-3
        att = mass / mass.sum(1, keepdim=True)
        tokens = flat @ self.proj
        return ImageTokens(pooled=torch.einsum("bn,bnd->bd", att, tokens), tokens=tokens, attention=att, grid=(h, w))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(pixels).pooled

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.embed_dim, "vision_layers": 1, "text_layers": 1}


def pixels_from_mass(mass: np.ndarray, features: np.ndarray | None = None) -> torch.Tensor:
    """Pixels whose fake token grid has attention mass ``mass [h, w]`` (channel 0) and the given
    other channels ``features [2, h, w]`` (default: a fixed pattern)."""
    h, w = mass.shape
    if features is None:
        features = np.stack([np.arange(h * w).reshape(h, w) % 5, np.arange(h * w).reshape(h, w) % 3]).astype(float)
    cells = np.concatenate([mass[None], features], 0)
    return torch.as_tensor(np.kron(cells, np.ones((4, 4))), dtype=torch.float32)


def test_fake_attention_pools_exactly() -> None:
    enc = FakeEncoder()
    px = torch.rand(2, 3, 16, 20)
    view = enc.image_tokens(px)
    assert view.grid == (4, 5) and torch.allclose(view.attention.sum(1), torch.ones(2))
    tb = enc.tokenize(["a man", "a red dog runs on the grass"])
    alone = enc.encode_text(enc.tokenize(["a man"]))
    assert torch.allclose(enc.encode_text(tb)[0], alone[0], atol=1e-6)
