"""The project's one image decoder: every image enters through `load_image`.

It applies EXIF orientation, converts every colour mode (CMYK, palette, alpha, 16-bit,
greyscale, ...) to 8-bit RGB, takes the first frame of animations, and refuses
decompression-bomb sized images *before* decoding their pixels. Failures raise
`ImageError` with a short machine-readable ``reason`` and a human explanation.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = str | os.PathLike | bytes | Image.Image

#: Largest accepted image, in pixels (width * height). 64 MP covers any camera photo.
MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """An input that cannot be used as an image. ``reason`` is one of
    ``missing, unreadable, empty, not_an_image, corrupt, too_large``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX ...


def open_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (path, bytes or PIL image) into an 8-bit RGB PIL image."""
    if isinstance(source, Image.Image):
        img = source
        if img.width * img.height > max_pixels:
            raise ImageError("too_large", f"image is {img.width}x{img.height}, above the {max_pixels:,}-pixel limit")
        return _to_rgb(ImageOps.exif_transpose(img) or img)
    name = "<bytes>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("empty", "empty input (0 bytes): not an image")
        fp: Any = io.BytesIO(data)
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise ImageError("missing", f"{name}: no such file")
        if not path.is_file():
            raise ImageError("unreadable", f"{name}: not a regular file")
        try:
            size = path.stat().st_size
            if size == 0:
                raise ImageError("empty", f"{name}: empty file (0 bytes)")
            fp = open(path, "rb")
        except OSError as exc:
            raise ImageError("unreadable", f"{name}: cannot read ({exc.strerror or exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageError("too_large", f"{name}: decompression-bomb sized image refused ({exc})") from exc
            except UnidentifiedImageError as exc:
                raise ImageError("not_an_image", f"{name}: not a recognised image format") from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:  # e.g. a JPEG cut inside its header
                raise ImageError("corrupt", f"{name}: corrupt or truncated image header ({exc})") from exc
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    "too_large", f"{name}: image is {width}x{height}, above the {max_pixels:,}-pixel limit"
                )
            try:
                img.seek(0)  # first frame of GIF/TIFF/WebP animations
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return _to_rgb(img)
            except ImageError:
                raise
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad data
                raise ImageError("corrupt", f"{name}: corrupt or truncated image data ({exc})") from exc
    finally:
        if not isinstance(source, Image.Image):
            fp.close()


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Alias of `open_image` (the name most callers use)."""
    return open_image(source, max_pixels=max_pixels)


def is_image_path(path: str | os.PathLike) -> bool:
    """True if the file name has one of the supported image extensions."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)
