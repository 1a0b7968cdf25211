"""Composed image retrieval: reference image + modification text -> target image.

- `Combiner` (CLIP4Cir), `load_combiner`, `save_combiner`
- `build_combining(name, combiner=None)`: ``combiner`` | ``sum`` | ``image`` | ``text`` functions
  mapping raw (image, text) features to L2-normalised queries
- `evaluate_composed(...)`: FashionIQ / CIRR / CSS metrics (and CIRR test-server files)
- `train_combiner(...)`, `TrainConfig`: training on cached features
- `make_css(...)`: the generated compositional benchmark
"""

from calibclip.composed.baselines import COMBININGS, build_combining, element_wise_sum, image_only, text_only
from calibclip.composed.combiner import LOGIT_SCALE, Combiner, load_combiner, save_combiner
from calibclip.composed.css import make_css
from calibclip.composed.evaluate import evaluate_composed
from calibclip.composed.train import TrainConfig, train_combiner

__all__ = [
    "COMBININGS", "LOGIT_SCALE", "Combiner", "TrainConfig", "build_combining", "element_wise_sum",
    "evaluate_composed", "image_only", "load_combiner", "make_css", "save_combiner", "text_only", "train_combiner",
]
