"""Model registry and factory (open_clip/timm style).

Encoders register a factory under a name; `create_model` resolves a registered name or a
checkpoint path (architecture inferred from the weights) and places the model on a device
in a precision, frozen and in eval mode.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from calibclip.models.base import Encoder
from calibclip.utils import resolve_device, resolve_dtype

#: Modules whose import registers models (kept as data so adding an encoder is one line).
_PROVIDERS = ("calibclip.models.clip_configs", "calibclip.models.starter")


@dataclass
class ModelEntry:
    name: str
    factory: Callable[..., Encoder]
    description: str
    pretrained: str  # "built-in", "download", "random"


_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register_model(
    name: str, factory: Callable[..., Encoder], description: str = "", pretrained: str = "download",
    aliases: tuple[str, ...] = (),
) -> None:
    """Register ``factory(**kwargs) -> Encoder`` under ``name`` (and ``aliases``)."""
    _REGISTRY[name] = ModelEntry(name, factory, description, pretrained)
    for alias in aliases:
        _ALIASES[alias] = name


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _PROVIDERS:
            importlib.import_module(module)


def list_models() -> list[ModelEntry]:
    """All registered models, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def canonical_name(name: str) -> str | None:
    _ensure_loaded()
    if name in _REGISTRY:
        return name
    return _ALIASES.get(name)


#: Backends of `create_model`.
BACKENDS = ("torch", "onnx")
#: Process-wide default of ``create_model(backend=None)`` (set by the CLI's ``--backend``/``--precision``).
_DEFAULT_BACKEND: dict[str, str | None] = {"backend": None, "precision": None}


def set_default_backend(backend: str | None, precision: str | None = None) -> None:
    """Make ``create_model(backend=None)`` use ``backend`` (None: ``$CALIBCLIP_BACKEND`` or torch);
    ``precision`` (e.g. int8), when given, overrides the precision asked for onnx models."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _DEFAULT_BACKEND.update(backend=backend, precision=precision)


def create_model(
    name_or_path: str | os.PathLike = "starter",
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
    backend: str | None = None,
    **kwargs: Any,
) -> Encoder:
    """Build an encoder from a registered name (``starter``, ``ViT-B/16``, ``RN50`` ...) or a
    checkpoint path (file or Hugging Face directory; see README "Checkpoint formats").

    ``device``: "cpu", "cuda", "auto" or a torch device. ``precision``: fp32 | bf16 | fp16 (CUDA)
    for torch; fp32 | int8 for onnx. ``backend``: "torch" or "onnx" (ONNX Runtime, see
    `calibclip.models.onnx_backend`; default `set_default_backend`'s, else ``$CALIBCLIP_BACKEND``, else torch).
    Extra keyword arguments go to the model factory / loader (e.g. ``image_size=(384, 128)``).
    """
    backend = backend or _DEFAULT_BACKEND["backend"] or os.environ.get("CALIBCLIP_BACKEND") or "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onnx":
        from calibclip.models.onnx_backend import wrap

        onnx_precision = _DEFAULT_BACKEND["precision"] or os.environ.get("CALIBCLIP_ONNX_PRECISION") or precision
        model = create_model(name_or_path, device="cpu", precision="fp32", backend="torch", **kwargs)
        return wrap(model, precision=onnx_precision, device=resolve_device(device))
    if precision == "int8":
        raise ValueError("precision 'int8' needs backend='onnx' (--backend onnx); torch supports fp32, bf16, fp16")
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    key = str(name_or_path)
    name = canonical_name(key)
    if name is not None:
        model = _REGISTRY[name].factory(**kwargs)
    elif os.path.exists(key):
        from calibclip.models.checkpoints import load_checkpoint

        model = load_checkpoint(key, **kwargs)
    else:
        names = ", ".join(e.name for e in list_models())
        raise ValueError(f"unknown model {key!r}: not a registered name ({names}) and no such file or directory")
    model = model.to(device=dev, dtype=dtype).eval()
    model.requires_grad_(False)
    model.precision = precision
    return model


def create_model_and_transforms(
    name_or_path: str | os.PathLike = "starter", device: str | torch.device | None = "cpu",
    precision: str = "fp32", **kwargs: Any,
) -> tuple[Encoder, Callable[..., torch.Tensor]]:
    """`create_model` plus the model's image preprocessing (a callable PIL/path -> tensor)."""
    model = create_model(name_or_path, device=device, precision=precision, **kwargs)
    return model, model.preprocess
