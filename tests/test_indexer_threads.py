"""The local indexing engine caps the encoder's intra-op threads at ``CPU cores - workers`` while decoding
workers run, and restores them afterwards (issue 14); results are the same as in-process decoding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from calibclip.index import Index
from fakes import ColorEncoder


class _Recording(ColorEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return super().encode_image(pixels)


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i, (top, bottom) in enumerate([((255, 0, 0), (0, 0, 255)), ((0, 255, 0), (255, 255, 0)), ((0, 0, 0),) * 2]):
        arr = np.zeros((16, 8, 3), np.uint8)
        arr[:8], arr[8:] = top, bottom
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def test_encoder_threads_capped_while_decoders_run_and_restored(tmp_path, monkeypatch):
    folder = _images(tmp_path / "img")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enc = _Recording()
        pooled = Index.build(folder, tmp_path / "a", model=enc, workers=1, batch_size=2, progress=False)
        assert enc.threads and set(enc.threads) == {1}  # 2 cores - 1 decoder
        assert torch.get_num_threads() == 2  # restored
        inproc = _Recording()
        plain = Index.build(folder, tmp_path / "b", model=inproc, workers=0, batch_size=2, progress=False)
        assert set(inproc.threads) == {2}  # no decoder processes: untouched
        np.testing.assert_array_equal(pooled.features("raw"), plain.features("raw"))
    finally:
        torch.set_num_threads(before)
