"""tools/person_failures.py: the word tests and the failure statistics on a hand-built score matrix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from calibclip.data.records import RetrievalDataset

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("person_failures", REPO / "tools" / "person_failures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_tests() -> None:
    tool = load_tool()
    w = tool.words("A woman in a dark blue T-shirt and black pants, carrying a red bag.")
    assert tool.gender(w) == "f"
    assert tool.gender(tool.words("a man and a woman")) is None
    assert tool.garment_colours(w) == {"top": {"blue"}, "bottom": {"black"}, "bag": {"red"}}
    assert tool.colour_conflict({"top": {"blue"}}, {"top": {"red"}, "shoes": {"white"}}) is True
    assert tool.colour_conflict({"top": {"blue", "white"}}, {"top": {"white"}}) is False
    assert tool.colour_conflict({"top": {"blue"}}, {"bottom": {"blue"}}) is None


def test_analyse_counts_failures_against_the_floor(tmp_path: Path) -> None:
    tool = load_tool()
    # Three people, two images each; one caption per image.
    captions = [
        "a man in a red shirt",  # person 0, image 0
        "a man wearing a red shirt and jeans",  # person 0, image 1
        "a woman in a blue dress",  # person 1, image 2
        "a woman with a blue dress",  # person 1, image 3
        "a man in a green shirt",  # person 2, image 4
        "a man in a green shirt and shorts",  # person 2, image 5
    ]
    data = RetrievalDataset(
        name="toy",
        split="val",
        root=tmp_path,
        images=[tmp_path / f"{i}.jpg" for i in range(6)],
        image_ids=[0, 0, 1, 1, 2, 2],
        captions=captions,
        caption_ids=[0, 0, 1, 1, 2, 2],
        caption_image=[0, 1, 2, 3, 4, 5],
    )
    sim = np.eye(6, dtype=np.float32)
    # Caption 0 ranks person 2's image 4 first (green vs red shirt), its own image second.
    sim[0] = [0.8, 0.1, 0.0, 0.0, 0.9, 0.0]
    # Caption 2 ranks person 0's image 0 first (a man in a red shirt: gender conflict, no shared slot).
    sim[2] = [0.9, 0.0, 0.1, 0.0, 0.0, 0.0]
    stats = tool.analyse(sim, data)
    assert stats["queries"] == 6 and stats["rank1_failures"] == 2
    assert stats["R@1"] == pytest.approx(100 * 4 / 6, abs=0.01)
    assert stats["fail_right_at_2_5_pct"] == 100.0
    assert stats["gender_conflict_top1_wrong_pct"] == 50.0 and stats["gender_conflict_top1_wrong_n"] == 2
    assert stats["colour_conflict_top1_wrong_pct"] == 100.0 and stats["colour_conflict_top1_wrong_n"] == 1
    assert stats["gender_conflict_same_person_pct"] == 0.0
    assert stats["colour_conflict_same_person_pct"] == 0.0
