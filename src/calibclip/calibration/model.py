"""`CalibCLIP`: an encoder wrapped with a `Calibrator`, whose ``encode_image``/``encode_text``
return calibrated embeddings (OpenAI-CLIP-style API), and `build_calibclip`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibclip.calibration.config import CalibrationConfig
from calibclip.calibration.methods import create_calibrator
from calibclip.models.base import Encoder, TextBatch


class CalibCLIP(nn.Module):
    """A frozen encoder plus CalibCLIP calibration (no parameters of its own).

    ``encode_image`` / ``encode_text`` give calibrated embeddings, ``encode_image_raw`` /
    ``encode_text_raw`` the encoder's own; ``forward(pixels, text)`` returns the re-ranked
    text->image scores ``[Q, G]``.
    """

    def __init__(self, model: Encoder, config: CalibrationConfig | None = None, method: str | None = None):
        """Wrap ``model``.

        Args:
            model: the encoder to calibrate.
            config: calibration settings (default: the encoder's packaged defaults).
            method: a registered calibration method (default ``calibclip``).

        Raises:
            ValueError: unknown method.
        """
        super().__init__()
        self.model = model
        self.calibrator = create_calibrator(model, method, config=config)

    @property
    def config(self) -> CalibrationConfig:
        return self.calibrator.config

    @property
    def preprocess(self) -> Any:
        return self.model.preprocess

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def tokenize(self, texts: str | Sequence[str]) -> TextBatch:
        return self.model.tokenize([texts] if isinstance(texts, str) else list(texts))

    def _text_batch(self, text: TextBatch | torch.Tensor | str | Sequence[str]) -> TextBatch:
        if isinstance(text, TextBatch):
            return text
        if isinstance(text, torch.Tensor):  # OpenAI-style ids from calibclip.tokenize (0-padded)
            return self.model.batch_from_ids(text)
        return self.tokenize(text)

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.calibrator.image_features(pixels)

    def text_features(self, text: TextBatch | torch.Tensor | str | Sequence[str]) -> dict[str, torch.Tensor]:
        return self.calibrator.text_features(self._text_batch(text))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Calibrated (CVE) image embeddings ``[B, D]``."""
        return self.image_features(pixels)["calibrated"]

    def encode_text(self, text: TextBatch | torch.Tensor | str | Sequence[str]) -> torch.Tensor:
        """Calibrated (DCC) text embeddings ``[B, D]``."""
        return self.text_features(text)["calibrated"]

    @torch.inference_mode()
    def encode_image_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.model.device, self.model.dtype))

    @torch.inference_mode()
    def encode_text_raw(self, text: TextBatch | torch.Tensor | str | Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self._text_batch(text).to(self.model.device))

    def forward(self, pixels: torch.Tensor, text: TextBatch | torch.Tensor | str | Sequence[str]) -> torch.Tensor:
        """Re-ranked text->image scores ``[Q, G]`` (see `Calibrator.fuse`)."""
        return self.calibrator.scores(self.text_features(text), self.image_features(pixels))


def _architecture(model: Encoder) -> dict[str, Any]:
    """embed_dim / vision_layers / text_layers as the checkpoint defines them (None = unknown)."""
    cfg = model.config()

    def first(*keys: str) -> Any:
        for key in keys:
            node: Any = cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
        return None

    return {
        "embed_dim": int(model.embed_dim),
        "vision_layers": first("vision_layers", "vision.layers"),
        "text_layers": first("text_layers", "transformer_layers", "text.layers"),
    }


