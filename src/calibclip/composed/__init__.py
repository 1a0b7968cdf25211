"""Composed image retrieval: reference image + modification text -> target image.

- `Combiner` (CLIP4Cir), `load_combiner`, `save_combiner`
- `build_combining(name, combiner=None)`: ``combiner`` | ``sum`` | ``image`` | ``text`` functions
  mapping raw (image, text) features to L2-normalised queries; `default_combining(encoder)`: the
  encoder's packaged Combiner, else the normalised sum (what composed search uses)
- `composed_defaults(name)`: per-encoder sum weight, packaged Combiner and training recipe
- `make_pseudo_cir(...)`, `load_pseudo_cir(...)`: composed triplets from a captioned photo dataset
- `evaluate_composed(...)`: FashionIQ / CIRR / CSS metrics (and CIRR test-server files)
- `train_combiner(...)`, `TrainConfig`: training on cached features
- `make_css(...)`: the generated compositional benchmark
"""

from calibclip.composed.baselines import (
    COMBININGS,
    build_combining,
    default_combining,
    element_wise_sum,
    image_only,
    normalized_sum,
    packaged_combiner_for,
    text_only,
)
from calibclip.composed.combiner import LOGIT_SCALE, Combiner, load_combiner, save_combiner
from calibclip.composed.css import make_css
from calibclip.composed.defaults import composed_defaults
from calibclip.composed.evaluate import evaluate_composed
from calibclip.composed.train import TrainConfig, train_combiner

__all__ = [
    "COMBININGS",
    "LOGIT_SCALE",
    "Combiner",
    "TrainConfig",
    "build_combining",
    "composed_defaults",
    "default_combining",
    "element_wise_sum",
    "evaluate_composed",
    "image_only",
    "load_combiner",
    "make_css",
    "normalized_sum",
    "packaged_combiner_for",
    "save_combiner",
    "text_only",
    "train_combiner",
]
