"""Shared helpers for the index tests (no tests here): a tiny deterministic `Encoder` and a folder
of real photos (scikit-image's samples) mixed with every kind of bad file."""

from __future__ import annotations

import io
import os
import shutil
import struct
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import torch
from PIL import Image
from torch import nn

from calibclip.data.transforms import ImageTransform
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens

SKIMAGE_DIR = Path(os.path.dirname(skimage.data.__file__))


class FakeEncoder(Encoder):
    """Deterministic toy dual encoder: image tokens are the 4x4 grid of mean colours of a 32x32
    preprocessed image projected to ``dim``; text tokens are hashed word embeddings. ``delay``
    (seconds per image batch) makes indexing slow enough to be killed mid-run."""

    name = "fake-test"

    def __init__(self, dim: int = 16, seed: int = 0, delay: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = dim
        self.seed = seed
        self.delay = delay
        self.colour = nn.Parameter(torch.randn(3, dim, generator=g), requires_grad=False)
        self.position = nn.Parameter(torch.randn(16, dim, generator=g) * 0.3, requires_grad=False)
        self.words = nn.Parameter(torch.randn(1000, dim, generator=g), requires_grad=False)
        self.preprocess = ImageTransform(size=(32, 32))

    def config(self) -> dict[str, Any]:
        return {"dim": self.embed_dim, "seed": self.seed, "preprocess": self.preprocess.describe()}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        ids = [[1] + [3 + zlib.crc32(w.lower().encode()) % 997 for w in t.split()] + [2] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (length - len(x)) for x in ids])
        mask = (input_ids > 0).long()
        special = (input_ids == 1) | (input_ids == 2)
        return TextBatch(input_ids, mask, special, list(texts))

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        if self.delay:
            time.sleep(self.delay)
        cells = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).flatten(2).transpose(1, 2)  # [B, 16, 3]
        tokens = cells @ self.colour + self.position
        attention = torch.softmax(tokens.norm(dim=-1), dim=1)
        pooled = (attention[..., None] * tokens).sum(1)
        return ImageTokens(pooled, tokens, attention, (4, 4))

    def text_tokens(self, text: TextBatch) -> TextTokens:
        tokens = self.words[text.input_ids]
        weight = (text.attention_mask.bool() & ~text.special_mask.bool()).float() + 1e-6 * text.attention_mask
        attention = weight / weight.sum(1, keepdim=True)
        pooled = (attention[..., None] * tokens).sum(1)
        return TextTokens(pooled, tokens, attention, text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(pixels).pooled

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).pooled  # type: ignore[arg-type]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid PNG header declaring a huge image (decompression bomb), with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _small(name: str, side: int = 96) -> Image.Image:
    img = Image.open(SKIMAGE_DIR / name)
    img.thumbnail((side, side))
    return img


def make_photo_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """Fill ``root`` with good images and bad files. Returns (good relpaths, bad relpath -> reason)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    good: list[str] = []

    def save(img: Image.Image, rel: str, **kw: Any) -> None:
        img.save(root / rel, **kw)
        good.append(rel)

    save(_small("astronaut.png"), "astronaut.png")
    save(_small("chelsea.png"), "chelsea.png")
    save(_small("coffee.png").convert("RGB"), "coffee.jpg", quality=90)
    save(_small("rocket.jpg"), "sub/rocket.jpg", quality=85)
    save(_small("motorcycle_left.png"), "sub/deeper/motorcycle.webp")
    save(_small("coffee.png").convert("RGB"), "sub/coffee.bmp")
    save(_small("horse.png").convert("L"), "horse.tiff")
    save(_small("astronaut.png").convert("CMYK"), "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save(_small("chelsea.png", 120).crop((0, 0, 120, 60)).convert("RGB"), "rotated.jpg", exif=exif)
    arr16 = (np.asarray(_small("camera.png"), dtype=np.uint16) * 257).astype(np.uint16)
    save(Image.fromarray(arr16), "gray16.png")
    frames = [_small("chelsea.png", 48).convert("P"), _small("coffee.png", 48).convert("RGB").convert("P")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good.append("anim.gif")

    bad: dict[str, str] = {}
    buf = io.BytesIO()
    _small("rocket.jpg").save(buf, format="JPEG")
    (root / "corrupt.jpg").write_bytes(buf.getvalue()[:400])
    bad["corrupt.jpg"] = "corrupt"
    (root / "notes.png").write_text("this is a text file, not a picture\n" * 10)
    bad["notes.png"] = "not_an_image"
    (root / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "empty"
    (root / "sub" / "bomb.png").write_bytes(bomb_png())
    bad["sub/bomb.png"] = "too_large"
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    bad["loop_a.jpg"] = bad["loop_b.jpg"] = "unreadable"
    os.symlink("..", root / "sub" / "deeper" / "up")  # directory loop: must not recurse forever
    (root / "README.txt").write_text("not indexed: not an image extension")
    return sorted(good), bad


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
