"""The starter split into a frozen lower part and a trainable upper part (starter v2 training).

Image tower: each EfficientNet-Lite backbone runs ``stem -> blocks[:s]`` (frozen, cached) and
``blocks[s:] -> conv_head -> ReLU6`` (trainable), where ``s = len(blocks) - image_blocks``.
Text tower: MiniLM runs ``embeddings -> layers[:6 - text_layers]`` (frozen, cached) and the top
``text_layers`` layers (trainable). The upper functions are the exact continuation of the code in
`calibclip.models.starter`, so an encoder whose tower tensors were replaced by trained ones
computes in one pass what the split computes in two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from calibclip.models.starter import GRID, StarterImageTower, area_matrix


def image_split_index(net: Any, image_blocks: int) -> int:
    """Index of the first trainable MBConv block of ``net`` (``image_blocks`` from the end)."""
    n = len(net._blocks)
    if not 0 <= image_blocks <= n:
        raise ValueError(f"image_blocks must be in [0, {n}], got {image_blocks}")
    return n - image_blocks


def image_lower(net: Any, pixels: torch.Tensor, split: int) -> torch.Tensor:
    """Frozen part of one backbone: stem and blocks ``[:split]`` (pixels at the backbone's size)."""
    x = net._swish(net._bn0(net._conv_stem(pixels)))
    for block in net._blocks[:split]:
        x = block(x, drop_connect_rate=None)
    return x


def image_upper(net: Any, x: torch.Tensor, split: int) -> torch.Tensor:
    """Trainable part of one backbone: blocks ``[split:]``, conv head, ReLU6."""
    for block in net._blocks[split:]:
        x = block(x, drop_connect_rate=None)
    return net._swish(net._bn1(net._conv_head(x)))


def resize_pixels(tower: StarterImageTower, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The per-backbone inputs `StarterImageTower.forward` feeds its nets."""
    out = []
    for size in tower.input_sizes:
        x = pixels
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if tower.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return out


def to_grid(fmap: torch.Tensor) -> torch.Tensor:
    """Area-average a backbone map to the common 7x7 grid (as `StarterImageTower.forward`)."""
    h, w = fmap.shape[-2:]
    if (h, w) == (GRID, GRID):
        return fmap
    ah = area_matrix(h, GRID).to(fmap)
    aw = area_matrix(w, GRID).to(fmap)
    return torch.einsum("ih,bchw,jw->bcij", ah, fmap, aw)


def tower_upper(tower: StarterImageTower, lowers: list[torch.Tensor], splits: list[int]) -> torch.Tensor:
    """Concatenated 7x7 feature map ``[B, 1280 * n, 7, 7]`` from the cached lower activations."""
    maps = [to_grid(image_upper(net, x.float(), s).contiguous()) for net, x, s in zip(tower.nets, lowers, splits)]
    return torch.cat(maps, dim=1)


def text_lower(model: Any, ids: torch.Tensor, mask: torch.Tensor, n_lower: int) -> torch.Tensor:
    """Frozen part of MiniLM: embeddings and layers ``[:n_lower]`` -> hidden ``[B, L, 384]``."""
    emb = model.embeddings
    pos = torch.arange(ids.shape[1], device=ids.device)
    x = emb.word_embeddings(ids) + emb.position_embeddings(pos)[None] + emb.token_type_embeddings.weight[0]
    x = emb.LayerNorm(x)
    bias = _bias(mask, x.dtype)
    for layer in model.encoder.layer[:n_lower]:
        x, _ = layer(x, bias)
    return x


def text_upper(model: Any, x: torch.Tensor, mask: torch.Tensor, n_lower: int) -> torch.Tensor:
    """Trainable part of MiniLM: layers ``[n_lower:]`` on cached hidden states."""
    x = x.float()
    bias = _bias(mask, x.dtype)
    for layer in model.encoder.layer[n_lower:]:
        x, _ = layer(x, bias)
    return x


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask.bool(), torch.finfo(dtype).min)[:, None, None, :]


def upper_parameter_names(tower: Any, image_blocks: int, n_text_layers: int, n_layers: int = 6) -> list[str]:
    """State-dict prefixes (relative to the `Starter`) of the parts that train."""
    names = []
    for i, net in enumerate(tower.nets):
        s = image_split_index(net, image_blocks)
        names += [f"image_tower.nets.{i}._blocks.{b}." for b in range(s, len(net._blocks))]
        names.append(f"image_tower.nets.{i}._conv_head.")
    names += [f"text_tower.encoder.layer.{j}." for j in range(n_layers - n_text_layers, n_layers)]
    return names
