"""Per-encoder composed-retrieval defaults, kept as data in the packaged
``calibclip/configs/composed.yaml`` (like the calibration defaults): the text weight of the
normalised sum baseline, the packaged Combiner (if any) and the `train-combiner` recipe.

Lookup of an encoder name: the exact key, else the longest key that is a prefix of the name,
else ``"*"``; the matched entry overrides the ``"*"`` entry field by field (``recipe`` too), and
an entry's ``recipes: {DATASET: {...}}`` refines its recipe for one training dataset.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

#: Fields of a `train-combiner` recipe.
RECIPE_KEYS = ("lr", "proj_mult", "hidden_mult", "batch_size", "epochs", "dropout", "normalize_inputs")


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    text = resources.files("calibclip").joinpath("configs/composed.yaml").read_text()
    data = yaml.safe_load(text) or {}
    return {str(k): dict(v or {}) for k, v in data.get("encoders", {}).items()}


def encoder_name(encoder: Any) -> str | None:
    """The registered name of an `Encoder` (``None`` for None or a bare fingerprint string)."""
    if encoder is None or isinstance(encoder, str):
        return None
    return str(getattr(encoder, "name", "") or "") or None


def entry_key(name: str | None) -> str:
    """The key of ``composed.yaml`` that applies to encoder ``name``."""
    table = _table()
    if name is None:
        return "*"
    if name in table:
        return name
    prefixes = sorted((k for k in table if k != "*" and name.startswith(k)), key=len, reverse=True)
    return prefixes[0] if prefixes else "*"


def composed_defaults(name: str | None, dataset: str | None = None) -> dict[str, Any]:
    """``{"key", "sum_text_weight", "combiner", "recipe"}`` for encoder ``name`` (None: the ``"*"`` entry);
    ``dataset`` selects the entry's per-dataset recipe refinement, if it has one (``key`` then reads
    ``ENTRY/DATASET``)."""
    table = _table()
    base, key = table.get("*", {}), entry_key(name)
    own = table.get(key, {}) if key != "*" else base
    refined = dict((own.get("recipes") or {}).get(dataset) or {}) if dataset else {}
    recipe = {**dict(base.get("recipe") or {}), **dict(own.get("recipe") or {}), **refined}
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise ValueError(f"calibclip/configs/composed.yaml: the recipe for {key!r} lacks {missing}")
    key = f"{key}/{dataset}" if refined else key
    return {
        "key": key,
        "sum_text_weight": float(own.get("sum_text_weight", base.get("sum_text_weight", 1.0))),
        "combiner": own.get("combiner", base.get("combiner")),
        "recipe": recipe,
    }


def weights_dir() -> Path:
    """The package's ``calibclip/weights`` folder (packaged model files)."""
    return Path(str(resources.files("calibclip") / "weights"))


def packaged_combiner(encoder: Any) -> Path | None:
    """The Combiner file shipped inside the package for ``encoder`` (an `Encoder` or a name), or None."""
    name = encoder if isinstance(encoder, str) else encoder_name(encoder)
    file = composed_defaults(name)["combiner"] if name else None
    if not file:
        return None
    path = weights_dir() / str(file)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibclip/configs/composed.yaml names the packaged Combiner {file}, but {path} "
            "is missing; reinstall calibclip"
        )
    return path
