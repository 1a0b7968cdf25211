"""Batched image decoding in worker processes, overlapped with encoding.

`iter_image_batches` yields, in input order, batches of preprocessed pixels plus the
files that could not be used (with their `ImageError` reason), so callers never stop on a
bad file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from calibclip.data.images import ImageError

Transform = Callable[[Any], torch.Tensor]


@dataclass
class ImageBatch:
    """``indices`` of the good items (into the input list) and their ``pixels`` ``[n, 3, H, W]``;
    ``errors`` maps bad indices to ``(reason, message)``."""

    indices: list[int]
    pixels: torch.Tensor | None
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)


class _Images(Dataset):
    def __init__(self, paths: Sequence[str | Path], transform: Transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        try:
            return i, self.transform(self.paths[i]), None
        except ImageError as exc:
            return i, None, (exc.reason, str(exc))
        except MemoryError:
            return i, None, ("too_large", f"{self.paths[i]}: out of memory while decoding")


def _collate(items: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]]) -> ImageBatch:
    good = [(i, x) for i, x, err in items if x is not None]
    errors = {i: err for i, _, err in items if err is not None}
    pixels = torch.stack([x for _, x in good]) if good else None
    return ImageBatch([i for i, _ in good], pixels, errors)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def iter_image_batches(
    paths: Sequence[str | Path], transform: Transform, batch_size: int = 32, workers: int = 0
) -> Iterator[ImageBatch]:
    """Decode and preprocess ``paths`` in ``workers`` processes (0 = in this process), yielding
    `ImageBatch` objects in order. Decoding of the next batches overlaps the caller's work."""
    if not paths:
        return
    loader = DataLoader(
        _Images(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def default_workers() -> int:
    """Image decoding processes for bulk encoding (indexing, feature extraction): CPU cores - 1, between 0 and 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))
