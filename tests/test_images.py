"""`load_image` on bad and unusual inputs: every failure is an `ImageError` with a reason; every colour
mode becomes 8-bit RGB; EXIF orientation is applied; decompression bombs are refused before decoding."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibclip.data.images import ImageError, is_image_path, load_image


def _jpeg(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _png(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _reason(source: object) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source)  # type: ignore[arg-type]
    return info.value.reason


def test_truncated_and_corrupt_jpeg(tmp_path: Path) -> None:
    data = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path) == "corrupt"
    header_only = tmp_path / "header.jpg"
    header_only.write_bytes(data[:20])
    assert _reason(header_only) in ("corrupt", "not_an_image")
    garbage = bytearray(data)
    garbage[200:] = b"\xff" * (len(data) - 200)
    assert _reason(bytes(garbage)) == "corrupt"


def test_text_file_renamed_jpg_zero_byte_and_missing(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("definitely not a JPEG\n" * 10)
    assert _reason(text) == "not_an_image"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _reason(empty) == "empty"
    assert _reason(b"") == "empty"
    assert _reason(tmp_path / "missing.jpg") == "missing"
    assert _reason(tmp_path) == "unreadable"
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(text)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path) -> None:
    """A tiny PNG whose header claims 100000 x 100000 pixels (10 gigapixels)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert path.stat().st_size < 200
    with pytest.raises(ImageError, match="100000x100000|decompression") as info:
        load_image(path)
    assert info.value.reason == "too_large"
    # the limit is configurable and also applies to in-memory PIL images
    assert _reason_with_limit(Image.new("RGB", (100, 100)), 5_000) == "too_large"


def _reason_with_limit(img: Image.Image, limit: int) -> str:
    with pytest.raises(ImageError) as info:
        load_image(img, max_pixels=limit)
    return info.value.reason


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = load_image(_jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))  # pure red in CMYK
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied() -> None:
    """Stored 40x20 with red left half, EXIF orientation 6 (rotate 90 degrees clockwise to display):
    displayed 20x40 with red on top."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(_jpeg(img, exif=exif.tobytes()))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 3)), out.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_16bit_png_is_scaled_to_8bit() -> None:
    arr = np.zeros((4, 4), dtype=np.uint16)
    arr[0, 0], arr[1, 1] = 65535, 32768
    out = load_image(_png(Image.fromarray(arr)))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1))[0] in (127, 128)
    assert out.getpixel((3, 3)) == (0, 0, 0)


def test_palette_with_transparency_is_composited_on_white() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = load_image(_png(pal, transparency=0))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert out.getpixel((1, 1)) == (0, 255, 0)


def test_rgba_and_greyscale_modes() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((2, 2), (0, 0, 255, 255))
    out = load_image(_png(rgba))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (0, 0, 255)
    grey = load_image(_png(Image.new("L", (4, 4), 77)))
    assert grey.mode == "RGB" and grey.getpixel((1, 1)) == (77, 77, 77)
    la = load_image(_png(Image.new("LA", (4, 4), (10, 255))))
    assert la.getpixel((0, 0)) == (10, 10, 10)
    one_bit = load_image(_png(Image.new("1", (4, 4), 1)))
    assert one_bit.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    r, _, b = out.getpixel((4, 4))
    assert r > 200 and b < 50


def test_inputs_path_bytes_and_pil_agree(tmp_path: Path) -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 10, 3), dtype=np.uint8))
    data = _png(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    arrays = [np.asarray(load_image(s)) for s in (path, str(path), data, img)]
    for a in arrays[1:]:
        assert np.array_equal(arrays[0], a)
    assert is_image_path("a/b/C.JPG") and not is_image_path("notes.txt")
