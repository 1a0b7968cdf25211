"""Image preprocessing with Pillow/NumPy only (no torchvision).

Each transform is a small callable object: PIL image (or anything `load_image` accepts)
-> float tensor ``[3, H, W]``; ``describe()`` returns a JSON-able dict that identifies it
(recorded in indexes and feature caches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from calibclip.data.images import ImageInput, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: TF-Lite convention ((x - 127) / 128) expressed on [0, 1] pixels.
TFLITE_MEAN = (127.0 / 255.0,) * 3
TFLITE_STD = (128.0 / 255.0,) * 3

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resize_shorter(img: Image.Image, size: int, resample: str) -> Image.Image:
    w, h = img.size
    if w <= h:
        new_w, new_h = size, max(1, round(h * size / w))
    else:
        new_w, new_h = max(1, round(w * size / h)), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), RESAMPLE[resample])


def _center_crop(img: Image.Image, out_h: int, out_w: int) -> Image.Image:
    w, h = img.size
    if w < out_w or h < out_h:  # pad like torchvision's CenterCrop
        canvas = Image.new("RGB", (max(w, out_w), max(h, out_h)), (0, 0, 0))
        canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        img, (w, h) = canvas, canvas.size
    left = int(round((w - out_w) / 2.0))
    top = int(round((h - out_h) / 2.0))
    return img.crop((left, top, left + out_w, top + out_h))


def _pad_to_ratio(img: Image.Image, target_ratio: float | None) -> Image.Image:
    """Pad with black to a square (``target_ratio=None``) or until max/min side <= ratio."""
    w, h = img.size
    if target_ratio is None:
        side = max(w, h)
        new_w = new_h = side
    else:
        if max(w, h) / min(w, h) <= target_ratio:
            return img
        if w >= h:
            new_w, new_h = w, int(round(w / target_ratio))
        else:
            new_w, new_h = int(round(h / target_ratio)), h
    canvas = Image.new("RGB", (new_w, new_h), (0, 0, 0))
    canvas.paste(img, ((new_w - w) // 2, (new_h - h) // 2))
    return canvas


@dataclass
class ImageTransform:
    """Resize/crop/pad + normalise.

    mode:  ``clip`` (resize shorter side to ``size[0]``, centre crop ``size``),
           ``squarepad`` (pad to square, then clip), ``targetpad`` (pad to ``target_ratio``, then
           clip; CLIP4Cir), ``resize`` (direct resize to ``size``, e.g. person re-id 384x128).
    size:  ``(height, width)``.
    """

    size: tuple[int, int] = (224, 224)
    mode: str = "clip"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    target_ratio: float = 1.25
    hflip: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("clip", "squarepad", "targetpad", "resize"):
            raise ValueError(f"unknown transform mode {self.mode!r}: use clip, squarepad, targetpad or resize")
        self.size = (int(self.size[0]), int(self.size[1]))
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)

    def to_image(self, source: ImageInput) -> Image.Image:
        """Geometric part only (useful for visualisation): returns the cropped RGB image."""
        img = load_image(source)
        out_h, out_w = self.size
        if self.mode == "resize":
            img = img.resize((out_w, out_h), RESAMPLE[self.resample])
        else:
            if self.mode == "squarepad":
                img = _pad_to_ratio(img, None)
            elif self.mode == "targetpad":
                img = _pad_to_ratio(img, self.target_ratio)
            img = _resize_shorter(img, min(out_h, out_w), self.resample)
            img = _center_crop(img, out_h, out_w)
        if self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __call__(self, source: ImageInput) -> torch.Tensor:
        img = self.to_image(source)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        arr = (arr - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(arr))

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def flipped(self) -> ImageTransform:
        """The same transform with a horizontal flip."""
        d = asdict(self)
        d["hflip"] = not self.hflip
        return ImageTransform(**d)


def build_transform(
    name: str = "clip",
    size: int | tuple[int, int] = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    target_ratio: float = 1.25,
) -> ImageTransform:
    """Factory by name: ``clip``, ``squarepad``, ``targetpad``, ``reid`` (384x128 resize)."""
    if name == "reid":
        hw = (
            (384, 128) if isinstance(size, int) and size == 224 else (size if isinstance(size, tuple) else (size, size))
        )
        return ImageTransform(size=hw, mode="resize", mean=mean, std=std)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return ImageTransform(size=hw, mode=name, mean=mean, std=std, target_ratio=target_ratio)  # type: ignore[arg-type]
