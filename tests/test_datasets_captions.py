"""Caption-retrieval loaders: Flickr8k (official layout) and Karpathy-style JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibclip.data.captions import load_flickr8k, load_karpathy
from calibclip.data.records import DatasetError
from calibclip.datasets import load_dataset
from fakes import make_flickr8k, save_person_image


def test_flickr8k_official_layout(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, n_images=4)
    ds = load_flickr8k(root, "dev")
    assert len(ds.images) == 4 and len(ds.captions) == 8
    np.testing.assert_array_equal(ds.caption_image, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(ds.image_ids, np.arange(4))
    assert ds.captions[0].startswith("A red thing") and load_dataset("flickr8k", root, "val").split == "val"


def test_flickr8k_errors(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, n_images=3)
    with pytest.raises(ValueError, match="split must be one of"):
        load_flickr8k(root, "validation")
    (root / "Flicker8k_Dataset" / "1001_abc.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 images of split test are missing.*1001_abc.jpg"):
        load_flickr8k(root, "test")
    (root / "Flickr8k_text" / "Flickr8k.token.txt").unlink()
    with pytest.raises(DatasetError, match="Flickr8k.token.txt is missing.*Found:"):
        load_flickr8k(root, "test")


def make_karpathy(root: Path, name: str = "flickr30k") -> Path:
    images = []
    for i, split in enumerate(["train", "test", "test", "val"]):
        fname = f"{i}.jpg"
        save_person_image(root / "images" / fname, "red", "blue")
        sentences = [{"raw": f"caption {i} {k}", "tokens": ["caption", str(i), str(k)]} for k in range(5)]
        images.append({"filename": fname, "split": split, "sentences": sentences})
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": images, "dataset": name}))
    return root


def test_karpathy_json(tmp_path: Path) -> None:
    root = make_karpathy(tmp_path)
    ds = load_karpathy(root, "test")
    assert ds.name == "flickr30k" and len(ds.images) == 2 and len(ds.captions) == 10
    assert ds.captions[5] == "caption 2 0" and ds.caption_image[5] == 1
    assert load_dataset("karpathy", root, "val").images[0].name == "3.jpg"
    with pytest.raises(DatasetError, match="splits present"):
        load_karpathy(root, "restval")


def test_karpathy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset_flickr8k.json, dataset_flickr30k.json or dataset_coco.json"):
        load_karpathy(tmp_path)


@pytest.mark.shared_data
def test_real_flickr8k_dev(flickr8k_root: Path) -> None:
    ds = load_flickr8k(flickr8k_root, "dev")
    assert len(ds.images) == 1000 and len(ds.captions) == 5000
    assert np.bincount(ds.caption_image).tolist() == [5] * 1000
