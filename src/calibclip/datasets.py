"""Dataset registry of the evaluation suite and the seed's dataset API.

``load_dataset(name, root, split)`` returns a `RetrievalDataset` for the text->image datasets
(person retrieval and captions); composed-retrieval datasets (``fashioniq``, ``cirr``, ``css``, ``pseudo-cir``)
have their own protocol in `calibclip.composed`. ``build_transforms`` and ``build_dataloader``
keep the seed's API (IRRA-style names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calibclip.data.captions import load_flickr8k, load_karpathy
from calibclip.data.person import load_person
from calibclip.data.records import RetrievalDataset
from calibclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

PERSON = ("cuhkpedes", "icfgpedes", "rstpreid")
CAPTIONS = ("flickr8k", "karpathy")
COMPOSED = ("fashioniq", "cirr", "css", "pseudo-cir")
DATASETS = PERSON + CAPTIONS + COMPOSED
ALIASES = {
    "rstp": "rstpreid", "cuhk-pedes": "cuhkpedes", "cuhk_pedes": "cuhkpedes", "icfg-pedes": "icfgpedes",
    "icfg_pedes": "icfgpedes", "flickr": "flickr8k",
}


def canonical_dataset(name: str) -> str:
    """Canonical dataset name (``rstp`` -> ``rstpreid``); ValueError listing the valid names."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)} (aliases: {sorted(ALIASES)})")
    return key


def dataset_task(name: str) -> str:
    """``person``, ``captions`` or ``composed``."""
    key = canonical_dataset(name)
    return "person" if key in PERSON else "captions" if key in CAPTIONS else "composed"


def load_dataset(name: str, root: str | Path, split: str = "test") -> RetrievalDataset:
    """Load a text->image evaluation dataset by name (person retrieval or captions).

    Flickr8k's validation split is ``dev`` (``val`` is accepted too); Karpathy JSON splits are
    train | restval | val | test.
    """
    key = canonical_dataset(name)
    if key in PERSON:
        return load_person(key, root, split)
    if key == "flickr8k":
        return load_flickr8k(root, split)
    if key == "karpathy":
        return load_karpathy(root, split)
    raise ValueError(f"{key} is a composed-retrieval dataset: evaluate it with calibclip.composed.evaluate_composed")


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
