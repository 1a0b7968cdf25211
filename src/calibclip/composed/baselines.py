"""Combining functions: (raw image features, raw text features) -> L2-normalised queries.

``sum`` (element-wise sum, CLIP4Cir's baseline), ``image`` (reference image only), ``text``
(modification text only) and ``combiner`` (a trained `Combiner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

CombiningFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COMBININGS = ("combiner", "sum", "image", "text")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).float()


def element_wise_sum(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """normalize(image + text) on raw features."""
    return F.normalize(_as_tensor(image) + _as_tensor(text), dim=-1)


def image_only(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """normalize(image): ignores the text."""
    return F.normalize(_as_tensor(image), dim=-1)


def text_only(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """normalize(text): ignores the reference image."""
    return F.normalize(_as_tensor(text), dim=-1)


def build_combining(
    name: str, combiner: str | Path | None = None, encoder: Any = None, device: str | torch.device = "cpu",
) -> CombiningFn:
    """The combining function ``name`` (combiner | sum | image | text). ``combiner`` is the checkpoint
    the ``combiner`` function needs; ``encoder`` (Encoder or fingerprint) makes a checkpoint from
    another encoder an error."""
    if name == "sum":
        return element_wise_sum
    if name == "image":
        return image_only
    if name == "text":
        return text_only
    if name != "combiner":
        raise ValueError(f"unknown combining function {name!r}: use one of {', '.join(COMBININGS)}")
    if combiner is None:
        raise ValueError("combining 'combiner' needs a trained Combiner checkpoint (e.g. --combiner RUN_DIR/best.pt "
                         "from `calibclip train-combiner`); or use --combining sum|image|text")
    from calibclip.composed.combiner import load_combiner

    model = load_combiner(combiner, encoder=encoder, device=device)

    @torch.inference_mode()
    def combine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return model(_as_tensor(image).to(device), _as_tensor(text).to(device)).cpu()

    combine.combiner = model  # type: ignore[attr-defined]
    return combine
