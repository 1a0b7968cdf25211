"""The Encoder interface helpers: TextBatch.drop_tokens and Encoder.encode ordering."""

from __future__ import annotations

import numpy as np
import torch

from calibclip.models.base import TextBatch


def _batch() -> TextBatch:
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    special = (ids == 1) | (ids == 2)
    return TextBatch(ids, mask, special, ["a b c", "d"])


def test_drop_tokens_compacts_rows_and_keeps_specials() -> None:
    b = _batch()
    drop = torch.tensor([[True, True, False, True, True, True], [False, True, False, False, False, False]])
    out = b.drop_tokens(drop)
    # specials (1, 2) and padding can never be dropped; rows are left-compacted and re-padded
    assert out.input_ids.tolist() == [[1, 6, 2], [1, 2, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out.special_mask.tolist() == [[True, False, True], [True, True, False]]


def test_drop_nothing_is_identity_up_to_trim() -> None:
    b = _batch()
    out = b.drop_tokens(torch.zeros_like(b.input_ids, dtype=torch.bool))
    assert torch.equal(out.input_ids, b.input_ids[:, :5])
    assert torch.equal(out.attention_mask, b.attention_mask[:, :5])


def test_select_rows() -> None:
    b = _batch()
    sub = b.select(torch.tensor([1]))
    assert sub.texts == ["d"] and sub.input_ids.shape == (1, 6)
    assert np.array_equal(b.select(slice(0, 1)).input_ids.numpy(), b.input_ids[:1].numpy())
