"""Annotation loaders on wrongly typed, undecodable or escaping files (issue 15 item 8): every problem is a
`DatasetError`/`ValueError` naming the file (and the entry number), never a TypeError/KeyError traceback, and
no annotation path can make a loader open a file outside the data root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from calibclip.data.captions import load_flickr8k, load_karpathy
from calibclip.data.composed import load_cirr, load_fashioniq
from calibclip.data.person import load_cuhkpedes
from calibclip.data.records import DatasetError
from calibclip.evaluation.config import load_config
from fakes import make_flickr8k, make_person_dataset
from test_datasets_captions import make_karpathy


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


# --- person retrieval (CUHK-PEDES format) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: [{**d[0], "captions": 5}, *d[1:]], r'entry 0 has "captions" number'),  # was TypeError
        (lambda d: [d[0], 7, *d[2:]], r"entry 1 is a number, not an object"),
        (lambda d: [{**d[0], "id": "abc"}, *d[1:]], r'entry 0 has "id" string'),  # was ValueError: int()
        (lambda d: [{**d[0], "file_path": "../../../etc/hostname"}, *d[1:]], r"leads outside the data root"),
        (lambda d: [{**d[0], "file_path": "/etc/hostname"}, *d[1:]], r"leads outside the data root"),
        (lambda d: {"images": d}, r"expected a non-empty JSON list of annotations, got object"),
    ],
)
def test_person_record_types(tmp_path: Path, mutate, expect) -> None:
    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    ann = root / "reid_raw.json"
    _edit_json(ann, mutate)
    with pytest.raises(DatasetError, match=expect) as info:
        load_cuhkpedes(root, "test")
    assert str(ann) in str(info.value)


def test_person_not_utf8_names_file(tmp_path: Path) -> None:
    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    ann = root / "reid_raw.json"
    ann.write_bytes(ann.read_bytes().replace(b"person", b"p\xe9rson", 1))
    with pytest.raises(DatasetError, match="is not UTF-8") as info:
        load_cuhkpedes(root, "test")
    assert str(ann) in str(info.value)


# --- Karpathy JSON and Flickr8k --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d["images"], r"expected a JSON object with an 'images' list, got list"),  # was AttributeError
        (lambda d: {**d, "images": "0.jpg"}, r"'images' is string"),  # was AttributeError
        (
            lambda d: {
                **d,
                "images": [{k: v for k, v in d["images"][0].items() if k != "sentences"}, *d["images"][1:]],
            },
            r"entry 0 of 'images' lacks field\(s\) \['sentences'\]",
        ),  # was KeyError
        (
            lambda d: {
                **d,
                "images": [*d["images"][:1], {**d["images"][1], "sentences": [{"raw": 3}]}, *d["images"][2:]],
            },
            r"entry 1 of 'images' has sentence 0",
        ),
        (
            lambda d: {**d, "images": [{**d["images"][0], "filename": "../../etc/hostname"}, *d["images"][1:]]},
            r"leads outside the data root",
        ),
    ],
)
def test_karpathy_record_types(tmp_path: Path, mutate, expect) -> None:
    root = make_karpathy(tmp_path)
    ann = root / "dataset_flickr30k.json"
    _edit_json(ann, mutate)
    with pytest.raises(DatasetError, match=expect) as info:
        load_karpathy(root, "test")
    assert str(ann) in str(info.value)


@pytest.mark.parametrize("content, expect", [(b'{"images": [', "is not valid JSON"), (b'{"images": "\xff"}', "UTF-8")])
def test_karpathy_bad_bytes_name_file(tmp_path: Path, content: bytes, expect: str) -> None:
    root = make_karpathy(tmp_path)
    ann = root / "dataset_flickr30k.json"
    ann.write_bytes(content)
    with pytest.raises(DatasetError, match=expect) as info:
        load_karpathy(root, "test")
    assert str(ann) in str(info.value)


def test_flickr8k_token_file_not_utf8_names_file(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path / "f8k", n_images=3)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_bytes(token.read_bytes() + b"x.jpg#0\tcaf\xe9\n")
    with pytest.raises(DatasetError, match="not UTF-8") as info:
        load_flickr8k(root, "dev")
    assert str(token) in str(info.value)


# --- YAML configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, expect",
    [(b"model: [unclosed\n", r"not valid YAML at line \d"), (b"model:\n  name: caf\xe9\n", "not UTF-8")],
)
def test_yaml_config_errors_name_file(tmp_path: Path, content: bytes, expect: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    with pytest.raises(ValueError, match=expect) as info:
        load_config(cfg)
    assert str(cfg) in str(info.value)


def test_yaml_config_no_object_construction(tmp_path: Path) -> None:
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML") as info:
        load_config(cfg)
    assert str(cfg) in str(info.value)


# --- CIRR layout and FashionIQ ---------------------------------------------------------------------------------
def make_cirr(root: Path, n: int = 4) -> Path:
    names = [f"dev-{i}-0-img0" for i in range(n)]
    for name in names:
        (root / "dev").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * len(name) % 255, 0, 0)).save(root / "dev" / f"{name}.png")
    pairs = [
        {
            "pairid": i,
            "reference": names[i],
            "target_hard": names[(i + 1) % n],
            "caption": f"change {i}",
            "img_set": {"members": names},
        }
        for i in range(n)
    ]
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(pairs))
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps({n: f"./dev/{n}.png" for n in names}))
    return root


def test_cirr_valid_synthetic(tmp_path: Path) -> None:
    ds = load_cirr(make_cirr(tmp_path / "cirr"), "val")
    assert len(ds) == 4 and ds.has_targets and ds.subsets.shape == (4, 4)


@pytest.mark.parametrize(
    "which, mutate, expect",
    [
        ("captions", lambda d: {"0": d[0]}, r"expected a JSON list of .* got object"),  # was AttributeError
        ("captions", lambda d: [{**d[0], "caption": ["x"]}, *d[1:]], r'entry 0 has "caption" list'),
        (
            "captions",
            lambda d: [d[0], {k: v for k, v in d[1].items() if k != "pairid"}, *d[2:]],
            r"entry 1 lacks field\(s\) \['pairid'\]",
        ),
        ("captions", lambda d: [{**d[0], "img_set": 3}, *d[1:]], r'entry 0 has "img_set" 3'),
        ("splits", lambda d: list(d), r"expected a JSON object mapping image names"),
        ("splits", lambda d: {**d, "dev-0-0-img0": "../../../../etc/hostname"}, r"leads outside the data root"),
        ("splits", lambda d: {**d, "dev-0-0-img0": "/etc/hostname"}, r"leads outside the data root"),
    ],
)
@pytest.mark.parametrize("check_images", [True, False])
def test_cirr_record_types_and_escapes(tmp_path: Path, which: str, mutate, expect: str, check_images: bool) -> None:
    root = make_cirr(tmp_path / "cirr")
    path = root / ("captions/cap.rc2.val.json" if which == "captions" else "image_splits/split.rc2.val.json")
    _edit_json(path, mutate)
    with pytest.raises(DatasetError, match=expect) as info:
        load_cirr(root, "val", check_images=check_images)
    assert str(path) in str(info.value)


def make_fashioniq(root: Path) -> Path:
    names = ["B001", "B002", "B003"]
    (root / "images").mkdir(parents=True)
    for n in names:
        Image.new("RGB", (8, 8)).save(root / "images" / f"{n}.jpg")
    (root / "captions").mkdir()
    (root / "image_splits").mkdir()
    (root / "captions" / "cap.dress.val.json").write_text(
        json.dumps([{"candidate": "B001", "target": "B002", "captions": ["is red", "longer"]}])
    )
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(names))
    return root


@pytest.mark.parametrize(
    "which, content, expect",
    [
        ("split", ["B001", "../../etc/hostname"], r"entry 1 is string '../../etc/hostname', refused"),
        ("split", {"B001": 1}, r"expected a JSON list of image names"),
        ("captions", [{"candidate": "B001", "target": "B002", "captions": "is red"}], r'entry 0 has "captions" string'),
        ("captions", [["B001", "B002"]], r"entry 0 is a list, not an object"),
    ],
)
@pytest.mark.parametrize("check_images", [True, False])
def test_fashioniq_record_types_and_escapes(tmp_path: Path, which, content, expect, check_images) -> None:
    root = make_fashioniq(tmp_path / "fiq")
    assert len(load_fashioniq(root, "val", categories=["dress"])["dress"]) == 1
    path = root / ("image_splits/split.dress.val.json" if which == "split" else "captions/cap.dress.val.json")
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=expect) as info:
        load_fashioniq(root, "val", categories=["dress"], check_images=check_images)
    assert str(path) in str(info.value)
