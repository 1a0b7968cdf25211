"""The `Encoder` interface every dual encoder of the project implements.

An encoder maps images and texts into one embedding space and exposes a *token view*
(per-token features and the weight each token has in the pooled embedding) that the
CalibCLIP calibration consumes. Adding a new encoder means subclassing `Encoder` and
implementing the abstract methods below; indexing, evaluation, calibration and the
Combiner then work with it unchanged.

Conventions
- ``encode_image``/``encode_text`` return *raw* (un-normalised) float embeddings ``[B, D]``.
- Text goes in as a `TextBatch` (``input_ids`` + ``attention_mask``) produced by the
  encoder's own ``tokenize``; CLIP models also accept a bare ``LongTensor`` of ids (OpenAI API).
- Token views are computed in the same forward pass as the pooled embedding, so
  ``view.pooled`` equals ``encode_*`` exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from calibclip.data.transforms import ImageTransform


@dataclass
class TextBatch:
    """Tokenised texts: ``input_ids`` and ``attention_mask`` (1 = real token), both ``[B, L]``.

    ``special_mask`` marks tokens that are not words (start/end/CLS/SEP); calibration never
    masks those. ``eot_index`` is the position of the pooling token (CLIP: end-of-text,
    MiniLM: unused, -1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor
    texts: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.special_mask.to(device),
            self.texts,
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: slice | torch.Tensor) -> TextBatch:
        texts = self.texts
        if isinstance(index, slice):
            texts = texts[index]
        elif texts:
            texts = [texts[i] for i in index.tolist()]
        return TextBatch(self.input_ids[index], self.attention_mask[index], self.special_mask[index], texts)

    def drop_tokens(self, drop: torch.Tensor, pad_id: int = 0) -> TextBatch:
        """Remove the positions where ``drop`` is True (never special tokens), left-compacting
        each row and re-padding with ``pad_id``. Row-independent and exact."""
        drop = drop.bool() & ~self.special_mask.bool() & self.attention_mask.bool()
        keep = self.attention_mask.bool() & ~drop
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        ids = torch.gather(self.input_ids, 1, order)
        special = torch.gather(self.special_mask, 1, order)
        kept = torch.gather(keep, 1, order)
        ids = torch.where(kept, ids, torch.full_like(ids, pad_id))
        special = special & kept
        length = int(kept.sum(1).max().item()) if kept.numel() else 0
        return TextBatch(ids[:, :length], kept[:, :length].long(), special[:, :length], self.texts)


@dataclass
class ImageTokens:
    """Token view of a batch of images.

    pooled:    ``[B, D]`` the image embedding (same as ``encode_image``).
    tokens:    ``[B, N, D]`` per-token features in the joint space (ViT: patch tokens after
               ln_post and projection; ResNet: spatial cells through the attention-pool
               value/output projections; starter: 7x7 feature-map cells through the head).
    attention: ``[B, N]`` non-negative weight of each token in the pooled embedding, summing to 1
               (ViT: last block's CLS->patch attention averaged over heads; ResNet: attention-pool
               weights; starter: each cell's contribution to the pooled feature).
    grid:      ``(h, w)`` with ``h * w == N``.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    attention: torch.Tensor
    grid: tuple[int, int]


@dataclass
class TextTokens:
    """Token view of a batch of texts.

    pooled:    ``[B, D]`` the text embedding (same as ``encode_text``).
    tokens:    ``[B, L, D]`` per-token features in the joint space.
    attention: ``[B, L]`` attention from the pooling token (CLIP: end-of-text, last block, mean
               over heads; MiniLM: mean over the last layer's heads of every token's attention,
               as the model mean-pools) to each token; 0 on padding.
    batch:     the `TextBatch` that produced it (ids, masks, special tokens).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    attention: torch.Tensor
    batch: TextBatch


#: Layout version of the on-disk fingerprint cache (``$CALIBCLIP_CACHE/fingerprints/<key>``).
FINGERPRINT_CACHE_VERSION = 1


