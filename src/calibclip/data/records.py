"""Common record types that every dataset loader yields."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DatasetError(FileNotFoundError):
    """A dataset folder that does not have the expected files; the message says what was found,
    what was expected and what to do."""


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``.

    Raises:
        DatasetError: the file cannot be read or is not UTF-8 (the message names the file and the byte offset).
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 4]
        raise DatasetError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}: {bad!r}); re-save it as UTF-8 or re-download it"
        ) from None
    except OSError as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_json(path: Path, what: str = "annotation file", hint: str = "re-download it") -> Any:
    """The parsed JSON of ``path``.

    Raises:
        DatasetError: unreadable, not UTF-8 or not valid JSON (the message names the file and the position).
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{what} {path} is not valid JSON ({exc}); {hint}") from None


def record_error(path: Path, index: int, problem: str, expected: str) -> DatasetError:
    """A `DatasetError` for entry number ``index`` (0-based, as in the JSON list) of ``path``; ``problem``
    is a verb phrase ("lacks field(s) ...", "has ...")."""
    return DatasetError(f"{path}: entry {index} {problem}; expected {expected}")


def type_name(value: Any) -> str:
    """``value``'s JSON type name, for messages."""
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def safe_relpath(rel: Any, root: Path, where: str) -> str:
    """``rel`` checked to be a relative path that stays inside ``root`` (no absolute path, no ``..``
    escaping it), judged on the text so that symlinked data layouts keep working.

    Raises:
        DatasetError: not a string, absolute, or leading outside ``root``.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise DatasetError(f"{where}: expected a relative path string, got {type_name(rel)} {rel!r}")
    norm = os.path.normpath(rel.replace("\\", "/"))
    if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or "\0" in rel:
        raise DatasetError(
            f"{where}: path {rel!r} leads outside the data root {root}; refused "
            "(annotation paths must be relative and stay inside the dataset folder)"
        )
    return rel


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

    def first_images(self, n: int) -> RetrievalDataset:
        """The first ``n`` gallery images and the captions written for them (quick or budgeted runs)."""
        n = min(int(n), len(self.images))
        keep = np.flatnonzero(self.caption_image < n)
        return RetrievalDataset(
            self.name,
            self.split,
            self.root,
            list(self.images[:n]),
            self.image_ids[:n],
            [self.captions[i] for i in keep],
            self.caption_ids[keep],
            self.caption_image[keep],
            {**self.info, "first_images": n},
        )

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name}/{self.split}: {len(self.images)} images, {len(self.captions)} captions)"
