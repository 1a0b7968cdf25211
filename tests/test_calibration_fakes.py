"""Tests of the calibration fake's own contract (`fakes.TokenEncoder`: constructed token maps,
attention and features known exactly)."""

from __future__ import annotations

import torch

from fakes import TokenEncoder as FakeEncoder


def test_fake_attention_pools_exactly() -> None:
    enc = FakeEncoder()
    px = torch.rand(2, 3, 16, 20)
    view = enc.image_tokens(px)
    assert view.grid == (4, 5) and torch.allclose(view.attention.sum(1), torch.ones(2))
    tb = enc.tokenize(["a man", "a red dog runs on the grass"])
    alone = enc.encode_text(enc.tokenize(["a man"]))
    assert torch.allclose(enc.encode_text(tb)[0], alone[0], atol=1e-6)
