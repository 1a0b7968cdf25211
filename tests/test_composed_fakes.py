"""A tiny deterministic `Encoder` for fast composed-retrieval tests (imported by the other
test_composed*/test_css/test_train_combiner files), plus placeholder-dataset writers."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from calibclip.data.transforms import ImageTransform
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens

VOCAB = 1024


class FakeEncoder(Encoder):
    """8x8 pixels -> fixed random projection; texts -> mean of hashed word embeddings."""

    name = "fake"

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        self.embed_dim = dim
        self.preprocess = ImageTransform(size=(8, 8), mode="resize", mean=(0.5,) * 3, std=(0.5,) * 3)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("image_proj", torch.randn(3 * 64, dim, generator=g) / 8.0)
        self.register_buffer("word_emb", torch.randn(VOCAB, dim, generator=g))

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        ids = [[zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in t.lower().split()] or [1] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
        mask = (input_ids > 0).long()
        return TextBatch(input_ids, mask, torch.zeros_like(mask, dtype=torch.bool), list(texts))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1).float() @ self.image_proj

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        batch = text if isinstance(text, TextBatch) else TextBatch(text, (text > 0).long(), (text < 0), [])
        emb = self.word_emb[batch.input_ids] * batch.attention_mask[..., None]
        return emb.sum(1) / batch.attention_mask.sum(1, keepdim=True).clamp(min=1)

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        pooled = self.encode_image(pixels)
        return ImageTokens(pooled, pooled[:, None], torch.ones(len(pooled), 1), (1, 1))

    def text_tokens(self, text: TextBatch) -> TextTokens:
        emb = self.word_emb[text.input_ids] * text.attention_mask[..., None]
        att = text.attention_mask.float() / text.attention_mask.sum(1, keepdim=True).clamp(min=1)
        return TextTokens(self.encode_text(text), emb, att, text)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.embed_dim, "preprocess": self.preprocess.describe()}


def placeholder_image(path: Path, name: str) -> None:
    """A tiny solid-colour image (format from the suffix) whose colour is derived from ``name``."""
    h = zlib.crc32(name.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (h & 255, (h >> 8) & 255, (h >> 16) & 255)).save(path, quality=90)


def write_fashioniq_subset(src: Path, dst: Path, n_pairs: int = 40, split_sizes: dict | None = None) -> Path:
    """Copy the first ``n_pairs`` pairs of every category's train/val captions from the real
    annotation files into ``dst``, with image splits restricted to the images they name plus
    a few other split images, and placeholder images for all of them."""
    for cat in ("dress", "shirt", "toptee"):
        for split in ("train", "val"):
            pairs = json.loads((src / "captions" / f"cap.{cat}.{split}.json").read_text())[:n_pairs]
            names = json.loads((src / "image_splits" / f"split.{cat}.{split}.json").read_text())
            used = {p["candidate"] for p in pairs} | {p["target"] for p in pairs}
            keep = [n for n in names if n in used] + [n for n in names if n not in used][:10]
            (dst / "captions").mkdir(parents=True, exist_ok=True)
            (dst / "image_splits").mkdir(parents=True, exist_ok=True)
            (dst / "captions" / f"cap.{cat}.{split}.json").write_text(json.dumps(pairs))
            (dst / "image_splits" / f"split.{cat}.{split}.json").write_text(json.dumps(keep))
            for n in keep:
                placeholder_image(dst / "images" / f"{n}.jpg", n)
    return dst


def write_cirr_subset(src: Path, dst: Path, n_pairs: int = 60, with_train: bool = True) -> Path:
    """A CIRR root in the official nested layout (``dst/cirr/{captions,image_splits}``, images under
    ``dst/dev/``...) holding the first ``n_pairs`` real val and test1 pairs. The shared data has
    no train captions, so (``with_train``) a train split is made of the *next* val pairs."""
    ann = dst / "cirr"
    for split, source, lo, hi in (("val", "val", 0, n_pairs), ("test1", "test1", 0, n_pairs),
                                  ("train", "val", n_pairs, 3 * n_pairs)):
        if split == "train" and not with_train:
            continue
        pairs = json.loads((src / "captions" / f"cap.rc2.{source}.json").read_text())[lo:hi]
        relpaths = json.loads((src / "image_splits" / f"split.rc2.{source}.json").read_text())
        used = {p["reference"] for p in pairs} | {p.get("target_hard") for p in pairs}
        used |= {m for p in pairs for m in p["img_set"]["members"]}
        keep = {n: r for n, r in relpaths.items() if n in used}
        (ann / "captions").mkdir(parents=True, exist_ok=True)
        (ann / "image_splits").mkdir(parents=True, exist_ok=True)
        (ann / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(pairs))
        (ann / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(keep))
        for n, rel in keep.items():
            placeholder_image(dst / rel, n)
    return dst


def test_fake_encoder_is_deterministic_and_text_sensitive() -> None:
    enc = FakeEncoder()
    a = enc.encode(texts=["a red dress", "a blue shirt"])
    assert a.shape == (2, 32)
    assert np.allclose(a, FakeEncoder().encode(texts=["a red dress", "a blue shirt"]))
    assert not np.allclose(a[0], a[1])