def _reference_keywords(
    pretrained: str | os.PathLike, settings: dict[str, Any]
) -> tuple[str | os.PathLike, dict[str, Any], int | None]:
    """Pop the CalibCLIP reference repository's keywords of `build_calibclip` from ``settings``.

    ``model_name`` / ``name`` are ``pretrained``; ``image_size`` (model input, e.g. ``(384, 128)``) goes
    to `create_model`; ``stride_size`` must equal the patch size (checked by the caller);
    ``cve_config`` / ``dcc_config`` must be empty (they configure the reference's trainable layers).

    Args:
        pretrained: The ``pretrained`` argument as given.
        settings: The remaining keyword arguments (modified in place).

    Returns:
        ``(pretrained, create_model keyword arguments, stride_size or None)``.

    Raises:
        ValueError: the model given twice, or a non-empty ``cve_config`` / ``dcc_config``.
    """
    names = [settings.pop(k) for k in ("model_name", "name") if k in settings]
    if len(names) > 1 or (names and str(pretrained) != "starter"):
        raise ValueError("give the model once: pretrained=, model_name= or name=")
    model_kwargs = {"image_size": tuple(settings.pop("image_size"))} if "image_size" in settings else {}
    for key in ("cve_config", "dcc_config"):
        if settings.pop(key, None):
            raise ValueError(
                f"{key} configures the reference implementation's trainable layers, which calibclip does not have "
                "(its calibration is training-free); pass CalibrationConfig fields instead, e.g. top_k=, lam=, "
                "decay_factor= (see docs/calibration.md)"
            )
    stride = settings.pop("stride_size", None)
    return (names[0] if names else pretrained), model_kwargs, (int(stride) if stride is not None else None)


def build_calibclip(
    pretrained: str | os.PathLike = "starter",
    embed_dim: int | None = 512,
    vision_layers: int | Sequence[int] | None = 12,
    text_layers: int | None = 12,
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
    config: CalibrationConfig | str | os.PathLike | None = None,
    method: str | None = None,
    **settings: Any,
) -> CalibCLIP:
    """Load ``pretrained`` with `calibclip.create_model` and wrap it in `CalibCLIP`.

    Example: ``build_calibclip(path, top_k=20, lam=0.6)``.

    Args:
        pretrained: checkpoint path or registered model name.
        embed_dim: expected embedding size (None: not checked).
        vision_layers: expected vision depth (ResNet: the four stage depths; None: not checked).
        text_layers: expected text depth (None: not checked).
        device: "cpu", "cuda", "auto" or a torch device.
        precision: fp32 | bf16 | fp16 (CUDA).
        config: a `CalibrationConfig` or a YAML path (default: the encoder's packaged defaults).
        method: a registered calibration method (default ``calibclip``).
        **settings: single `CalibrationConfig` fields over ``config``.

    Returns:
        The `CalibCLIP` wrapper.

    Raises:
        ValueError: the checkpoint's architecture differs from the expected values (both named),
            an unknown setting or method.
        FileNotFoundError: no such checkpoint or config file.
    """
    from calibclip.models.registry import create_model

    pretrained, model_kwargs, stride = _reference_keywords(pretrained, settings)
    model = create_model(pretrained, device=device, precision=precision, **model_kwargs)
    patch = model.config().get("vision_patch_size")
    if stride is not None and stride != patch:
        raise ValueError(
            f"build_calibclip(stride_size={stride}): overlapping patch strides are not implemented; "
            f"use stride_size={patch} (the patch size of {model.name}) or leave it out"
        )
    found = _architecture(model)
    expected = {"embed_dim": embed_dim, "vision_layers": vision_layers, "text_layers": text_layers}
    wrong = []
    for key, want in expected.items():
        have = found[key]
        if want is None:
            continue
        if have is None:
            wrong.append(f"{key}: the model's config() does not report it (pass {key}=None to skip the check)")
        elif np.asarray(have).tolist() != np.asarray(want).tolist():
            wrong.append(f"{key}={want!r} given but the checkpoint has {key}={have!r}")
    if wrong:
        raise ValueError(
            f"build_calibclip({str(pretrained)!r}): architecture mismatch: "
            + "; ".join(wrong)
            + ". Pass the checkpoint's values (or None to skip a check)."
        )
    if config is None:
        cfg = CalibrationConfig.default_for(model.name)
    elif isinstance(config, CalibrationConfig):
        cfg = config
    else:
        cfg = CalibrationConfig.from_yaml(Path(config))
    if settings:
        cfg = cfg.replace(**settings)
    return CalibCLIP(model, cfg, method=method)
