"""Person-retrieval loaders on tiny datasets generated in each official format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibclip.data.person import load_cuhkpedes, load_icfgpedes, load_person, load_rstpreid
from calibclip.data.records import DatasetError
from calibclip.datasets import canonical_dataset, load_dataset
from fakes import PEOPLE, make_person_dataset


@pytest.mark.parametrize(
    "fmt,loader", [("cuhkpedes", load_cuhkpedes), ("icfgpedes", load_icfgpedes), ("rstpreid", load_rstpreid)]
)
def test_loads_test_split(fmt: str, loader, tmp_path: Path) -> None:
    root = make_person_dataset(tmp_path / fmt, fmt, images_per_id=2)
    ds = loader(root, "test")
    test_ids = [pid for pid in PEOPLE if pid > 2]
    assert ds.name == fmt and ds.split == "test" and ds.info["task"] == "person"
    assert len(ds.images) == 2 * len(test_ids) and len(ds.captions) == 4 * len(test_ids)
    assert sorted(set(ds.image_ids.tolist())) == test_ids
    assert all(
        p.is_file() and p.parent.parent.name in ("imgs", "cam0", "cam1") or p.parent.name == "imgs" for p in ds.images
    )
    # every caption's id is the id of the image it was written for
    np.testing.assert_array_equal(ds.caption_ids, ds.image_ids[ds.caption_image])
    assert ds.captions[0].startswith("a person with a yellow shirt")
    train = load_person(fmt, root, "train")
    assert sorted(set(train.image_ids.tolist())) == [1, 2]


def test_parent_folder_and_alias(tmp_path: Path) -> None:
    make_person_dataset(tmp_path / "RSTPReid", "rstpreid")
    ds = load_dataset("rstp", tmp_path, "test")  # ROOT may contain the official folder
    assert canonical_dataset("RSTP") == "rstpreid" and ds.name == "rstpreid"
    assert ds.root == tmp_path / "RSTPReid"


def test_missing_annotation_lists_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as exc:
        load_cuhkpedes(tmp_path)
    msg = str(exc.value)
    assert "reid_raw.json" in msg and "notes.txt" in msg and "imgs/" in msg


def test_wrong_dataset_is_recognised(tmp_path: Path) -> None:
    make_person_dataset(tmp_path, "rstpreid")
    with pytest.raises(
        DatasetError, match=r"looks like RSTPReid \(data_captions.json is present\): use --dataset rstpreid"
    ):
        load_icfgpedes(tmp_path)


def test_caption_all_variant_explains_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "caption_all.json").write_text(json.dumps([{"id": 1, "file_path": "a.png", "captions": ["x"]}]))
    with pytest.raises(DatasetError, match="caption_all.json.*no train/val/test split.*reid_raw.json"):
        load_cuhkpedes(tmp_path)


def test_missing_images_are_listed(tmp_path: Path) -> None:
    root = make_person_dataset(tmp_path, "cuhkpedes")
    victim = next((root / "imgs" / "cam1").glob("0005_1.png"))
    victim.unlink()
    with pytest.raises(DatasetError, match=r"1 of 10 images of the test split are missing.*cam1/0005_1.png"):
        load_cuhkpedes(root, "test")
    load_cuhkpedes(root, "train")  # other splits are unaffected


def test_bad_fields_split_and_json(tmp_path: Path) -> None:
    root = make_person_dataset(tmp_path, "icfgpedes")
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]"):
        load_icfgpedes(root, "val")
    entries = json.loads((root / "ICFG-PEDES.json").read_text())
    entries[3].pop("file_path")
    (root / "ICFG-PEDES.json").write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"entry 3 lacks field\(s\) \['file_path'\]"):
        load_icfgpedes(root)
    (root / "ICFG-PEDES.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_icfgpedes(root)
    only_train = make_person_dataset(tmp_path / "t", "rstpreid")
    data = [dict(e, split="train") for e in json.loads((only_train / "data_captions.json").read_text())]
    (only_train / "data_captions.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"no entries of split 'test'; splits present: \['train'\]"):
        load_rstpreid(only_train)


def test_missing_image_folder(tmp_path: Path) -> None:
    root = make_person_dataset(tmp_path, "rstpreid")
    (root / "imgs").rename(root / "images")
    with pytest.raises(DatasetError, match=r"image folder .*imgs is missing.*images/"):
        load_rstpreid(root)
