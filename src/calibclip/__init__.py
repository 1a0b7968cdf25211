"""calibclip: CLIP-based image retrieval with training-free CalibCLIP calibration and composed retrieval."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "tokenize": "calibclip.models.tokenizer",
    "create_model": "calibclip.models.registry",
    "create_model_and_transforms": "calibclip.models.registry",
    "list_models": "calibclip.models.registry",
    "Encoder": "calibclip.models.base",
    "load_image": "calibclip.data.images",
    "Index": "calibclip.index",
    "CalibCLIP": "calibclip.calibration",
    "build_calibclip": "calibclip.calibration",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Lazy imports keep `import calibclip` and `calibclip --help` fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    from calibclip.models.compat import unsupported  # reference names without a counterpart get a pointer

    raise unsupported("calibclip", name)
