"""Encoders: the `Encoder` interface, CLIP (ViT, ModifiedResNet), the built-in `starter`, registry and loaders."""

from __future__ import annotations

from typing import Any

#: Names of the CalibCLIP reference repository's ``calibclip.models`` (see docs/compat.md). They live in
#: `calibclip.calibration` and are resolved on first access, so importing this package never imports it.
_REFERENCE = {"CalibCLIP": "calibclip.calibration", "build_calibclip": "calibclip.calibration"}


def __getattr__(name: str) -> Any:
    """Lazy reference-compatible names; a clear error for the reference names calibclip does not have."""
    if name in _REFERENCE:
        import importlib

        return getattr(importlib.import_module(_REFERENCE[name]), name)
    from calibclip.models.compat import unsupported

    raise unsupported(__name__, name)
