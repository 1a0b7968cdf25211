"""The starter's token views (what the trained re-ranker reads) computed from the starter training cache.

The starter's lower part (stem and all but the top ``k`` MBConv blocks of each EfficientNet-Lite, the
bottom MiniLM layers) is frozen in every starter version, and `calibclip.training.starter_cache` keeps
its fp16 activations of a split (and of the mirror images) on disk. A starter whose fine-tuned blocks
and layers all lie above that split (``meta`` ``image_blocks`` / ``text_layers``, 0 for v1) computes
its token views from the cache with only the upper part re-run: the same functions as the encoder's
own forward (`calibclip.models.starter_parts`, `Starter.map_tokens`, `Starter.normalize_hidden`), the
only difference being the fp16 rounding of the cached activations.

Used by the ``reranker`` training target (`calibclip.training.reranker_target`) when its encoder is a
starter: the token views live in memory only; the lower cache is reused when complete (nothing is
written then) and filled like the dual-encoder trainer fills it otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from calibclip.data.records import RetrievalDataset
from calibclip.data.tokens import TokenViews
from calibclip.utils import progress_bar


def fine_tuned_depth(encoder: Any) -> tuple[int, int]:
    """``(image_blocks, text_layers)`` of the towers a starter's weights changed (0, 0 for frozen towers)."""
    meta = getattr(encoder, "meta", {}) or {}
    return int(meta.get("image_blocks", 0) or 0), int(meta.get("text_layers", 0) or 0)


def lower_cache_folders(encoder: Any, dataset: RetrievalDataset, root: Path) -> tuple[Path, Path, int, int]:
    """Folders of ``dataset``'s lower-activation cache under ``root`` (the trainer's layout:
    ``ROOT/<name>-<split>/images-<k>-<backbones>[<geometry>]`` and ``.../text-<n_lower>``) and their
    ``(k, n_lower)``: an existing image cache with the fewest blocks above it that still covers the
    encoder's fine-tuned blocks (else the one the trainer would create), likewise for captions."""
    base = Path(root) / f"{dataset.name}-{dataset.split}"
    image_blocks, text_layers = fine_tuned_depth(encoder)
    bb = "+".join(encoder.backbones)
    pre = encoder.preprocess
    hw = encoder.image_tower.image_hw
    geometry = "" if hw is None and pre.mode == "clip" else f"-{pre.mode}{pre.size[0]}x{pre.size[1]}"
    n_layers = len(encoder.text_tower.encoder.layer)
    k_img = max(image_blocks, 1)  # the trainer's defaults (training.starter.image_blocks 1, text_layers 2)
    for k in range(image_blocks, min(len(net._blocks) for net in encoder.image_tower.nets) + 1):
        if (base / f"images-{k}-{bb}{geometry}" / "manifest.json").is_file():
            k_img = k
            break
    n_txt = n_layers - max(text_layers, 2)
    for n in range(n_layers - text_layers, -1, -1):
        if (base / f"text-{n}" / "manifest.json").is_file():
            n_txt = n
            break
    return base / f"images-{k_img}-{bb}{geometry}", base / f"text-{n_txt}", k_img, n_txt


@torch.inference_mode()
def starter_token_views(
    encoder: Any,
    dataset: RetrievalDataset,
    root: str | Path,
    batch_size: int = 64,
    extract_batch_size: int = 16,
    progress: bool = True,
) -> TokenViews:
    """Token views of ``dataset`` (images flip-averaged as `Starter.image_tokens`) from the starter's
    lower-activation cache under ``root``, filling the cache first where it is incomplete.

    Raises:
        TypeError: ``encoder`` is not a starter.
        RuntimeError: the cache at the expected folder was made for other items or settings.
    """
    from calibclip.models.starter import Starter
    from calibclip.models.starter_parts import image_split_index, text_upper, tower_upper
    from calibclip.training.starter_cache import LowerImages, LowerTexts, extract_image_lower, extract_text_lower

    if not isinstance(encoder, Starter):
        raise TypeError(f"starter token views need the starter, got {type(encoder).__name__}")
    img_dir, txt_dir, k_img, n_lower = lower_cache_folders(encoder, dataset, Path(root))
    shards = extract_image_lower(
        dataset.images,
        img_dir,
        encoder.backbones,
        k_img,
        batch_size=extract_batch_size,
        desc=f"{dataset.split} images (lower)",
        transform=encoder.preprocess,
        image_hw=encoder.image_tower.image_hw,
    )
    lower_img = LowerImages(shards, encoder.backbones)
    lower_txt = LowerTexts(extract_text_lower(dataset.captions, txt_dir, n_lower, desc=f"{dataset.split} captions"))
    tower = encoder.image_tower
    splits = [image_split_index(net, k_img) for net in tower.nets]
    dev = encoder.device
    tokens, pooled = [], []
    bar = progress_bar(total=lower_img.count, desc=f"{dataset.split} image tokens", disable=not progress)
    for s in range(0, lower_img.count, batch_size):
        idx = torch.arange(s, min(s + batch_size, lower_img.count))
        fmap = tower_upper(tower, [x.to(dev) for x in lower_img.get(idx, False)], splits)
        if encoder.flip_average:
            flipped = tower_upper(tower, [x.to(dev) for x in lower_img.get(idx, True)], splits)
            fmap = 0.5 * (fmap + flipped.flip(-1))
        view = encoder.map_tokens(fmap)
        tokens.append(view.tokens.half().cpu())
        pooled.append(view.pooled.float().cpu())
        bar.update(len(idx))
    bar.close()
    count = lower_txt.count
    order = torch.argsort(lower_txt.lengths, descending=True, stable=True)
    rows: list[torch.Tensor | None] = [None] * count
    text_pooled = torch.zeros(count, encoder.embed_dim)
    for s in range(0, count, 256):
        idx = order[s : s + 256]
        hidden, mask = (t.to(dev) for t in lower_txt.get(idx))
        hidden = text_upper(encoder.text_tower, hidden, mask, n_lower)
        hidden, text_vec = encoder.normalize_hidden(hidden, mask)
        out = encoder.text_head(hidden)
        text_pooled[idx] = encoder.text_head(text_vec).float().cpu()
        for j, i in enumerate(idx.tolist()):
            rows[i] = out[j, : int(lower_txt.lengths[i])].half().cpu()
    lengths = lower_txt.lengths.to(torch.int64)
    offsets = torch.zeros(count + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    dim = encoder.embed_dim
    return TokenViews(
        image_tokens=torch.cat(tokens) if tokens else torch.zeros(0, 0, dim).half(),
        image_pooled=torch.cat(pooled) if pooled else torch.zeros(0, dim),
        text_tokens=torch.cat([r for r in rows if r is not None]) if count else torch.zeros(0, dim).half(),
        text_offsets=offsets,
        text_pooled=text_pooled,
    )