def _fingerprint_cache_dir() -> Path:
    # the same root as calibclip.models.download.default_cache_dir, without importing urllib here
    return Path(os.environ.get("CALIBCLIP_CACHE") or Path.home() / ".cache" / "calibclip") / "fingerprints"


def _read_fingerprint_cache(key: str) -> str | None:
    try:
        text = (_fingerprint_cache_dir() / key).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _write_fingerprint_cache(key: str, fingerprint: str) -> None:
    """Best effort: a read-only or missing cache folder only costs the hash next time."""
    folder = _fingerprint_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(fingerprint + "\n")
        os.replace(tmp, folder / key)
    except OSError:
        pass


def tensor_signature(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A cheap checksum of named tensors (each one's sum and every 97th element): milliseconds for
    tens of millions of values, and it changes when training or an in-place edit touches them."""
    sig = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().to("cpu").reshape(-1)
        if t.is_floating_point():
            t = t.float()
            sig.update(repr(float(t.sum())).encode())
        sig.update(name.encode())
        sig.update(t[::97].numpy().tobytes())
    return sig.hexdigest()


class Encoder(nn.Module, ABC):
    """Abstract dual encoder. Subclasses set ``name``, ``embed_dim`` and ``preprocess``.

    Attributes:
        name: model name (also the key of its packaged calibration defaults).
        embed_dim: size of the joint embedding.
        preprocess: PIL image / path -> ``[3, H, W]`` tensor (the model's own transform).
        pad_id: id of the padding token (re-padding after DCC drops words).
        precision: fp32 | bf16 | fp16, set by `create_model`.
        spec: what rebuilds the model with `create_model` (registered name or absolute checkpoint
            path), set by `create_model`; None for an encoder built directly.
    """

    name: str = "encoder"
    embed_dim: int
    preprocess: ImageTransform  # callable: PIL image / path -> [3, H, W] tensor; ``describe()`` for cache keys
    pad_id: int = 0
    precision: str = "fp32"
    spec: str | None = None

    # --- abstract -----------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        """Tokenise texts with this encoder's own tokenizer (trimmed to the longest text)."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` preprocessed pixels -> raw embeddings ``[B, D]``."""

    @abstractmethod
    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        """Tokenised texts -> raw embeddings ``[B, D]``."""

    @abstractmethod
    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        """Token view of images (see `ImageTokens`)."""

    @abstractmethod
    def text_tokens(self, text: TextBatch) -> TextTokens:
        """Token view of texts (see `TextTokens`)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the architecture and preprocessing."""

    # --- optional, with defaults ----------------------------------------------------------
    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Readable strings of token ids (calibration explanations).

        The default uses a ``tokenizer`` attribute with ``id_to_token`` / ``convert_ids_to_tokens``
        when the encoder has one, the CLIP BPE for ids that start with CLIP's start token and contain
        its end token, else ``#id``. Encoders with their own vocabulary override it.

        Args:
            ids: token ids of one text.

        Returns:
            One string per id.
        """
        from calibclip.models.tokenizer import EOT_TOKEN, SOT_TOKEN

        ids = [int(i) for i in ids]
        tok = getattr(self, "tokenizer", None)
        if tok is not None and hasattr(tok, "id_to_token"):
            return [str(tok.id_to_token(i)) for i in ids]
        if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
            return [str(t) for t in tok.convert_ids_to_tokens(ids)]
        if ids and ids[0] == SOT_TOKEN and EOT_TOKEN in ids:
            from calibclip.models.tokenizer import token_strings

            return token_strings(ids)
        return [f"#{i}" for i in ids]

    def batch_from_ids(self, ids: torch.Tensor, texts: Sequence[str] = ()) -> TextBatch:
        """A `TextBatch` from a bare id tensor ``[B, L]`` (the OpenAI API's ``tokenize`` output).

        The default treats ids other than `pad_id` as real tokens and CLIP's start/end tokens as
        special; encoders with another vocabulary override it.

        Args:
            ids: token ids ``[B, L]``, padded with `pad_id`.
            texts: the texts, if known.

        Returns:
            The `TextBatch`.
        """
        from calibclip.models.tokenizer import EOT_TOKEN, SOT_TOKEN

        ids = torch.as_tensor(ids).long()
        special = (ids == SOT_TOKEN) | (ids == EOT_TOKEN)
        return TextBatch(ids, (ids != self.pad_id).long(), special, list(texts))

    # --- shared -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def fingerprint(self) -> str:
        """Stable identity of weights + architecture + preprocessing (for caches and indexes).

        A hash of every parameter/buffer and the config, computed once per object. An encoder whose
        weights come from files (`fingerprint_files`) also keeps it on disk, under
        ``$CALIBCLIP_CACHE/fingerprints`` (default ``~/.cache/calibclip``), keyed by those files' paths,
        sizes and modification times, the config, the dtype and a cheap signature of the tensors already
        built; a later process then skips the hash (and, for the starter, building the image tower). The
        disk cache is only used while `fingerprint_cacheable` holds, and an unreadable or unwritable cache
        is ignored.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is not None:
            return cached
        key = self._fingerprint_cache_key()
        if key is not None:
            hit = _read_fingerprint_cache(key)
            if hit is not None:
                self._fingerprint = hit
                return hit
        h = hashlib.sha256(json.dumps(self.config(), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            t = tensor.detach().to("cpu").contiguous()
            if t.is_floating_point():
                t = t.float()
            h.update(t.numpy().tobytes())
        self._fingerprint = f"{self.name}-{h.hexdigest()[:16]}"
        if key is not None:
            _write_fingerprint_cache(key, self._fingerprint)
        return self._fingerprint

    # --- on-disk fingerprint cache: hooks an encoder overrides ---------------------------
    def fingerprint_files(self) -> list[Path]:
        """Files that, with the config, determine this encoder's weights as loaded (default: none, so
        the fingerprint is never cached on disk)."""
        return []

    def fingerprint_cacheable(self) -> bool:
        """Whether the weights are still those of `fingerprint_files` (default: in eval mode)."""
        return not self.training

    def signature_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors whose cheap signature joins the disk-cache key (default: the whole state dict)."""
        return sorted(self.state_dict().items())

    def _fingerprint_cache_key(self) -> str | None:
        files = self.fingerprint_files()
        if not files or not self.fingerprint_cacheable():
            return None
        try:
            ids = []
            for f in files:
                st = os.stat(f)
                ids.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            return None
        record = {
            "version": FINGERPRINT_CACHE_VERSION,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "name": self.name,
            "config": self.config(),
            "dtype": str(self.dtype),
            "files": ids,
            "signature": tensor_signature(self.signature_tensors()),  # catches in-place edits
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str] | None = None,
        images: Iterable[Any] | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        progress: bool = False,
    ) -> np.ndarray:
        """sentence-transformers-style convenience: encode texts *or* images (paths, PIL images
        or bytes) into a float32 array ``[N, D]``."""
        from calibclip.data.images import load_image
        from calibclip.utils import progress_bar

        if (texts is None) == (images is None):
            raise ValueError("encode() takes exactly one of texts= or images=")
        out: list[torch.Tensor] = []
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            order = np.argsort([-len(t) for t in texts], kind="stable")
            bar = progress_bar(total=len(texts), desc="texts", disable=not progress)
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenize([texts[i] for i in idx]).to(self.device)
                out.append(self.encode_text(batch).float().cpu())
                bar.update(len(idx))
            bar.close()
            feats = torch.cat(out) if out else torch.zeros(0, self.embed_dim)
            result = torch.empty_like(feats)
            result[torch.as_tensor(order)] = feats
        else:
            items = list(images)  # type: ignore[arg-type]
            bar = progress_bar(total=len(items), desc="images", disable=not progress)
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                pixels = torch.stack([self.preprocess(load_image(x)) for x in chunk])
                out.append(self.encode_image(pixels.to(self.device, self.dtype)).float().cpu())
                bar.update(len(chunk))
            bar.close()
            result = torch.cat(out) if out else torch.zeros(0, self.embed_dim)
        if normalize:
            result = torch.nn.functional.normalize(result, dim=-1)
        return result.numpy()
