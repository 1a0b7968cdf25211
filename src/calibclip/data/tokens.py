"""Token views of a dataset (what the trained re-ranker consumes), cached on disk in fp16 in
resumable shards: used by re-ranker training and by evaluation with ``--rerank``.

Layout of a token cache folder (one per encoder fingerprint, preprocessing and item list):
``images.<start>.safetensors`` with ``tokens [n, N, D]`` and ``pooled [n, D]``;
``texts.<start>.safetensors`` with ``tokens [sum L_i, D]`` (ragged, flattened), ``lengths [n]`` and
``pooled [n, D]``; ``key.json``. A shard that exists is reused, so a killed extraction resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibclip.data.loader import iter_image_batches
from calibclip.models.base import Encoder
from calibclip.utils import progress_bar

IMAGE_SHARD = 256
TEXT_SHARD = 4096


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class TokenViews:
    """Token views of a dataset: images ``[G, N, D]`` fp16 + pooled ``[G, D]``, captions ragged
    (``text_tokens [sum L, D]`` fp16, ``text_offsets [Q + 1]``) + pooled ``[Q, D]``."""

    image_tokens: torch.Tensor
    image_pooled: torch.Tensor
    text_tokens: torch.Tensor
    text_offsets: torch.Tensor
    text_pooled: torch.Tensor

    def texts(self, rows: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded text tokens ``[B, L, D]`` (float32) and mask ``[B, L]`` of caption ``rows``."""
        starts, stops = self.text_offsets[rows], self.text_offsets[rows + 1]
        lengths = (stops - starts).clamp(max=max_len)
        length = int(lengths.max()) if len(rows) else 0
        pos = torch.arange(length)
        mask = pos[None] < lengths[:, None]
        index = (starts[:, None] + pos[None]).clamp(max=max(len(self.text_tokens) - 1, 0))
        tokens = self.text_tokens[index].float() * mask[..., None]
        return tokens, mask.long()


def cache_key(encoder: Encoder, images: Sequence[str | Path], captions: Sequence[str]) -> dict[str, object]:
    """What a token cache depends on: encoder fingerprint, preprocessing and the exact item lists."""

    def digest(items: Sequence[object]) -> str:
        return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]

    return {
        "format": "calibclip-tokens-1",
        "model": encoder.fingerprint(),
        "preprocess": encoder.preprocess.describe(),
        "images": digest(images),
        "n_images": len(images),
        "captions": digest(captions),
        "n_captions": len(captions),
    }


@torch.inference_mode()
def extract_token_views(
    encoder: Encoder,
    images: Sequence[str | Path],
    captions: Sequence[str],
    folder: str | os.PathLike,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> TokenViews:
    """Cache (or load) the token views of ``images`` and ``captions`` under ``folder``.

    Raises:
        ValueError: ``folder`` holds a cache of other items or another encoder.
        RuntimeError: an image cannot be decoded (training sets must be complete).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(encoder, images, captions)
    key_file = folder / "key.json"
    if key_file.exists():
        found = json.loads(key_file.read_text())
        if found != key:
            diff = sorted(k for k in key if found.get(k) != key[k])
            raise ValueError(
                f"{folder} holds token views of other data or another encoder (differs in {diff}); use another folder"
            )
    else:
        key_file.write_text(json.dumps(key, indent=1))
    img_parts, txt_parts = [], []
    bar = progress_bar(total=len(images), desc="image tokens", disable=not progress)
    for start in range(0, len(images), IMAGE_SHARD):
        path = folder / f"images.{start:07d}.safetensors"
        paths = list(images[start : start + IMAGE_SHARD])
        if not path.exists():
            toks: list[torch.Tensor] = []
            pooled_parts: list[torch.Tensor] = []
            bad: dict[int, tuple[str, str]] = {}
            for batch in iter_image_batches(paths, encoder.preprocess, batch_size, workers):
                bad.update(batch.errors)
                if batch.pixels is not None:
                    image_view = encoder.image_tokens(batch.pixels.to(encoder.device, encoder.dtype))
                    toks.append(image_view.tokens.half().cpu())
                    pooled_parts.append(image_view.pooled.float().cpu())
                bar.update(len(batch.indices) + len(batch.errors))
            if bad:
                sample = "; ".join(msg for _, msg in list(bad.values())[:3])
                raise RuntimeError(f"{len(bad)} training images could not be read, e.g. {sample}")
            _save({"tokens": torch.cat(toks), "pooled": torch.cat(pooled_parts)}, path)
        else:
            bar.update(len(paths))
        img_parts.append(_load(path))
    bar.close()
    bar = progress_bar(total=len(captions), desc="text tokens", disable=not progress)
    for start in range(0, len(captions), TEXT_SHARD):
        path = folder / f"texts.{start:07d}.safetensors"
        chunk = list(captions[start : start + TEXT_SHARD])
        if not path.exists():
            order = np.argsort([-len(t) for t in chunk], kind="stable")
            rows: list[torch.Tensor | None] = [None] * len(chunk)
            pooled = torch.zeros(len(chunk), encoder.embed_dim)
            for s in range(0, len(chunk), 128):
                idx = order[s : s + 128]
                view = encoder.text_tokens(encoder.tokenize([chunk[i] for i in idx]).to(encoder.device))
                mask = view.batch.attention_mask.bool().cpu()
                for j, i in enumerate(idx):
                    rows[i] = view.tokens[j].cpu()[mask[j]].half()
                pooled[torch.as_tensor(idx)] = view.pooled.float().cpu()
                bar.update(len(idx))
            lengths = torch.tensor([len(r) for r in rows if r is not None], dtype=torch.int64)
            _save({"tokens": torch.cat([r for r in rows if r is not None]), "lengths": lengths, "pooled": pooled}, path)
        else:
            bar.update(len(chunk))
        txt_parts.append(_load(path))
    bar.close()
    lengths = torch.cat([p["lengths"] for p in txt_parts]) if txt_parts else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    dim = encoder.embed_dim
    return TokenViews(
        image_tokens=torch.cat([p["tokens"] for p in img_parts]) if img_parts else torch.zeros(0, 0, dim).half(),
        image_pooled=torch.cat([p["pooled"] for p in img_parts]) if img_parts else torch.zeros(0, dim),
        text_tokens=torch.cat([p["tokens"] for p in txt_parts]) if txt_parts else torch.zeros(0, dim).half(),
        text_offsets=offsets,
        text_pooled=torch.cat([p["pooled"] for p in txt_parts]) if txt_parts else torch.zeros(0, dim),
    )
