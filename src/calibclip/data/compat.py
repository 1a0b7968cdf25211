"""The reference repository's ``calibclip.datasets`` names over calibclip's loaders, tokenizer and
transforms (re-exported from `calibclip.datasets`).

The reference yields one item per caption (``{"images", "text_tokens", "captions", "image_ids",
"caption_ids"}``) from a torch ``Dataset``; so do the classes here, built on the validated
`calibclip.data.person` loaders. Differences, on purpose: long captions keep ``<end_of_text>`` in the
last slot (the reference cuts it off, which moves CLIP's pooling token); the vocabulary is always the
bundled OpenAI one; images are decoded by `calibclip.data.images.load_image` (EXIF orientation, size
guards); every image of the split must exist (the loader lists the missing ones up front).
"""

from __future__ import annotations

import os
import random
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from calibclip.data.images import ImageInput, load_image
from calibclip.data.person import FORMATS, load_person
from calibclip.data.records import RetrievalDataset
from calibclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from calibclip.models import tokenizer as _clip

__all__ = [
    "DATASET_REGISTRY",
    "BaseRetrievalDataset",
    "CUHKPEDESDataset",
    "ICFGPEDESDataset",
    "RSTPDataset",
    "SimpleTokenizer",
    "TestTransforms",
    "TrainTransforms",
    "build_dataset",
    "reference_transforms",
    "tokenize",
]


# --- tokenizer -----------------------------------------------------------------------------------
class SimpleTokenizer:
    """OpenAI CLIP's BPE tokenizer (the reference's ``SimpleTokenizer``), over `calibclip.tokenize`.

    Args:
        bpe_path: Must be None: the vocabulary is the OpenAI one bundled with calibclip (no download).

    Raises:
        ValueError: a ``bpe_path`` was given.
    """

    def __init__(self, bpe_path: str | None = None):
        if bpe_path is not None:
            raise ValueError(
                f"SimpleTokenizer(bpe_path={bpe_path!r}): calibclip always uses the bundled OpenAI CLIP vocabulary "
                "(bpe_simple_vocab_16e6); custom vocabularies are not supported, drop bpe_path"
            )
        self.sot_token = _clip.SOT_TOKEN
        self.eot_token = _clip.EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (without start/end tokens).

        Args:
            text: The text (cleaned and lower-cased as OpenAI's tokenizer does).

        Returns:
            The token ids.
        """
        row = _clip.tokenize([text], context_length=1 << 16)[0]
        return [int(i) for i in row[1 : int((row == self.eot_token).nonzero()[0, 0])]]

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of token ids (start, end and padding tokens are dropped).

        Args:
            tokens: Token ids.

        Returns:
            The decoded text.
        """
        return _clip.decode([int(t) for t in tokens])

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, max_length: int | None = None
    ) -> torch.Tensor:
        """Token ids, zero padded.

        Args:
            texts: One text or a list of texts.
            context_length: Slots per text.
            max_length: Alias of ``context_length`` (wins when given).

        Returns:
            int64 ``[N, context_length]`` for a list, ``[context_length]`` for a single string (as the
            reference). Too-long texts keep ``<end_of_text>`` in the last slot.
        """
        length = int(max_length if max_length is not None else context_length)
        ids = _clip.tokenize(texts, context_length=length)
        return ids[0] if isinstance(texts, str) else ids


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, tokenizer: SimpleTokenizer | None = None
) -> torch.Tensor:
    """Tokenise with ``tokenizer`` (default: a `SimpleTokenizer`).

    Args:
        texts: One text or a list of texts.
        context_length: Slots per text.
        tokenizer: The tokenizer to use.

    Returns:
        As `SimpleTokenizer.__call__`.
    """
    return (tokenizer or SimpleTokenizer())(texts, context_length)


