"""Pillow/NumPy transforms: shapes, values and geometry of clip / squarepad / targetpad / reid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from calibclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, build_transform

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _norm(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255.0 - MEAN) / STD


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255.0


def test_clip_mode_values_match_pil_reference() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    out = build_transform("clip", 224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    ref = img.resize((299, 224), Image.Resampling.BICUBIC)  # shorter side 480 -> 224, 640 -> 298.67 -> 299
    left = int(round((299 - 224) / 2.0))
    ref = np.asarray(ref.crop((left, 0, left + 224, 224)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    expected = (torch.from_numpy(ref) - MEAN) / STD
    assert torch.allclose(out, expected, atol=1e-5)


def test_uniform_colour_normalisation() -> None:
    out = build_transform("clip", 32)(Image.new("RGB", (50, 40), (128, 64, 32)))
    assert torch.allclose(out, _norm((128, 64, 32)).expand(3, 32, 32), atol=1e-5)


def test_squarepad_pads_with_black_bands() -> None:
    out = build_transform("squarepad", 64)(Image.new("RGB", (200, 100), (255, 255, 255)))
    assert out.shape == (3, 64, 64)
    pixels = _unnorm(out)
    assert torch.allclose(pixels[:, 2, 32], torch.zeros(3), atol=1.0)  # top band
    assert torch.allclose(pixels[:, 61, 32], torch.zeros(3), atol=1.0)  # bottom band
    assert torch.allclose(pixels[:, 32, 32], torch.full((3,), 255.0), atol=1.0)
    assert torch.allclose(pixels[:, 32, 1], torch.full((3,), 255.0), atol=1.0)  # no side bands


def test_targetpad_only_pads_beyond_ratio() -> None:
    t = build_transform("targetpad", 64, target_ratio=1.25)
    wide = t.to_image(Image.new("RGB", (300, 100), (255, 255, 255)))
    assert wide.size == (64, 64)
    col = np.asarray(wide)[:, 32, 0]
    # 300x100 is padded to 300x240: the white band is 100/240 of the height, centred
    white = int((col > 128).sum())
    assert abs(white - round(64 * 100 / 240)) <= 2 and col[0] < 10 and col[-1] < 10
    mild = Image.new("RGB", (110, 100), (255, 255, 255))  # ratio 1.1 <= 1.25: no padding, like clip
    assert torch.equal(t(mild), build_transform("clip", 64)(mild))


def test_reid_resize_is_384x128_for_any_shape() -> None:
    t = build_transform("reid")
    assert t.size == (384, 128) and t.mode == "resize"
    for size in ((64, 128), (500, 300), (20, 20)):
        assert t(Image.new("RGB", size, (10, 20, 30))).shape == (3, 384, 128)
    img = Image.new("RGB", (64, 128), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 64, 64))  # top half white
    pixels = _unnorm(t(img))
    assert pixels[:, 10, 64].min() > 250 and pixels[:, 370, 64].max() < 5


def test_flip_small_images_and_describe() -> None:
    img = Image.new("RGB", (10, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 5, 10))
    t = ImageTransform(size=(16, 16))
    assert torch.equal(t.flipped()(img), torch.flip(t(img), dims=[2]))
    d = t.describe()
    assert json.loads(json.dumps(d)) == d and d["size"] == [16, 16] and d["mode"] == "clip"
    assert ImageTransform(size=(8, 12), mode="resize")(img).shape == (3, 8, 12)
    with pytest.raises(ValueError, match="unknown transform mode"):
        ImageTransform(mode="zoom")


def test_non_rgb_inputs_go_through_the_decoder() -> None:
    t = build_transform("clip", 16)
    grey = t(Image.new("L", (20, 20), 128))
    assert torch.allclose(grey, _norm((128, 128, 128)).expand(3, 16, 16), atol=1e-5)
