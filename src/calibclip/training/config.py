"""Training settings from a config YAML in the seed's shape (``model.dcc.*``, ``model.cve.*``) plus a
``training:`` section; every key is checked (an unknown key is an error naming it).

The YAML is read by `calibclip.evaluation.config.load_config` (``base:`` chains, ``dataset``,
``data_root``, ``model``, ``evaluation``, ``calibration`` sections), so one file configures evaluation and
training alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_KEYS = {"name", "precision", "device", "clip_image_size", "dcc", "cve"}
DCC_KEYS = {"temperature", "image_curriculum_epochs", "text_curriculum_epochs", "hardness_step", "neighbours"}
#: ``model.cve`` configures the trained re-ranker of issue 12 (accepted and kept; not used by the dual encoder).
CVE_KEYS = {"enabled", "num_heads", "num_layers", "dropout", "width", "top_k", "fusion_weight"}
LOSS_KEYS = {"infonce", "sdm", "id"}
STARTER_KEYS = {
    "image_blocks",
    "text_layers",
    "head_dropout",
    "cache_dir",
    "extract_batch_size",
    "image_size",
    "image_mode",
}
#: ``training.reranker``: how the ``reranker`` target builds its training lists (docs/reranker.md).
RERANKER_KEYS = {"train_top_k", "list_size", "random_negatives", "dual_weight", "mine_noise"}
TRAINABLE = ("heads", "top", "all")
TARGETS = ("dual_encoder", "reranker")


@dataclass
class StarterOptions:
    """Starter-specific settings: trainable blocks/layers above the cached frozen part."""

    image_blocks: int = 1
    text_layers: int = 2
    head_dropout: float = 0.5
    cache_dir: str | None = None
    extract_batch_size: int = 16
    #: input geometry ``[height, width]`` / transform mode (clip | squarepad | resize) the starter is
    #: rebuilt with before training (None: the starting weights' own; docs/training.md, "starter-person")
    image_size: list[int] | None = None
    image_mode: str | None = None


@dataclass
class RerankerOptions:
    """Training lists of the ``reranker`` target (the defaults are the original recipe: each caption's
    ``model.cve.top_k`` hardest candidates, the loss on the fused score)."""

    #: candidates mined per caption (0 = ``model.cve.top_k``); may exceed the K used at ranking
    train_top_k: int = 0
    #: candidates per list at each step, the positive + a fresh random draw of the mined ones (0 = all)
    list_size: int = 0
    #: of those, how many are random images of the gallery instead of mined ones
    random_negatives: int = 0
    #: weight of the dual-encoder similarity in the training loss (1 = the fused score ranking uses;
    #: 0 = the match score alone, the fusion weight then chosen on the validation split)
    dual_weight: float = 1.0
    #: std of Gaussian noise added to the dual similarities before mining (0 = none): the dual encoder
    #: was fine-tuned on the training captions, so its training top-K is easier than a held-out one
    mine_noise: float = 0.0


@dataclass
class TrainSettings:
    """Every setting of a training run (see docs/training.md for each)."""

    dataset: str = ""
    data_root: str = ""
    model: str = "starter"
    clip_image_size: list[int] | None = None
    device: str = "auto"
    target: str = "dual_encoder"
    train_split: str = "train"
    val_split: str | None = None
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-5
    new_module_lr_mult: float = 5.0
    weight_decay: float = 4e-5
    warmup_epochs: float = 5.0
    warmup_factor: float = 0.1
    min_lr_factor: float = 0.0
    trainable: str = "all"
    top_blocks: int = 0
    losses: dict[str, float] = field(default_factory=lambda: {"infonce": 1.0, "sdm": 0.0, "id": 0.0})
    temperature: float = 0.07
    learn_temperature: bool = True
    sdm_temperature: float = 0.02
    image_curriculum_epochs: list[int] = field(default_factory=list)
    text_curriculum_epochs: list[int] = field(default_factory=list)
    hardness_step: float = 0.125
    neighbours: int = 16
    seed: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    augment_flip: bool = True
    checkpoint_every: int = 0
    max_train_images: int = 0
    eval_test: bool = False
    eval_batch_size: int = 64
    max_grad_norm: float = 0.0
    starter: StarterOptions = field(default_factory=StarterOptions)
    reranker: RerankerOptions = field(default_factory=RerankerOptions)
    cve: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainSettings:
        if self.target not in TARGETS:
            raise ValueError(f"training.target {self.target!r} is not available; valid: {list(TARGETS)}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"training.trainable must be one of {list(TRAINABLE)}, got {self.trainable!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch size >= 2, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"training.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.top_blocks < 0:
            raise ValueError(f"training.top_blocks must be >= 0, got {self.top_blocks}")
        if self.max_train_images < 0:
            raise ValueError(f"training.max_train_images must be >= 0 (0 = all), got {self.max_train_images}")
        if self.checkpoint_every < 0:
            raise ValueError(f"training.checkpoint_every must be >= 0 steps, got {self.checkpoint_every}")
        r = self.reranker
        if r.train_top_k < 0 or r.list_size < 0 or r.random_negatives < 0 or r.mine_noise < 0:
            raise ValueError(
                "training.reranker: train_top_k, list_size, random_negatives and mine_noise must be >= 0, got "
                f"{r.train_top_k}, {r.list_size}, {r.random_negatives}, {r.mine_noise}"
            )
        if r.list_size and r.random_negatives >= r.list_size:
            raise ValueError(
                f"training.reranker.random_negatives ({r.random_negatives}) must be below list_size ({r.list_size})"
            )
        unknown = sorted(set(self.losses) - LOSS_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) training.losses.{unknown[0]}; valid: {sorted(LOSS_KEYS)}")
        self.schedule()  # validates the curriculum
        return self

    def schedule(self):
        from calibclip.training.sampler import CurriculumSchedule

        return CurriculumSchedule(
            self.image_curriculum_epochs, self.text_curriculum_epochs, self.hardness_step, self.neighbours
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that determine the result (not the output/eval-only ones)."""
        d = self.to_dict()
        for key in ("eval_test", "eval_batch_size", "checkpoint_every", "device", "data_root"):
            d.pop(key, None)
        d["starter"].pop("cache_dir", None)
        if d["reranker"] == asdict(RerankerOptions()):  # default lists: the fingerprint of runs made before them
            d.pop("reranker")
        d["starter"].pop("extract_batch_size", None)
        for key in ("image_size", "image_mode"):  # unset: the fingerprint of runs made before these keys
            if d["starter"].get(key) is None:
                d["starter"].pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check(section: dict[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ValueError(
            f"unknown config key {where}.{unknown[0]}"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; valid keys of {where}: {sorted(valid)}"
        )


def settings_from_config(cfg: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainSettings:
    """`TrainSettings` from a loaded config dict (`load_config`) and CLI overrides (None = keep)."""
    model = dict(cfg.get("model") or {})
    _check(model, MODEL_KEYS, "model")
    dcc = dict(model.get("dcc") or {})
    _check(dcc, DCC_KEYS, "model.dcc")
    cve = dict(model.get("cve") or {})
    _check(cve, CVE_KEYS, "model.cve")
    training = dict(cfg.get("training") or {})
    valid = {f.name for f in fields(TrainSettings)} - {
        "dataset",
        "data_root",
        "model",
        "clip_image_size",
        "device",
        "image_curriculum_epochs",
        "text_curriculum_epochs",
        "hardness_step",
        "neighbours",
        "temperature",
        "cve",
    }
    _check(training, valid, "training")
    starter = dict(training.pop("starter", None) or {})
    _check(starter, STARTER_KEYS, "training.starter")
    reranker = dict(training.pop("reranker", None) or {})
    _check(reranker, RERANKER_KEYS, "training.reranker")
    losses = dict(training.pop("losses", None) or {})
    _check(losses, LOSS_KEYS, "training.losses")
    s = TrainSettings(**training)
    s.losses = (
        {"infonce": 0.0, "sdm": 0.0, "id": 0.0, **{k: float(v) for k, v in losses.items()}} if losses else s.losses
    )
    s.starter = StarterOptions(**starter)
    s.reranker = RerankerOptions(**reranker)
    if s.starter.image_size is not None:
        size = s.starter.image_size
        if isinstance(size, int):
            size = [size, size]
        if len(size) != 2 or any(int(v) < 32 for v in size):
            raise ValueError(f"training.starter.image_size must be [height, width] >= 32, got {s.starter.image_size}")
        s.starter.image_size = [int(v) for v in size]
    s.dataset = str(cfg.get("dataset") or "")
    s.data_root = str(cfg.get("data_root") or "")
    s.model = str(model.get("name") or "starter")
    s.clip_image_size = list(model["clip_image_size"]) if model.get("clip_image_size") else None
    s.device = str(model.get("device") or "auto")
    if "temperature" in dcc:
        s.temperature = float(dcc["temperature"])
    s.image_curriculum_epochs = [int(e) for e in dcc.get("image_curriculum_epochs") or []]
    s.text_curriculum_epochs = [int(e) for e in dcc.get("text_curriculum_epochs") or []]
    s.hardness_step = float(dcc.get("hardness_step", s.hardness_step))
    s.neighbours = int(dcc.get("neighbours", s.neighbours))
    s.cve = cve
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if not hasattr(s, key):
            raise ValueError(f"unknown training override {key!r}")
        setattr(s, key, value)
    return s.validate()


def load_train_settings(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainSettings:
    """Read a config YAML (with its ``base:`` chain) into `TrainSettings`."""
    from calibclip.evaluation.config import load_config

    return settings_from_config(load_config(path), overrides)
