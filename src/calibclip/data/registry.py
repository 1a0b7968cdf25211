"""The dataset table: one `DatasetSpec` per evaluation dataset (name, aliases, task, loader,
splits, config file). Everything that lists datasets (``calibclip evaluate --dataset``,
``batch-evaluate``, the evaluation runner, composed retrieval) reads this table.

Adding a dataset = a loader module under `calibclip.data` (``loader(root, split)`` returning a
`RetrievalDataset`, or for composed retrieval a list of `ComposedDataset`), one
`register_dataset` entry below (or a call from your own code) and one ``configs/<name>.yaml``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Task families: text->image person retrieval, caption retrieval (t2i + i2t), composed retrieval.
TASKS = ("person", "captions", "composed")

Loader = Callable[[Any, str], Any]


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation dataset.

    Attributes:
        name: canonical name (``calibclip evaluate --dataset NAME``).
        task: ``person``, ``captions`` or ``composed`` (picks the protocol and the metrics).
        loader: ``loader(root, split)``, or its lazy ``"module:function"`` path. Person and captions
            loaders return a `RetrievalDataset`; composed loaders a list of `ComposedDataset`.
        default_split: split evaluated when none is given.
        splits: the valid splits (documentation and ``--help``; the loader checks them).
        aliases: other accepted names (``rstp`` for ``rstpreid``).
        description: one line for listings.
        config: evaluation config file in the repository's ``configs/`` folder (None: none shipped).
        headline: the metric model selection uses (composed retrieval; None: ``R@1``).
    """

    name: str
    task: str
    loader: Loader | str
    default_split: str = "test"
    splits: tuple[str, ...] = ("test",)
    aliases: tuple[str, ...] = ()
    description: str = ""
    config: str | None = None
    headline: str | None = None

    def load(self, root: str | Path, split: str | None = None) -> Any:
        """Call the loader on ``root`` and ``split`` (default: `default_split`).

        Args:
            root: the dataset folder.
            split: the split to load; None for `default_split`.

        Returns:
            What the loader returns (`RetrievalDataset`, or a list of `ComposedDataset`).
        """
        return resolve_loader(self.loader)(root, split or self.default_split)


_DATASETS: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}


def resolve_loader(loader: Loader | str) -> Loader:
    """A loader callable from a callable or a ``"module:function"`` path.

    Raises:
        ValueError: the path is not ``module:function`` or names nothing.
        TypeError: it names something that is not callable.
    """
    if callable(loader):
        return loader
    module, sep, attr = str(loader).partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"dataset loader {loader!r}: expected a callable or 'package.module:function'")
    fn = getattr(importlib.import_module(module), attr, None)
    if fn is None:
        raise ValueError(f"dataset loader {loader!r}: {module} has no function {attr!r}")
    if not callable(fn):
        raise TypeError(f"dataset loader {loader!r}: {module}.{attr} is not callable")
    return fn


def register_dataset(
    name: str,
    loader: Loader | str | None = None,
    *,
    task: str,
    default_split: str = "test",
    splits: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    description: str = "",
    config: str | None = None,
    headline: str | None = None,
    replace: bool = False,
) -> Any:
    """Register a dataset; usable as a call or as a decorator of the loader.

    ``register_dataset("toy", load_toy, task="captions")`` or ``@register_dataset("toy",
    task="captions")`` above ``def load_toy(root, split): ...``.

    Args:
        name: canonical name (lower case).
        loader: ``loader(root, split)`` or a lazy ``"module:function"``; omit to decorate.
        task: ``person``, ``captions`` or ``composed``.
        default_split: split used when none is given.
        splits: valid splits (default: ``(default_split,)``).
        aliases: other accepted names.
        description: one line for listings.
        config: config file name in ``configs/``.
        headline: model-selection metric (composed retrieval).
        replace: allow replacing an existing registration.

    Returns:
        The `DatasetSpec` (called with a loader) or a decorator returning the loader unchanged.

    Raises:
        ValueError: unknown task, or the name/an alias is taken (and not ``replace``).
    """
    key = name.strip().lower()
    if task not in TASKS:
        raise ValueError(f"dataset {name!r}: task must be one of {list(TASKS)}, got {task!r}")

    def add(fn: Loader | str) -> DatasetSpec:
        taken = [n for n in (key, *aliases) if (n in _DATASETS or n in _ALIASES) and not replace]
        if taken:
            raise ValueError(f"dataset name(s) {taken} already registered; pass replace=True to override")
        spec = DatasetSpec(
            key,
            task,
            fn,
            default_split,
            tuple(splits or (default_split,)),
            tuple(aliases),
            description,
            config,
            headline,
        )
        _DATASETS[key] = spec
        for alias in aliases:
            _ALIASES[alias.lower()] = key
        return spec

    if loader is None:

        def decorator(fn: Loader) -> Loader:
            add(fn)
            return fn

        return decorator
    return add(loader)


