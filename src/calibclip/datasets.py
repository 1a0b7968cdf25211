"""The seed's dataset API over the dataset table (`calibclip.data.registry`).

``load_dataset(name, root, split)`` returns a `RetrievalDataset` for the text->image datasets
(person retrieval and captions); composed-retrieval datasets (``fashioniq``, ``cirr``, ``css``)
have their own protocol in `calibclip.composed`. ``build_transforms`` and ``build_dataloader``
keep the seed's API (IRRA-style names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "DatasetSpec", "EvalLoader", "build_dataloader", "build_transforms", "canonical_dataset",
    "dataset_names", "dataset_task", "get_dataset", "list_datasets", "load_dataset", "register_dataset",
    "unregister_dataset",
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
    img_size: tuple[int, int] | int = (384, 128), mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD, mode: str | None = None,
) -> ImageTransform:
    """Evaluation transform of the seed API (IRRA ``build_transforms(img_size=(384, 128))``):
    a direct resize to ``img_size`` (H, W) for non-square sizes (the person re-id protocol), the
    CLIP resize + centre crop for square ones; CLIP normalisation. ``mode`` forces one of
    ``clip | squarepad | targetpad | resize``."""
    size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    chosen = mode or ("clip" if size[0] == size[1] else "resize")
    return ImageTransform(size=size, mode=chosen, mean=mean, std=std)


@dataclass
class EvalLoader:
    """What `Evaluator.evaluate` consumes: a dataset plus how to load it.

    It is not a torch DataLoader: the evaluator encodes ``dataset.images`` in batches of
    ``batch_size`` with ``workers`` decoding processes (through the feature cache) and
    ``dataset.captions`` in length-sorted batches. ``transform`` (optional) replaces the model's
    own preprocessing; it must produce the input size the model was built for.
    """

    dataset: RetrievalDataset
    batch_size: int = 64
    workers: int = 0
    transform: ImageTransform | None = None

    def __len__(self) -> int:
        return len(self.dataset.images)


def build_dataloader(
    dataset: str | RetrievalDataset, data_root: str | Path | None = None, split: str = "test",
    batch_size: int = 64, workers: int = 0, transform: ImageTransform | None = None,
) -> EvalLoader:
    """Seed API: an `EvalLoader` for ``dataset`` (a name with ``data_root``, or a loaded dataset)."""
    if isinstance(dataset, str):
        if data_root is None:
            raise ValueError("build_dataloader(name, ...) needs data_root= (the dataset folder)")
        dataset = load_dataset(dataset, data_root, split)
    return EvalLoader(dataset, batch_size=batch_size, workers=workers, transform=transform)
