"""Evaluation configs (YAML): model, preprocessing, evaluation settings and a ``calibration:``
section of `calibclip.calibration.CalibrationConfig` fields.

A config may name a ``base:`` file (relative to itself) that it overrides key by key
(nested mappings are merged). Unknown top-level sections are an error that lists the valid ones.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG: dict[str, Any] = {
    "dataset": None,
    "data_root": None,
    "model": {"name": "starter", "precision": "fp32", "device": "auto", "clip_image_size": None},
    "evaluation": {"split": None, "batch_size": 64, "workers": 0, "cache": True},
    "calibration": {},
    "training": {},  # `calibclip train` settings (calibclip.training.config)
}
SECTIONS = ("base", *DEFAULT_CONFIG)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``override`` wins; nested mappings merged key by key)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {path} includes itself through 'base:'")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown config section(s) {unknown}; valid: {list(SECTIONS)}")
    base = data.pop("base", None)
    if base:
        return merge(_read((path.parent / base), (*seen, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The defaults merged with ``path`` (and its ``base:`` chain)."""
    if path is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    return merge(DEFAULT_CONFIG, _read(Path(path), ()))
