"""Model table and factory (open_clip/timm style).

The table holds one `ModelEntry` per model name: the built-in ones are declared below as data
(the factory as a lazy ``"module:function"`` path, so nothing is imported until a model is
built), plugins come from the ``calibclip.models`` entry-point group, and code registers its own
with `register_model` (a call or a decorator). Architectures live in `clip_configs`, weights in
`pretrained`. `create_model` resolves a registered name or a checkpoint path (architecture
inferred from the weights) and places the model on a device in a precision, frozen and in eval
mode.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibclip.models.base import Encoder
from calibclip.utils import resolve_device, resolve_dtype

#: Entry-point group through which installed packages add models (``name = "pkg.module:factory"``).
ENTRY_POINT_GROUP = "calibclip.models"

Factory = Callable[..., Encoder]


@dataclass
class ModelEntry:
    """One registered model.

    Attributes:
        name: the registered name (``create_model(name)``, ``--model NAME``).
        factory: ``factory(**kwargs) -> Encoder``, or its lazy ``"module:function"`` path.
        description: one line for ``calibclip models``.
        pretrained: ``built-in`` (weights ship with calibclip), ``download`` or ``random``.
        kwargs: fixed keyword arguments given to the factory before the caller's.
    """

    name: str
    factory: Factory | str
    description: str
    pretrained: str  # "built-in", "download", "random"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, **kwargs: Any) -> Encoder:
        """Call the factory (imported now if lazy) with the entry's and the caller's keyword arguments."""
        return _resolve(self.factory)(**{**self.kwargs, **kwargs})


_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def _resolve(factory: Factory | str) -> Factory:
    if callable(factory):
        return factory
    module, sep, attr = str(factory).partition(":")
    if not sep:
        raise ValueError(f"model factory {factory!r}: expected a callable or 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


def register_model(
    name: str,
    factory: Factory | str | None = None,
    description: str = "",
    pretrained: str = "download",
    aliases: tuple[str, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Register an encoder factory under ``name``; a call or a decorator.

    ``register_model("toy", make_toy, pretrained="random")`` or ``@register_model("toy")`` above
    ``def make_toy(**kw) -> Encoder``. A name registered again replaces the old entry.

    Args:
        name: the model name.
        factory: ``factory(**kwargs) -> Encoder`` or a lazy ``"module:function"``; omit to decorate.
        description: one line for ``calibclip models``.
        pretrained: ``built-in``, ``download`` or ``random``.
        aliases: other accepted names.
        kwargs: fixed keyword arguments for the factory (e.g. the architecture name of a shared factory).

    Returns:
        The `ModelEntry`, or (as a decorator) the factory unchanged.
    """

    def add(fn: Factory | str) -> ModelEntry:
        entry = ModelEntry(name, fn, description, pretrained, dict(kwargs or {}))
        _REGISTRY[name] = entry
        for alias in aliases:
            _ALIASES[alias] = name
        return entry

    if factory is None:

        def decorator(fn: Factory) -> Factory:
            add(fn)
            return fn

        return decorator
    return add(factory)


def _builtin_models() -> None:
    """The built-in table: every OpenAI CLIP architecture and the offline ``starter`` / ``starter-person``."""
    from calibclip.models.clip_configs import (
        CLIP_CONFIGS,
        clip_aliases,
        clip_description,
    )
    from calibclip.models.pretrained import PRETRAINED

    for name in CLIP_CONFIGS:
        weights = PRETRAINED.get(name)
        register_model(
            name,
            "calibclip.models.clip_configs:build_clip",
            clip_description(name),
            pretrained=weights.kind if weights else "random",
            aliases=clip_aliases(name),
            kwargs={"name": name},
        )
    register_model(
        "starter",
        "calibclip.models.starter:create_starter",
        "frozen EfficientNet-Lite0+Lite2 (ImageNet) + frozen MiniLM-L6 with linear heads trained on Flickr8k; offline",
        pretrained=PRETRAINED["starter"].kind,
    )
    register_model(
        "starter-v1",
        "calibclip.models.starter:create_starter_v1",
        "the first starter (frozen towers, only the linear heads trained on Flickr8k); offline",
        pretrained=PRETRAINED["starter-v1"].kind,
    )
    register_model(
        "starter-person",
        "calibclip.models.starter:create_starter_person",
        "the starter fine-tuned for text-based person retrieval (CUHK-PEDES subset, tall 1:3 input); offline",
        pretrained=PRETRAINED["starter-person"].kind,
    )


def _entry_point_models() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            register_model(ep.name, ep.value, f"plugin model from {ep.value}", pretrained="download")


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        code = dict(_REGISTRY), dict(_ALIASES)  # registrations made before the table loaded win
        _builtin_models()
        _entry_point_models()
        _REGISTRY.update(code[0])
        _ALIASES.update(code[1])


def list_models() -> list[ModelEntry]:
    """All registered models, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def canonical_name(name: str) -> str | None:
    """The registered name of a name or alias (None: not registered)."""
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
    """Build an encoder from a registered name or a checkpoint path.

    The encoder comes back frozen, in eval mode, with ``encoder.precision`` and ``encoder.spec``
    set; ``spec`` is what rebuilds it (the registered name, or the checkpoint's absolute path), so
    an index records it and `Index.open` reloads the model from any working directory.

    Args:
        name_or_path: a registered name (``starter``, ``ViT-B/16``, ``RN50`` ...; see `list_models`)
            or a checkpoint file or Hugging Face directory (docs/models.md, "Checkpoint formats").
        device: "cpu", "cuda", "auto" or a torch device.
        precision: fp32 | bf16 | fp16 (CUDA only) for torch; fp32 | int8 for onnx.
        backend: "torch" or "onnx" (ONNX Runtime, see `calibclip.models.onnx_backend`); default
            `set_default_backend`'s, else ``$CALIBCLIP_BACKEND``, else torch.
        **kwargs: passed to the model factory / checkpoint loader (e.g. ``image_size=(384, 128)``,
            ``pretrained=False`` for a random CLIP).

    Returns:
        The `Encoder`.

    Raises:
        ValueError: neither a registered name nor an existing path (the message lists the names),
            or a checkpoint that is not a supported format.
        RuntimeError: weights that cannot be downloaded, or a precision the device lacks.
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
        model = _REGISTRY[name].build(**kwargs)
        spec = name
    elif os.path.exists(key):
        from calibclip.models.checkpoints import load_checkpoint

        model = load_checkpoint(key, **kwargs)
        spec = str(Path(key).resolve())
    else:
        names = ", ".join(e.name for e in list_models())
        raise ValueError(f"unknown model {key!r}: not a registered name ({names}) and no such file or directory")
    model = model.to(device=dev, dtype=dtype).eval()
    model.requires_grad_(False)
    model.precision = precision
    model.spec = spec
    return model


def create_model_and_transforms(
    name_or_path: str | os.PathLike = "starter",
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
    **kwargs: Any,
) -> tuple[Encoder, Callable[..., torch.Tensor]]:
    """`create_model` plus the model's image preprocessing.

    Args:
        name_or_path: a registered name or a checkpoint path (see `create_model`).
        device: "cpu", "cuda", "auto" or a torch device.
        precision: fp32 | bf16 | fp16 (CUDA only).
        **kwargs: passed to `create_model`.

    Returns:
        ``(encoder, preprocess)``: ``preprocess`` maps a PIL image or path to a ``[3, H, W]`` tensor.

    Raises:
        ValueError: see `create_model`.
        RuntimeError: see `create_model`.
    """
    model = create_model(name_or_path, device=device, precision=precision, **kwargs)
    return model, model.preprocess
