"""CalibCLIP calibration (training-free): Contrastive Visual Enhancer (`cve`), Discriminative
Concept Calibrator (`dcc`), top-K re-ranking (`rerank`) and explanations (`explain`), over the
token view of any `calibclip.models.base.Encoder`; the calibration-method table and its factory
`create_calibrator` (`methods`). See docs/calibration.md.

Names are imported lazily, so reading the method table (``calibclip --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CalibCLIP": "calibclip.calibration.model",
    "build_calibclip": "calibclip.calibration.model",
    "CalibrationConfig": "calibclip.calibration.config",
    "Calibrator": "calibclip.calibration.calibrator",
    "ImageExplanation": "calibclip.calibration.explain",
    "TextExplanation": "calibclip.calibration.explain",
    "CalibrationMethod": "calibclip.calibration.methods",
    "calibration_methods": "calibclip.calibration.methods",
    "create_calibrator": "calibclip.calibration.methods",
    "register_calibration_method": "calibclip.calibration.methods",
    "fuse_scores": "calibclip.calibration.rerank",
}

__all__ = [
    "CalibCLIP",
    "CalibrationConfig",
    "CalibrationMethod",
    "Calibrator",
    "ImageExplanation",
    "TextExplanation",
    "build_calibclip",
    "calibration_methods",
    "create_calibrator",
    "fuse_scores",
    "register_calibration_method",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibclip.calibration' has no attribute {name!r}")
