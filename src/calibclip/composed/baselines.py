"""Combining functions: (raw image features, raw text features) -> L2-normalised queries.

``sum`` (CLIP4Cir's baseline: the sum of the L2-normalised features, the text weighted by the
encoder's measured ``sum_text_weight``), ``image`` (reference image only), ``text``
(modification text only) and ``combiner`` (a trained `Combiner`: the given checkpoint, else the
Combiner packaged for the encoder). `default_combining` is what composed search uses when
nothing is chosen: the packaged Combiner when the encoder has one, else the normalised sum.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibclip.composed.defaults import composed_defaults, encoder_name, packaged_combiner

CombiningFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COMBININGS = ("combiner", "sum", "image", "text")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).float()


def normalized_sum(image: torch.Tensor, text: torch.Tensor, text_weight: float = 1.0) -> torch.Tensor:
    """normalize(normalize(image) + text_weight * normalize(text)) on raw features.

    Raw feature norms differ between the towers (starter: image ~22-30, text ~12-13), so summing raw
    features lets the image dominate; normalising first gives both the weight the caller chooses."""
    return F.normalize(
        F.normalize(_as_tensor(image), dim=-1) + text_weight * F.normalize(_as_tensor(text), dim=-1), dim=-1
    )


def element_wise_sum(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The unweighted normalised sum normalize(normalize(image) + normalize(text))."""
    return normalized_sum(image, text, 1.0)


def image_only(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """normalize(image): ignores the text."""
    return F.normalize(_as_tensor(image), dim=-1)


def text_only(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """normalize(text): ignores the reference image."""
    return F.normalize(_as_tensor(text), dim=-1)


def sum_text_weight(encoder: Any = None) -> float:
    """The measured default text weight of the normalised sum for ``encoder`` (configs/composed.yaml)."""
    return float(composed_defaults(encoder_name(encoder))["sum_text_weight"])


def _sum_fn(weight: float) -> CombiningFn:
    def combine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return normalized_sum(image, text, weight)

    combine.text_weight = weight  # type: ignore[attr-defined]
    combine.description = f"sum (normalised, text weight {weight:g})"  # type: ignore[attr-defined]
    return combine


def _combiner_fn(path: str | Path, encoder: Any, device: str | torch.device, description: str) -> CombiningFn:
    from calibclip.composed.combiner import load_combiner

    model = load_combiner(path, encoder=encoder, device=device)

    @torch.inference_mode()
    def combine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return model(_as_tensor(image).to(device), _as_tensor(text).to(device)).cpu()

    combine.combiner = model  # type: ignore[attr-defined]
    combine.path = Path(path)  # type: ignore[attr-defined]
    combine.description = description  # type: ignore[attr-defined]
    return combine


def packaged_combiner_for(encoder: Any) -> Path | None:
    """The packaged Combiner of ``encoder`` if it exists *and* was trained on this encoder's features
    (same fingerprint: e.g. not for a ``starter`` loaded with other head weights), else None."""
    if encoder is None or isinstance(encoder, str):
        return None
    path = packaged_combiner(encoder)
    if path is None:
        return None
    from calibclip.composed.combiner import read_combiner_checkpoint

    have = read_combiner_checkpoint(path).get("encoder_fingerprint", "")
    return path if not have or have == encoder.fingerprint() else None


def build_combining(
    name: str,
    combiner: str | Path | None = None,
    encoder: Any = None,
    device: str | torch.device = "cpu",
    text_weight: float | None = None,
) -> CombiningFn:
    """The combining function ``name`` (combiner | sum | image | text).

    Args:
        name: combiner | sum | image | text.
        combiner: the Combiner checkpoint for ``combiner``; None means the encoder's packaged Combiner.
        encoder: `Encoder` (or fingerprint string); a checkpoint from another encoder is an error, and
            the encoder's name selects the measured sum weight and the packaged Combiner.
        device: where the Combiner runs.
        text_weight: ``sum`` only: the text weight (default: the encoder's measured weight).

    Returns:
        ``fn(image [B, D], text [B, D]) -> [B, D]`` L2-normalised queries, with a ``description``.

    Raises:
        ValueError: an unknown name, or ``combiner`` with neither a checkpoint nor a packaged one.
    """
    if name == "sum":
        return _sum_fn(sum_text_weight(encoder) if text_weight is None else float(text_weight))
    if name == "image":
        return image_only
    if name == "text":
        return text_only
    if name != "combiner":
        raise ValueError(f"unknown combining function {name!r}: use one of {', '.join(COMBININGS)}")
    if combiner is None:
        packaged = packaged_combiner_for(encoder)
        if packaged is None:
            which = f" for encoder {encoder_name(encoder)!r}" if encoder_name(encoder) else ""
            raise ValueError(
                f"combining 'combiner' needs a trained Combiner checkpoint (e.g. --combiner "
                f"RUN_DIR/best.pt from `calibclip train-combiner`); none is packaged{which}. "
                "Or use --combining sum|image|text"
            )
        return _combiner_fn(packaged, encoder, device, f"combiner (packaged {packaged.name})")
    return _combiner_fn(combiner, encoder, device, f"combiner ({combiner})")


def default_combining(
    encoder: Any, combiner: str | Path | None = None, device: str | torch.device = "cpu"
) -> CombiningFn:
    """What composed search uses: ``combiner`` if given, else the encoder's packaged Combiner, else
    the normalised sum with the encoder's measured text weight."""
    if combiner is not None or packaged_combiner_for(encoder) is not None:
        return build_combining("combiner", combiner, encoder=encoder, device=device)
    return build_combining("sum", encoder=encoder)
