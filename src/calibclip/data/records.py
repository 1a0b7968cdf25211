"""Common record types that every dataset loader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(FileNotFoundError):
    """A dataset folder that does not have the expected files; the message says what was found,
    what was expected and what to do."""


@dataclass
class RetrievalDataset:
    """Text-to-image retrieval data (captions or person re-id).

    images:        gallery image paths ``[G]``.
    image_ids:     identity of each gallery image ``[G]`` (person id; for captions the image index).
    captions:      query texts ``[Q]``.
    caption_ids:   identity of each query ``[Q]`` (matches ``image_ids``).
    caption_image: index into ``images`` of the image each caption was written for ``[Q]``.
    """

    name: str
    split: str
    root: Path
    images: list[Path]
    image_ids: np.ndarray
    captions: list[str]
    caption_ids: np.ndarray
    caption_image: np.ndarray
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64)
        self.caption_ids = np.asarray(self.caption_ids, dtype=np.int64)
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.images) != len(self.image_ids) or len(self.captions) != len(self.caption_ids):
            raise ValueError("inconsistent dataset arrays")

    def first_images(self, n: int) -> "RetrievalDataset":
        """The first ``n`` gallery images and the captions written for them (quick or budgeted runs)."""
        n = min(int(n), len(self.images))
        keep = np.flatnonzero(self.caption_image < n)
        return RetrievalDataset(
            self.name, self.split, self.root, list(self.images[:n]), self.image_ids[:n],
            [self.captions[i] for i in keep], self.caption_ids[keep], self.caption_image[keep],
            {**self.info, "first_images": n},
        )

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name}/{self.split}: {len(self.images)} images, {len(self.captions)} captions)"
