"""The seed's dataset API over the dataset table (`calibclip.data.registry`).

``load_dataset(name, root, split)`` returns a `RetrievalDataset` for the text->image datasets
(person retrieval and captions); composed-retrieval datasets (``fashioniq``, ``cirr``, ``css``, ``pseudo-cir``)
have their own protocol in `calibclip.composed`. ``build_transforms`` and ``build_dataloader``
keep the seed's API (IRRA-style names) and accept the CalibCLIP reference repository's keywords; its
other public names (``SimpleTokenizer``, ``tokenize``, ``build_dataset``, the dataset classes) are
re-exported from `calibclip.data.compat`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The CalibCLIP reference repository's names (thin aliases, see calibclip.data.compat and docs/compat.md).
from calibclip.data.compat import (  # noqa: F401  (re-exported)
    DATASET_REGISTRY,
    BaseRetrievalDataset,
    CUHKPEDESDataset,
    ICFGPEDESDataset,
    RSTPDataset,
    SimpleTokenizer,
    TestTransforms,
    TrainTransforms,
    build_dataset,
    reference_transforms,
    tokenize,
    wrap,
)
from calibclip.data.records import RetrievalDataset
from calibclip.data.registry import (
    DatasetSpec,
    canonical_dataset,
    dataset_names,
    get_dataset,
    list_datasets,
    register_dataset,
    unregister_dataset,
)
from calibclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = [
    "DatasetSpec",
    "EvalLoader",
    "build_dataloader",
    "build_transforms",
    "canonical_dataset",
    "dataset_names",
    "dataset_task",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "unregister_dataset",
    # the CalibCLIP reference repository's names (calibclip.data.compat)
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
    "wrap",
]


def __getattr__(name: str) -> Any:
    """``DATASETS``: the names in the dataset table now (registrations included)."""
    if name == "DATASETS":
        return dataset_names()
    raise AttributeError(f"module 'calibclip.datasets' has no attribute {name!r}")


def dataset_task(name: str) -> str:
    """The task of a dataset: ``person``, ``captions`` or ``composed``.

    Raises:
        ValueError: unknown dataset name.
    """
    return get_dataset(name).task


def load_dataset(name: str, root: str | Path, split: str = "test") -> RetrievalDataset:
    """Load a text->image evaluation dataset by name (person retrieval or captions).

    Flickr8k's validation split is ``dev`` (``val`` is accepted too); Karpathy JSON splits are
    train | restval | val | test.

    Args:
        name: a registered dataset name or alias (`dataset_names`).
        root: the dataset folder.
        split: the split to load.

    Returns:
        The `RetrievalDataset`.

    Raises:
        ValueError: unknown name, or a composed-retrieval dataset.
    """
    spec = get_dataset(name)
    if spec.task == "composed":
        raise ValueError(
            f"{spec.name} is a composed-retrieval dataset: evaluate it with calibclip.composed.evaluate_composed"
        )
    return spec.load(root, split)


def build_transforms(
    img_size: tuple[int, int] | int | bool | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    mode: str | None = None,
    *,
    is_train: bool | None = None,
    image_size: tuple[int, int] | int | None = None,
) -> ImageTransform | TrainTransforms:
    """Image transform of the seed API (IRRA-style) and of the CalibCLIP reference repository.

    ``build_transforms(img_size=(384, 128))``: a direct resize to ``img_size`` (H, W) for non-square
    sizes (the person re-id protocol), the CLIP resize + centre crop for square ones; CLIP
    normalisation. ``build_transforms(is_train=False, image_size=(384, 128))`` (the reference's form):
    its direct-resize evaluation transform (`TestTransforms`) or, with ``is_train=True``, the augmented
    training transform (`TrainTransforms`). A bool as the first positional argument is read as
    ``is_train`` (the reference's positional order).

    Args:
        img_size: ``(height, width)`` or one side (default ``(384, 128)``).
        mean: Per-channel mean (default CLIP's).
        std: Per-channel standard deviation (default CLIP's).
        mode: Force ``clip``, ``squarepad``, ``targetpad`` or ``resize`` (seed form only).
        is_train: Reference form: training (True) or evaluation (False) transform.
        image_size: Reference form: alias of ``img_size``.

    Returns:
        An `ImageTransform` (`TestTransforms` in the reference form), or `TrainTransforms`.

    Raises:
        ValueError: both ``img_size`` and ``image_size``, ``mode`` together with the reference form,
            or an unknown ``mode``.
    """
    if isinstance(img_size, bool):  # reference positional order: (is_train, image_size, mean, std)
        if is_train is not None or image_size is not None:
            raise ValueError("build_transforms(is_train, ...): give is_train and image_size once")
        shifted: list[Any] = [mean, std, mode]
        is_train, img_size, mode = img_size, None, None
        image_size = shifted[0] if shifted[0] is not None else (384, 128)
        mean, std = shifted[1], shifted[2]
    if img_size is not None and image_size is not None:
        raise ValueError("give the size once: img_size= or image_size=")
    size = img_size if img_size is not None else image_size if image_size is not None else (384, 128)
    mean = mean if mean is not None else CLIP_MEAN
    std = std if std is not None else CLIP_STD
    if is_train is not None or image_size is not None:
        if mode is not None:
            raise ValueError("mode= belongs to the seed form build_transforms(img_size, mode=...), not to is_train=")
        return reference_transforms(bool(is_train), size, mean, std)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    chosen = mode or ("clip" if hw[0] == hw[1] else "resize")
    return ImageTransform(size=hw, mode=chosen, mean=mean, std=std)


@dataclass
class EvalLoader:
    """What `Evaluator.evaluate` consumes: a dataset plus how to load it.

    The evaluator encodes ``dataset.images`` in batches of ``batch_size`` with ``workers`` decoding
    processes (through the feature cache) and ``dataset.captions`` in length-sorted batches.
    ``transform`` (optional) replaces the model's own preprocessing; it must produce the input size
    the model was built for. Iterating over it yields the CalibCLIP reference's per-caption batches
    (``{"images", "text_tokens", "captions", "image_ids", "caption_ids"}``, images transformed with
    ``transform`` or a ``image_size`` direct resize, captions tokenised with ``tokenizer`` when given).
    """

    dataset: RetrievalDataset
    batch_size: int = 64
    workers: int = 0
    transform: ImageTransform | None = None
    image_size: tuple[int, int] = (384, 128)
    tokenizer: Callable[..., Any] | None = None
    max_length: int = 77
    shuffle: bool = False

    def __len__(self) -> int:
        return len(self.dataset.images)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        items = wrap(
            self.dataset,
            image_size=self.image_size,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
            transform=self.transform,
        )
        loader = DataLoader(
            items,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.workers,
            collate_fn=items.collate_fn,
        )
        return iter(loader)


def build_dataloader(
    dataset: str | RetrievalDataset,
    data_root: str | Path | None = None,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 0,
    transform: ImageTransform | None = None,
    *,
    json_path: str | Path | None = None,
    image_size: tuple[int, int] = (384, 128),
    num_workers: int | None = None,
    tokenizer: Callable[..., Any] | None = None,
    max_length: int = 77,
    shuffle: bool = False,
) -> EvalLoader:
    """Seed API (and the CalibCLIP reference's keywords): an `EvalLoader` for ``dataset``.

    Args:
        dataset: A dataset name (with ``data_root``) or a loaded `RetrievalDataset`.
        data_root: The dataset folder.
        split: Split name.
        batch_size: Images per encoding batch (and items per iterated batch).
        workers: Image decoding processes.
        transform: Replaces the model's preprocessing in `Evaluator` (and the default resize when iterating).
        json_path: Reference keyword: the annotation file; must be the one beside the images (or None).
        image_size: Reference keyword: ``(height, width)`` of the iterated images when no ``transform``.
        num_workers: Reference keyword: alias of ``workers``.
        tokenizer: Reference keyword: applied to each iterated caption.
        max_length: Reference keyword: token slots per caption.
        shuffle: Reference keyword: shuffle the iterated items.

    Returns:
        The `EvalLoader`.

    Raises:
        ValueError: a name without ``data_root``, an unknown name, or a ``json_path`` elsewhere.
    """
    if isinstance(dataset, str):
        if data_root is None:
            raise ValueError("build_dataloader(name, ...) needs data_root= (the dataset folder)")
        name = dataset
        dataset = load_dataset(name, data_root, split)
        if json_path is not None and Path(json_path).resolve() != Path(dataset.info.get("annotation", "")).resolve():
            raise ValueError(
                f"json_path={str(json_path)!r}: calibclip reads {name}'s annotation file beside the images (found "
                f"{dataset.info.get('annotation')}); put the file there and pass json_path=None"
            )
    return EvalLoader(
        dataset,
        batch_size=batch_size,
        workers=workers if num_workers is None else num_workers,
        transform=transform,
        image_size=(int(image_size[0]), int(image_size[1])),
        tokenizer=tokenizer,
        max_length=max_length,
        shuffle=shuffle,
    )
