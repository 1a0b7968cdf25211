"""OpenAI CLIP architectures as data (the open_clip ``model_configs`` idea); their weights are
declared apart, in `calibclip.models.pretrained`.

The model table (`calibclip.models.registry`) registers every name here: `build_clip` builds a
`CLIP`; ``pretrained=True`` (default) downloads the official weights (SHA-256 checked, cached),
``pretrained=False`` gives OpenAI's random initialisation without any download. Aliases with
``-`` instead of ``/`` (``ViT-B-16``) are registered too (`clip_aliases`).
"""

from __future__ import annotations

import os
from typing import Any

from calibclip.models.clip import CLIP, CLIPConfig

#: name -> architecture (OpenAI's released models).
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "RN50": dict(
        embed_dim=1024, image_size=224, vision_layers=(3, 4, 6, 3), vision_width=64, text_width=512, text_layers=12
    ),
    "RN101": dict(
        embed_dim=512, image_size=224, vision_layers=(3, 4, 23, 3), vision_width=64, text_width=512, text_layers=12
    ),
    "RN50x4": dict(
        embed_dim=640, image_size=288, vision_layers=(4, 6, 10, 6), vision_width=80, text_width=640, text_layers=12
    ),
    "RN50x16": dict(
        embed_dim=768, image_size=384, vision_layers=(6, 8, 18, 8), vision_width=96, text_width=768, text_layers=12
    ),
    "RN50x64": dict(
        embed_dim=1024, image_size=448, vision_layers=(3, 15, 36, 10), vision_width=128, text_width=1024, text_layers=12
    ),
    "ViT-B/32": dict(
        embed_dim=512,
        image_size=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        text_width=512,
        text_layers=12,
    ),
    "ViT-B/16": dict(
        embed_dim=512,
        image_size=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=16,
        text_width=512,
        text_layers=12,
    ),
    "ViT-L/14": dict(
        embed_dim=768,
        image_size=224,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        text_width=768,
        text_layers=12,
    ),
    "ViT-L/14@336px": dict(
        embed_dim=768,
        image_size=336,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        text_width=768,
        text_layers=12,
    ),
}


def clip_config(name: str, image_size: int | tuple[int, int] | None = None, **overrides: Any) -> CLIPConfig:
    """The `CLIPConfig` of a registered OpenAI architecture (optionally another input size)."""
    cfg = dict(CLIP_CONFIGS[name], name=name)
    if image_size is not None:
        cfg["image_size"] = image_size
    cfg.update(overrides)
    return CLIPConfig(**cfg)


def build_clip(
    name: str,
    pretrained: bool = True,
    image_size: int | tuple[int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
    progress: bool = True,
) -> CLIP:
    """OpenAI CLIP ``name``: official weights (``pretrained=True``) or random init.

    Args:
        name: an architecture of `CLIP_CONFIGS` (``ViT-B/16``, ``RN50`` ...).
        pretrained: load the official weights (downloaded once, SHA-256 checked); False: random init.
        image_size: another input size (position embeddings interpolated).
        cache_dir: download folder (default ``$CALIBCLIP_CACHE``).
        quick_gelu: force the activation (default: OpenAI's QuickGELU).
        progress: show a download progress bar.

    Returns:
        The `CLIP` encoder.

    Raises:
        RuntimeError: the weights cannot be downloaded (offline) or fail their checksum.
    """
    if not pretrained:
        act = "gelu" if quick_gelu is False else "quick_gelu"
        return CLIP(clip_config(name, image_size=image_size, act=act)).eval()
    from calibclip.models.checkpoints import load_checkpoint
    from calibclip.models.download import download_pretrained

    path = download_pretrained(name, cache_dir=cache_dir, progress=progress)
    return load_checkpoint(path, image_size=image_size, quick_gelu=quick_gelu, name=name)


def clip_aliases(name: str) -> tuple[str, ...]:
    """``ViT-B/16`` -> ``ViT-B-16``; ``ViT-L/14@336px`` -> ``ViT-L-14-336px`` (its file name) and
    ``ViT-L-14-336`` (open_clip's name)."""
    dashed = name.replace("/", "-").replace("@", "-")
    return tuple(sorted({dashed, dashed.replace("336px", "336")} - {name}))


def clip_description(name: str) -> str:
    """One line describing a `CLIP_CONFIGS` architecture (for ``calibclip models``)."""
    cfg = CLIP_CONFIGS[name]
    kind = f"ViT, patch {cfg['vision_patch_size']}" if "vision_patch_size" in cfg else "ModifiedResNet"
    return f"OpenAI CLIP {name} ({kind}, {cfg['image_size']}px, {cfg['embed_dim']}-d)"
