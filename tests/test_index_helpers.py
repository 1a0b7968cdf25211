"""Shared helpers for the index tests (no tests here): `FakeEncoder` (= `fakes.PhotoEncoder`) and a folder
of real photos (scikit-image's samples) mixed with every kind of bad file."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from fakes import PhotoEncoder as FakeEncoder  # noqa: F401  (re-exported: the one toy indexing encoder)

SKIMAGE_DIR = Path(os.path.dirname(skimage.data.__file__))


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
