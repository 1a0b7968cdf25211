"""`CalibrationConfig`: every hyperparameter of CalibCLIP (CVE, DCC, re-ranking) in one
dataclass with documented defaults, YAML loading and per-encoder defaults.

Units. Visual attention is measured in *uniform shares*: ``N * a_i`` where ``a_i`` is the
token's weight in the pooled embedding and ``N`` the number of tokens (1.0 = the share every
token would get under uniform pooling). Word attention is measured the same way over the
query's words (non-special, non-padding tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass
class CalibrationConfig:
    """Hyperparameters of CalibCLIP. See docs/calibration.md for the exact formulas.

    Re-ranking
      top_k:            K, the candidates (by raw similarity) that get the fused score.
      lam:              lambda in ``lam * sim_raw + (1 - lam) * sim_cal``; 1 = plain search.

    Contrastive Visual Enhancer (CVE)
      visual:           apply the CVE (False: calibrated image embedding = raw).
      dominant_ratio:   a visual token is dominant when its attention share ``N a_i`` >= this.
      max_dominant_frac: at most ``ceil(frac * N)`` tokens (the highest-attention ones) are dominant.
      neighbourhood:    odd window size k of the local mean (k x k, the token itself excluded).
      target_ratio:     a token lies in the *target* region when the mean share of its neighbours
                        is >= this; otherwise in the *low-information* region.
      spike_contrast:   a dominant target-region token whose share exceeds its neighbours' mean by
                        >= this (``N a_i - m_i``) is a spike and gets *decay*; else *retain*.
                        Dominant tokens in the low-information region get *suppress*.
      suppress_factor, decay_factor, retain_factor: multipliers of those tokens' pooling weights
                        (0 <= suppress <= decay <= retain); weights are renormalised to sum to 1.
      visual_strength:  gamma_v in ``v_cal = pooled + gamma_v * (sum_i w'_i t_i - sum_i a_i t_i)``.

    Discriminative Concept Calibrator (DCC)
      textual:          apply the DCC (False: calibrated text embedding = raw).
      word_ratio:       a word is dominant when its share of the words' attention times the number
                        of words is >= this.
      max_masked_words: mask (drop) at most this many dominant words per query (top-m by attention).
      max_mask_frac:    and at most ``floor(frac * n_words)`` of them.
      min_words:        queries with fewer words are never masked.
      text_mix:         gamma_t in ``t_cal = |t| * (n(t) + gamma_t * (n(t_masked) - n(t)))``
                        (0 = raw, 1 = masked query, > 1 pushes further away from the generic words).
    """

    top_k: int = 10
    lam: float = 0.5

    visual: bool = True
    dominant_ratio: float = 2.0
    max_dominant_frac: float = 0.1
    neighbourhood: int = 3
    target_ratio: float = 1.0
    spike_contrast: float = 1.0
    suppress_factor: float = 0.0
    decay_factor: float = 0.5
    retain_factor: float = 1.0
    visual_strength: float = 1.0

    textual: bool = True
    word_ratio: float = 1.5
    max_masked_words: int = 1
    max_mask_frac: float = 0.34
    min_words: int = 3
    text_mix: float = 0.5

    #: Fields that change neither image nor text features (only the fused ranking).
    RANKING_FIELDS = ("top_k", "lam")
    VISUAL_FIELDS = (
        "visual",
        "dominant_ratio",
        "max_dominant_frac",
        "neighbourhood",
        "target_ratio",
        "spike_contrast",
        "suppress_factor",
        "decay_factor",
        "retain_factor",
        "visual_strength",
    )
    TEXT_FIELDS = ("textual", "word_ratio", "max_masked_words", "max_mask_frac", "min_words", "text_mix")

    def __post_init__(self) -> None:
        self.validate()

    # --- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming every out-of-range field."""
        problems = []
        if int(self.top_k) < 0:
            problems.append(f"top_k must be >= 0 (0 disables re-ranking), got {self.top_k}")
        if not 0.0 <= float(self.lam) <= 1.0:
            problems.append(f"lam must be in [0, 1], got {self.lam}")
        if not 0.0 <= float(self.max_dominant_frac) <= 1.0:
            problems.append(f"max_dominant_frac must be in [0, 1], got {self.max_dominant_frac}")
        if int(self.neighbourhood) < 3 or int(self.neighbourhood) % 2 == 0:
            problems.append(f"neighbourhood must be an odd window size >= 3, got {self.neighbourhood}")
        if not 0.0 <= float(self.suppress_factor) <= float(self.decay_factor) <= float(self.retain_factor):
            problems.append(
                "treatment factors must satisfy 0 <= suppress_factor <= decay_factor <= retain_factor, got "
                f"{self.suppress_factor}, {self.decay_factor}, {self.retain_factor}"
            )
        if float(self.visual_strength) < 0:
            problems.append(f"visual_strength must be >= 0, got {self.visual_strength}")
        if int(self.max_masked_words) < 0 or int(self.min_words) < 0:
            problems.append("max_masked_words and min_words must be >= 0")
        if not 0.0 <= float(self.max_mask_frac) <= 1.0:
            problems.append(f"max_mask_frac must be in [0, 1], got {self.max_mask_frac}")
        if float(self.text_mix) < 0:
            problems.append(f"text_mix must be >= 0, got {self.text_mix}")
        if problems:
            raise ValueError("invalid CalibrationConfig: " + "; ".join(problems))

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, base: CalibrationConfig | None = None) -> CalibrationConfig:
        """Build from a mapping (missing keys from ``base`` or the defaults). Unknown keys are an
        error that lists the valid ones. Values are coerced to the fields' types."""
        data = dict(data or {})
        valid = cls.field_names()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown calibration setting(s) {unknown}; valid settings: {valid}")
        merged = (base or cls()).to_dict()
        types = {f.name: f.type for f in fields(cls)}
        for key, value in data.items():
            kind = types[key]
            if kind in ("bool", bool):
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                merged[key] = bool(value)
            elif kind in ("int", int):
                merged[key] = int(value)
            else:
                merged[key] = float(value)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, base: CalibrationConfig | None = None) -> CalibrationConfig:
        """Read a YAML file: either a ``calibration:`` section of a dataset config or a flat mapping."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"calibration config {path} does not exist")
        from calibclip.utils import read_yaml

        data = read_yaml(path, "calibration config") or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of calibration settings, got {type(data).__name__}")
        if "calibration" in data:
            data = data["calibration"] or {}
        return cls.from_dict(data, base=base)

    def replace(self, **changes: Any) -> CalibrationConfig:
        """A copy with some fields changed (validated)."""
        return self.from_dict(changes, base=self)

    @classmethod
    def default_for(cls, encoder_name: str) -> CalibrationConfig:
        """Defaults for an encoder: the dataclass defaults overridden by the entry of the packaged
        ``calibclip/configs/calibration.yaml`` whose key matches ``encoder_name`` (exact name first,
        then the longest matching prefix, e.g. ``ViT-`` or ``RN``)."""
        table = _packaged_defaults()
        name = str(encoder_name)
        if name in table:
            return cls.from_dict(table[name])
        prefixes = sorted((k for k in table if name.startswith(k)), key=len, reverse=True)
        return cls.from_dict(table[prefixes[0]]) if prefixes else cls()

    # --- identity --------------------------------------------------------------------------
    def digest(self, names: tuple[str, ...] | None = None) -> str:
        """Stable hash of the given fields (default: all)."""
        d = self.to_dict()
        if names is not None:
            d = {k: d[k] for k in names}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the ``--set`` options) as a mapping of setting overrides.

    Args:
        items: ``KEY=VALUE`` strings.

    Returns:
        ``{KEY: VALUE}`` (values as strings; `CalibrationConfig.from_dict` coerces them).

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _packaged_defaults() -> dict[str, dict[str, Any]]:
    import yaml

    text = resources.files("calibclip").joinpath("configs/calibration.yaml").read_text()
    data = yaml.safe_load(text) or {}
    return {str(k): dict(v or {}) for k, v in data.get("encoders", {}).items()}
