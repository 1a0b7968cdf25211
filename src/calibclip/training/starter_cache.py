"""Cached lower-part activations of the starter (fp16 on disk, resumable shards).

Images: for every image and its mirror image, the input of the first trainable MBConv block of
each backbone (`calibclip.models.starter_parts.image_lower`), ``[C, H, W]`` fp16, in shards of
256 images under ``FOLDER/images-<k>/`` (k = trainable blocks). Captions: MiniLM hidden states
after the frozen layers, ``[L_i, 384]`` fp16 flattened with per-caption offsets, in shards of
2048 captions under ``FOLDER/text-<n>/``. A manifest pins the items and settings; a shard that
exists is reused, so a killed extraction resumes; several processes may extract into one cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from calibclip.data.images import load_image
from calibclip.data.transforms import ImageTransform
from calibclip.models.starter import MiniLM, StarterImageTower, minilm_tokenize
from calibclip.models.starter_parts import (
    image_lower,
    image_split_index,
    resize_pixels,
    text_lower,
)
from calibclip.models.starter_train import (
    SHARD,
    _check_manifest,
    _claimed,
    _preprocess_for,
)
from calibclip.utils import progress_bar

TEXT_SHARD = 2048


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def extract_image_lower(
    images: Sequence[Path],
    folder: Path,
    backbones: Sequence[str],
    image_blocks: int,
    batch_size: int = 16,
    desc: str = "images",
    transform: ImageTransform | None = None,
    image_hw: tuple[int, int] | None = None,
) -> list[Path]:
    """Cache the lower activations of ``images`` (and their mirror images); returns the shard files.

    ``transform`` / ``image_hw``: the encoder's preprocessing and input geometry (default: the square
    starter's, `StarterImageTower`'s ``image_hw``)."""
    transform = transform or _preprocess_for(backbones)
    folder = Path(folder)
    manifest = {
        "images": [str(p) for p in images],
        "backbones": list(backbones),
        "image_blocks": image_blocks,
        "preprocess": transform.describe(),
        "shard": SHARD,
        "dtype": "float16",
        "flip": True,
        **({"image_hw": list(image_hw)} if image_hw is not None else {}),
    }
    _check_manifest(folder, manifest)
    n_shards = math.ceil(len(images) / SHARD)
    todo = [s for s in range(n_shards) if not (folder / f"{s:05d}.safetensors").exists()]
    done = len(images) - sum(len(images[s * SHARD : (s + 1) * SHARD]) for s in todo)
    bar = progress_bar(total=len(images), desc=desc, initial=done)
    tower: StarterImageTower | None = None
    splits: list[int] = []
    for s in _claimed(folder, todo):
        if tower is None:
            tower = StarterImageTower(backbones, image_hw=image_hw)
            splits = [image_split_index(net, image_blocks) for net in tower.nets]
        paths = list(images[s * SHARD : (s + 1) * SHARD])
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode():
            for i in range(0, len(paths), batch_size):
                pixels = torch.stack([transform(load_image(p)) for p in paths[i : i + batch_size]])
                for suffix, x in (("", pixels), ("_flip", pixels.flip(-1))):
                    for b, net, split, inp in zip(backbones, tower.nets, splits, resize_pixels(tower, x)):
                        parts.setdefault(b + suffix, []).append(image_lower(net, inp, split).contiguous().half())
                bar.update(len(paths[i : i + batch_size]))
        _save({k: torch.cat(v) for k, v in parts.items()}, folder / f"{s:05d}.safetensors")
        (folder / f"{s:05d}.lock").unlink(missing_ok=True)
    bar.close()
    return [folder / f"{s:05d}.safetensors" for s in range(n_shards)]


def extract_text_lower(
    captions: Sequence[str], folder: Path, n_lower: int, batch_size: int = 128, desc: str = "captions"
) -> list[Path]:
    """Cache MiniLM hidden states after ``n_lower`` layers; returns the shard files."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    _check_manifest(
        folder,
        {"captions": digest, "count": len(captions), "n_lower": n_lower, "shard": TEXT_SHARD, "dtype": "float16"},
    )
    n_shards = math.ceil(len(captions) / TEXT_SHARD)
    todo = [s for s in range(n_shards) if not (folder / f"{s:05d}.safetensors").exists()]
    bar = progress_bar(
        total=len(captions),
        desc=desc,
        initial=len(captions) - sum(len(captions[s * TEXT_SHARD : (s + 1) * TEXT_SHARD]) for s in todo),
    )
    model: MiniLM | None = None
    for s in _claimed(folder, todo):
        model = model or MiniLM()
        chunk = list(captions[s * TEXT_SHARD : (s + 1) * TEXT_SHARD])
        order = np.argsort([-len(c) for c in chunk], kind="stable")
        rows: list[torch.Tensor | None] = [None] * len(chunk)
        with torch.inference_mode():
            for i in range(0, len(chunk), batch_size):
                idx = order[i : i + batch_size]
                batch = minilm_tokenize([chunk[j] for j in idx])
                hidden = text_lower(model, batch.input_ids, batch.attention_mask, n_lower)
                lengths = batch.attention_mask.sum(1)
                for r, j in enumerate(idx):
                    rows[int(j)] = hidden[r, : int(lengths[r])].half()
                bar.update(len(idx))
        lengths_t = torch.tensor([len(r) for r in rows])  # type: ignore[arg-type]
        _save({"hidden": torch.cat(rows), "lengths": lengths_t}, folder / f"{s:05d}.safetensors")  # type: ignore[arg-type]
        (folder / f"{s:05d}.lock").unlink(missing_ok=True)
    bar.close()
    return [folder / f"{s:05d}.safetensors" for s in range(n_shards)]


class LowerImages:
    """All cached image activations of a split in memory (fp16): ``get(idx, flip) -> list per backbone``."""

    def __init__(self, shards: Sequence[Path], backbones: Sequence[str]):
        from safetensors.torch import load_file

        loaded = [load_file(str(p)) for p in shards]
        self.backbones = tuple(backbones)
        self.data = {k: torch.cat([sh[k] for sh in loaded]) for k in loaded[0]}
        self.count = int(self.data[self.backbones[0]].shape[0])

    def get(self, idx: torch.Tensor, flip: torch.Tensor | bool = False) -> list[torch.Tensor]:
        out = []
        for b in self.backbones:
            a = self.data[b][idx]
            if isinstance(flip, bool):
                out.append(self.data[b + "_flip"][idx] if flip else a)
            else:
                out.append(torch.where(flip[:, None, None, None], self.data[b + "_flip"][idx], a))
        return out


class LowerTexts:
    """All cached caption hidden states of a split: ``get(idx) -> (hidden [B, L, 384], mask [B, L])``."""

    def __init__(self, shards: Sequence[Path]):
        from safetensors.torch import load_file

        loaded = [load_file(str(p)) for p in shards]
        self.hidden = torch.cat([sh["hidden"] for sh in loaded])
        self.lengths = torch.cat([sh["lengths"] for sh in loaded])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.count = int(self.lengths.shape[0])

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.lengths[idx]
        length = int(lengths.max())
        pos = torch.arange(length)
        mask = pos[None, :] < lengths[:, None]
        gather = (self.offsets[idx][:, None] + pos[None, :]).clamp(max=self.hidden.shape[0] - 1)
        hidden = self.hidden[gather] * mask[..., None]
        return hidden, mask.long()
