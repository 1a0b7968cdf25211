"""The CSS-style benchmark generator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibclip.cli.main import main
from calibclip.composed.css import HELD_OUT, KINDS, _Sampler, draw_scene, make_css
from calibclip.data.composed import load_css


@pytest.fixture(scope="module")
def css_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("css") / "bench"
    assert (
        main(
            [
                "make-css",
                "--out",
                str(root),
                "--seed",
                "3",
                "--n-train",
                "40",
                "--n-val",
                "8",
                "--n-test",
                "24",
                "--size",
                "64",
                "--json",
            ]
        )
        == 0
    )
    return root


def test_layout_loads_with_the_cirr_loader(css_root: Path) -> None:
    info = json.loads((css_root / "README.json").read_text())
    # train also holds the inverse of every query (target -> reference)
    assert info["splits"]["train"]["queries"] == 80 and info["splits"]["test"]["queries"] == 24
    for split, n in (("train", 80), ("val", 8), ("test", 24)):
        ds = load_css(css_root, split)
        assert len(ds) == n and ds.has_targets and ds.subsets is not None
        assert len(set(ds.image_names)) == len(ds.images)
        assert (ds.reference != ds.target).all()
        assert (ds.subsets == ds.target[:, None]).any(1).all() and (ds.subsets[:, 0] == ds.reference).all()
        if split == "train":  # pair k + n is the inverse of pair k
            half = n // 2
            assert (ds.reference[half:] == ds.target[:half]).all() and (ds.target[half:] == ds.reference[:half]).all()
        with Image.open(ds.images[0]) as im:
            assert im.size == (64, 64)
        ref = np.asarray(Image.open(ds.images[ds.reference[0]]))
        tgt = np.asarray(Image.open(ds.images[ds.target[0]]))
        assert (ref != tgt).any()
    pair_ids = [p for s in ("train", "val", "test") for p in load_css(css_root, s).pair_ids]
    assert len(set(pair_ids)) == len(pair_ids)


def test_held_out_pairs_only_in_test(css_root: Path) -> None:
    def mentions_held_out(text: str) -> bool:
        words = text.split()
        return any((a, b) in HELD_OUT for a, b in zip(words, words[1:]))

    for split in ("train", "val"):
        pairs = json.loads((css_root / "captions" / f"cap.rc2.{split}.json").read_text())
        assert not any(p["novel"] or mentions_held_out(p["caption"]) for p in pairs)
    test = json.loads((css_root / "captions" / "cap.rc2.test.json").read_text())
    assert any(p["novel"] for p in test)
    sampler = _Sampler(random.Random(0), allow_held_out=False)
    for _ in range(300):
        scene = sampler.scene()
        for kind in KINDS:
            out = sampler.modify(scene, kind)
            if out is not None:
                assert not any((o.colour, o.shape) in HELD_OUT for o in out[0] + scene)
                assert not mentions_held_out(out[1]) and not mentions_held_out(out[2])


def test_texts_say_what_changes() -> None:
    rng = random.Random(1)
    sampler = _Sampler(rng, allow_held_out=True)
    seen = set()
    for _ in range(200):
        scene = sampler.scene()
        kind = rng.choice(KINDS)
        out = sampler.modify(scene, kind)
        if out is None:
            continue
        new, text, inverse = out
        seen.add(kind)
        if kind == "add":
            assert len(new) == len(scene) + 1 and text.startswith("add a ") and inverse.startswith("remove the ")
        elif kind == "remove":
            assert len(new) == len(scene) - 1 and text.startswith("remove the ") and inverse.startswith("add a ")
        else:
            assert len(new) == len(scene) and set(new) != set(scene)
            before, after = text.split(), inverse.split()
            if kind == "colour":  # "make the top-left red circle blue" <-> "make the top-left blue circle red"
                assert (after[3], after[-1]) == (before[-1], before[3])
            elif kind == "size":
                assert {before[-1], after[-1]} == {"bigger", "smaller"}
    assert seen == set(KINDS)


def test_deterministic_and_refuses_overwrite(tmp_path: Path) -> None:
    a = make_css(tmp_path / "a", seed=5, n_train=8, n_val=4, n_test=4, size=32, progress=False)
    b = make_css(tmp_path / "b", seed=5, n_train=8, n_val=4, n_test=4, size=32, progress=False)
    assert a == b
    for split in ("train", "test"):
        assert (tmp_path / "a/captions" / f"cap.rc2.{split}.json").read_text() == (
            tmp_path / "b/captions" / f"cap.rc2.{split}.json"
        ).read_text()
    assert (tmp_path / "a/test/css-test-000003.png").read_bytes() == (
        tmp_path / "b/test/css-test-000003.png"
    ).read_bytes()
    with pytest.raises(ValueError, match="already holds a benchmark"):
        make_css(tmp_path / "a", seed=5, n_train=8, n_val=4, n_test=4, size=32, progress=False)
    assert draw_scene(()).getextrema() == ((255, 255),) * 3