def unregister_dataset(name: str) -> None:
    """Remove a registered dataset and its aliases (tests, plugins).

    Raises:
        ValueError: no such dataset.
    """
    spec = get_dataset(name)
    del _DATASETS[spec.name]
    for alias in spec.aliases:
        _ALIASES.pop(alias.lower(), None)


def canonical_dataset(name: str) -> str:
    """The canonical name of a dataset name or alias (``rstp`` -> ``rstpreid``).

    Raises:
        ValueError: unknown name (the message lists the valid names and aliases).
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(_DATASETS)} (aliases: {sorted(_ALIASES)})")
    return key


def get_dataset(name: str) -> DatasetSpec:
    """The `DatasetSpec` of a name or alias.

    Raises:
        ValueError: unknown name (the message lists the valid names and aliases).
    """
    return _DATASETS[canonical_dataset(name)]


def list_datasets(task: str | None = None) -> list[DatasetSpec]:
    """Registered datasets in registration order, optionally of one task."""
    return [s for s in _DATASETS.values() if task is None or s.task == task]


def dataset_names(task: str | None = None, aliases: bool = False) -> tuple[str, ...]:
    """Canonical names (and with ``aliases`` every accepted name), optionally of one task."""
    names = [s.name for s in list_datasets(task)]
    if aliases:
        names += [a for a, n in _ALIASES.items() if n in names]
    return tuple(names)


# --- the built-in datasets ---------------------------------------------------------------------
register_dataset(
    "cuhkpedes",
    "calibclip.data.person:load_cuhkpedes",
    task="person",
    splits=("train", "val", "test"),
    aliases=("cuhk-pedes", "cuhk_pedes"),
    description="CUHK-PEDES text-based person retrieval",
    config="cuhkpedes.yaml",
)
register_dataset(
    "icfgpedes",
    "calibclip.data.person:load_icfgpedes",
    task="person",
    splits=("train", "test"),
    aliases=("icfg-pedes", "icfg_pedes"),
    description="ICFG-PEDES text-based person retrieval",
    config="icfgpedes.yaml",
)
register_dataset(
    "rstpreid",
    "calibclip.data.person:load_rstpreid",
    task="person",
    splits=("train", "val", "test"),
    aliases=("rstp",),
    description="RSTPReid text-based person retrieval",
    config="rstp.yaml",
)
register_dataset(
    "flickr8k",
    "calibclip.data.captions:load_flickr8k",
    task="captions",
    splits=("train", "dev", "val", "test"),
    aliases=("flickr",),
    description="Flickr8k caption retrieval (official layout)",
    config="flickr8k.yaml",
)
register_dataset(
    "karpathy",
    "calibclip.data.captions:load_karpathy",
    task="captions",
    splits=("train", "restval", "val", "test"),
    description="Karpathy-split JSON caption retrieval",
    config="karpathy.yaml",
)
register_dataset(
    "fashioniq",
    "calibclip.data.composed:load_fashioniq_categories",
    task="composed",
    default_split="val",
    splits=("train", "val"),
    description="FashionIQ composed retrieval (dress, shirt, toptee)",
    config="fashioniq.yaml",
    headline="avg",
)
register_dataset(
    "cirr",
    "calibclip.data.composed:load_cirr_split",
    task="composed",
    default_split="val",
    splits=("train", "val", "test1"),
    description="CIRR composed retrieval (test1: submission files)",
    config="cirr.yaml",
    headline="avg",
)
register_dataset(
    "css",
    "calibclip.data.composed:load_css_split",
    task="composed",
    splits=("train", "val", "test"),
    description="CSS, the generated composed benchmark (calibclip make-css)",
    config="css.yaml",
    headline="R@1",
)
register_dataset(
    "pseudo-cir",
    "calibclip.data.composed:load_pseudo_cir_split",
    task="composed",
    default_split="dev",
    splits=("train", "dev", "val"),
    description="pseudo-CIR triplets from real captioned photos (calibclip make-pseudo-cir)",
    config="pseudo-cir.yaml",
    headline="R@1",
)
