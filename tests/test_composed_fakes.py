"""Placeholder composed-retrieval dataset writers (imported by the other test_composed*/test_css/
test_train_combiner files; the encoder is `fakes.HashEncoder`), plus tests of the fake encoder."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fakes import HashEncoder as FakeEncoder


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
    for split, source, lo, hi in (
        ("val", "val", 0, n_pairs),
        ("test1", "test1", 0, n_pairs),
        ("train", "val", n_pairs, 3 * n_pairs),
    ):
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