# --- transforms ----------------------------------------------------------------------------------
class TestTransforms(ImageTransform):
    """Evaluation transform of the reference: direct resize to ``image_size`` (H, W) and
    normalisation (an `ImageTransform` in ``resize`` mode, so the evaluator and caches accept it).

    Args:
        image_size: ``(height, width)``.
        mean: Per-channel mean (default CLIP's).
        std: Per-channel standard deviation (default CLIP's).
    """

    def __init__(
        self,
        image_size: tuple[int, int] | int = (384, 128),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        m, d = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(m) != 3 or len(d) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {m} and {d}")
        super().__init__(
            size=(int(size[0]), int(size[1])), mode="resize", mean=(m[0], m[1], m[2]), std=(d[0], d[1], d[2])
        )


class TrainTransforms:
    """Training transform of the reference: resize to ``image_size``, horizontal flip (p = 0.5), with
    p = 0.5 a colour jitter (brightness 0.2, contrast 0.2, saturation 0.1, hue 0.05, in random order),
    then normalisation. Pillow only.

    Args:
        image_size: ``(height, width)``.
        mean: Per-channel mean (default CLIP's).
        std: Per-channel standard deviation (default CLIP's).
        seed: Seed of the augmentation's random generator (None: fresh randomness).
    """

    def __init__(
        self,
        image_size: tuple[int, int] | int = (384, 128),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        seed: int | None = None,
    ):
        self.base = TestTransforms(image_size, mean, std)
        self.rng = random.Random(seed)

    def _jitter(self, img: Image.Image) -> Image.Image:
        ops = ["brightness", "contrast", "saturation", "hue"]
        self.rng.shuffle(ops)
        for op in ops:
            if op == "hue":
                shift = self.rng.uniform(-0.05, 0.05)
                hsv = np.asarray(img.convert("HSV"), dtype=np.int16)
                hsv[..., 0] = (hsv[..., 0] + int(round(shift * 255))) % 256
                img = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
            else:
                spread = 0.1 if op == "saturation" else 0.2
                factor = self.rng.uniform(1 - spread, 1 + spread)
                enhancer = {
                    "brightness": ImageEnhance.Brightness,
                    "contrast": ImageEnhance.Contrast,
                    "saturation": ImageEnhance.Color,
                }[op]
                img = enhancer(img).enhance(factor)
        return img

    def __call__(self, source: ImageInput) -> torch.Tensor:
        """Augmented, normalised ``[3, H, W]`` tensor of an image (PIL image, path or bytes)."""
        img = self.base.to_image(source)
        if self.rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rng.random() < 0.5:
            img = self._jitter(img)
        return self.base(img)

    def describe(self) -> dict[str, Any]:
        """Identity of the transform (random: it must not key a feature cache)."""
        return {**self.base.describe(), "train_augment": "flip0.5+jitter0.5(0.2,0.2,0.1,0.05)"}


def reference_transforms(
    is_train: bool = False,
    image_size: tuple[int, int] | int = (384, 128),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TestTransforms | TrainTransforms:
    """The reference's ``build_transforms(is_train, image_size, mean, std)``.

    Args:
        is_train: Training transform (augmented) instead of the evaluation one.
        image_size: ``(height, width)``.
        mean: Per-channel mean (default CLIP's).
        std: Per-channel standard deviation (default CLIP's).

    Returns:
        `TrainTransforms` or `TestTransforms`.
    """
    mean, std = tuple(mean or CLIP_MEAN), tuple(std or CLIP_STD)
    return TrainTransforms(image_size, mean, std) if is_train else TestTransforms(image_size, mean, std)


# --- datasets ------------------------------------------------------------------------------------
class BaseRetrievalDataset(Dataset):
    """A torch ``Dataset`` with one item per caption (the reference's base class).

    Subclasses implement `_load_data` returning ``[{"image_path", "caption", "image_id", "caption_id"?}]``;
    relative image paths are joined to ``data_root``.

    Args:
        data_root: Dataset folder.
        split: Split name.
        image_size: ``(height, width)`` of the default transform (`TestTransforms`).
        tokenizer: Called as ``tokenizer(caption, max_length=max_length)``; None keeps the caption text.
        max_length: Token slots per caption.
        transform: Image transform (default ``TestTransforms(image_size)``).
    """

    def __init__(
        self,
        data_root: str | os.PathLike,
        split: str = "test",
        image_size: tuple[int, int] = (384, 128),
        tokenizer: Callable[..., Any] | None = None,
        max_length: int = 77,
        transform: Callable[[Any], torch.Tensor] | None = None,
    ):
        self.data_root = str(data_root)
        self.split = split
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        #: the user's transform, if any (`calibclip.evaluation.Evaluator` then uses it instead of the model's)
        self.eval_transform = transform
        self.transform = transform if transform is not None else TestTransforms(self.image_size)
        self.data = self._load_data()

    @abstractmethod
    def _load_data(self) -> list[dict[str, Any]]:
        """The items: ``image_path``, ``caption``, ``image_id`` and optionally ``caption_id``."""

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = self.data[idx]
        path = Path(item["image_path"])
        image = self.transform(load_image(path if path.is_absolute() else Path(self.data_root) / path))
        caption = item["caption"]
        tokens: Any = caption
        if self.tokenizer is not None:
            tokens = self.tokenizer(caption, max_length=self.max_length)
            if isinstance(tokens, list):
                tokens = torch.tensor(tokens, dtype=torch.long)
        return {
            "images": image,
            "text_tokens": tokens,
            "captions": caption,
            "image_ids": item["image_id"],
            "caption_ids": item.get("caption_id", item["image_id"]),
        }

    @staticmethod
    def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack images (and token tensors); keep captions and ids as lists."""
        tokens = [b["text_tokens"] for b in batch]
        return {
            "images": torch.stack([b["images"] for b in batch]),
            "text_tokens": torch.stack(tokens) if isinstance(tokens[0], torch.Tensor) else tokens,
            "captions": [b["captions"] for b in batch],
            "image_ids": [b["image_ids"] for b in batch],
            "caption_ids": [b["caption_ids"] for b in batch],
        }


def _items(ds: RetrievalDataset) -> list[dict[str, Any]]:
    seen: dict[int, int] = {}
    items = []
    for caption, image in zip(ds.captions, ds.caption_image):
        image_id = int(ds.image_ids[int(image)])
        k = seen.get(int(image), 0)
        seen[int(image)] = k + 1
        items.append(
            {
                "image_path": str(ds.images[int(image)]),
                "caption": caption,
                "image_id": image_id,
                "caption_id": f"{image_id}_{k}",
            }
        )
    return items


class _PersonDataset(BaseRetrievalDataset):
    dataset_name = ""

    def __init__(
        self,
        data_root: str | os.PathLike,
        json_path: str | os.PathLike | None = None,
        split: str = "test",
        image_size: tuple[int, int] = (384, 128),
        tokenizer: Callable[..., Any] | None = None,
        max_length: int = 77,
        transform: Callable[[Any], torch.Tensor] | None = None,
    ):
        #: the validated calibclip dataset (gallery images, captions, person ids) behind the items
        self.retrieval_dataset = load_person(self.dataset_name, Path(data_root), split)
        annotation = Path(self.retrieval_dataset.info["annotation"])
        if json_path is not None and Path(json_path).resolve() != annotation.resolve():
            fmt = FORMATS[self.dataset_name]
            raise ValueError(
                f"json_path={str(json_path)!r}: calibclip reads the annotation file {fmt.annotation} beside the "
                f"images (found {annotation}); put the file there and pass json_path=None"
            )
        self.json_path = str(annotation)
        super().__init__(data_root, split, image_size, tokenizer, max_length, transform)

    def _load_data(self) -> list[dict[str, Any]]:
        return _items(self.retrieval_dataset)


class CUHKPEDESDataset(_PersonDataset):
    """CUHK-PEDES (``reid_raw.json`` + ``imgs/``), one item per caption; arguments as the reference's:
    ``(data_root, json_path=None, split="test", image_size=(384, 128), tokenizer=None, max_length=77,
    transform=None)``."""

    dataset_name = "cuhkpedes"


class ICFGPEDESDataset(_PersonDataset):
    """ICFG-PEDES (``ICFG-PEDES.json`` + ``imgs/``); arguments as `CUHKPEDESDataset`."""

    dataset_name = "icfgpedes"


class RSTPDataset(_PersonDataset):
    """RSTPReid (``data_captions.json`` + ``imgs/``); arguments as `CUHKPEDESDataset`."""

    dataset_name = "rstpreid"


class _Wrapped(BaseRetrievalDataset):
    """Reference-style items over an already loaded `RetrievalDataset` (any task)."""

    def __init__(self, dataset: RetrievalDataset, **kwargs: Any):
        self.retrieval_dataset = dataset
        super().__init__(dataset.root, dataset.split, **kwargs)

    def _load_data(self) -> list[dict[str, Any]]:
        return _items(self.retrieval_dataset)


def wrap(dataset: RetrievalDataset, **kwargs: Any) -> BaseRetrievalDataset:
    """Reference-style per-caption items of a loaded dataset (keyword arguments as `BaseRetrievalDataset`)."""
    return _Wrapped(dataset, **kwargs)


#: The reference's names and aliases.
DATASET_REGISTRY: dict[str, type[_PersonDataset]] = {
    "cuhkpedes": CUHKPEDESDataset,
    "cuhk-pedes": CUHKPEDESDataset,
    "icfgpedes": ICFGPEDESDataset,
    "icfg-pedes": ICFGPEDESDataset,
    "rstp": RSTPDataset,
    "rstpreid": RSTPDataset,
}


def build_dataset(
    dataset_name: str,
    data_root: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    split: str = "test",
    image_size: tuple[int, int] = (384, 128),
    tokenizer: Callable[..., Any] | None = None,
    max_length: int = 77,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> BaseRetrievalDataset:
    """A reference-style dataset by name.

    Args:
        dataset_name: ``cuhkpedes``, ``icfgpedes`` or ``rstp`` (and the aliases of `DATASET_REGISTRY`).
        data_root: Dataset folder (or the folder that contains it).
        json_path: The annotation file; must be the one beside the images (or None).
        split: Split name.
        image_size: ``(height, width)`` of the default transform.
        tokenizer: Applied to each caption (None keeps the text).
        max_length: Token slots per caption.
        transform: Image transform (default ``TestTransforms(image_size)``).

    Returns:
        The dataset; ``dataset.retrieval_dataset`` is the underlying `RetrievalDataset`.

    Raises:
        ValueError: unknown ``dataset_name`` or a ``json_path`` elsewhere.
        calibclip.data.records.DatasetError: missing or malformed files (the message lists what was found).
    """
    key = str(dataset_name).strip().lower()
    if key not in DATASET_REGISTRY:
        raise ValueError(f"Unknown dataset: {dataset_name!r}. Available: {list(DATASET_REGISTRY)}")
    return DATASET_REGISTRY[key](
        data_root,
        json_path=json_path,
        split=split,
        image_size=image_size,
        tokenizer=tokenizer,
        max_length=max_length,
        transform=transform,
    )
