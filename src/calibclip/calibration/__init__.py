"""CalibCLIP calibration (training-free): Contrastive Visual Enhancer (`cve`), Discriminative
Concept Calibrator (`dcc`), top-K re-ranking (`rerank`) and explanations (`explain`), over the
token view of any `calibclip.models.base.Encoder`. See README "CalibCLIP calibration"."""

from calibclip.calibration.calibrator import Calibrator
from calibclip.calibration.config import CalibrationConfig
from calibclip.calibration.explain import ImageExplanation, TextExplanation
from calibclip.calibration.model import CalibCLIP, build_calibclip
from calibclip.calibration.rerank import fuse_scores

__all__ = [
    "CalibCLIP", "CalibrationConfig", "Calibrator", "ImageExplanation", "TextExplanation", "build_calibclip",
    "fuse_scores",
]
