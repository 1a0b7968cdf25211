"""Composed metrics against straightforward full-sort reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibclip.evaluation.composed_metrics import (
    cirr_metrics,
    cirr_submission,
    composed_ranks,
    fashioniq_metrics,
    recall_at_k,
    subset_ranks,
)


def _ref_rank(row: np.ndarray, target: int, exclude: int = -1) -> int:
    order = [j for j in np.argsort(-row, kind="stable") if j != exclude]
    return order.index(target)


def _ref_subset_rank(row: np.ndarray, target: int, reference: int, members: list[int]) -> int:
    order = [j for j in np.argsort(-row, kind="stable") if j in members and j != reference]
    return order.index(target)


def _data(seed: int, q: int = 50, g: int = 40, ties: bool = True):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(q, g)).astype(np.float32)
    if ties:
        scores = np.round(scores, 1)  # many exact ties
    ref = rng.integers(0, g, q)
    tgt = (ref + rng.integers(1, g, q)) % g
    subsets = np.full((q, 6), -1)
    for i in range(q):
        others = rng.choice([j for j in range(g) if j not in (ref[i], tgt[i])], size=rng.integers(1, 4), replace=False)
        members = rng.permutation([ref[i], tgt[i], *others])
        subsets[i, : len(members)] = members
    return scores, ref, tgt, subsets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_reference_with_ties(seed: int) -> None:
    scores, ref, tgt, subsets = _data(seed)
    got = composed_ranks(scores, tgt).numpy()
    assert got.tolist() == [_ref_rank(scores[i], tgt[i]) for i in range(len(tgt))]
    got_ex = composed_ranks(torch.from_numpy(scores), tgt, exclude=ref).numpy()
    assert got_ex.tolist() == [_ref_rank(scores[i], tgt[i], ref[i]) for i in range(len(tgt))]
    got_sub = subset_ranks(scores, ref, tgt, subsets).numpy()
    want_sub = [_ref_subset_rank(scores[i], tgt[i], ref[i], [m for m in subsets[i] if m >= 0]) for i in range(len(tgt))]
    assert got_sub.tolist() == want_sub


def test_blocked_ranking_equals_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import calibclip.evaluation.composed_metrics as cm

    scores, ref, tgt, _ = _data(5, q=37)
    full = composed_ranks(scores, tgt, exclude=ref)
    monkeypatch.setattr(cm, "BLOCK", 8)
    assert torch.equal(cm.composed_ranks(scores, tgt, exclude=ref), full)


def test_cirr_metrics_values() -> None:
    scores, ref, tgt, subsets = _data(3, q=80, g=60)
    m = cirr_metrics(scores, ref, tgt, subsets)
    ranks = np.array([_ref_rank(scores[i], tgt[i], ref[i]) for i in range(len(tgt))])
    sub = np.array(
        [_ref_subset_rank(scores[i], tgt[i], ref[i], [x for x in subsets[i] if x >= 0]) for i in range(len(tgt))]
    )
    for k in (1, 5, 10, 50):
        assert m[f"R@{k}"] == pytest.approx(100 * np.mean(ranks < k), abs=1e-9)
    for k in (1, 2, 3):
        assert m[f"Rsubset@{k}"] == pytest.approx(100 * np.mean(sub < k), abs=1e-9)
    assert m["avg"] == pytest.approx((m["R@5"] + m["Rsubset@1"]) / 2)
    assert list(m) == ["R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "avg"]
    assert list(cirr_metrics(scores, ref, tgt, None)) == ["R@1", "R@5", "R@10", "R@50"]


def test_reference_removal_changes_the_ranking() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.9, 0.95]])
    ref, tgt = np.array([0, 2]), np.array([1, 1])
    assert composed_ranks(scores, tgt).tolist() == [1, 1]
    assert composed_ranks(scores, tgt, exclude=ref).tolist() == [0, 0]
    with pytest.raises(ValueError, match="also its target"):
        composed_ranks(scores, tgt, exclude=tgt)


def test_fashioniq_metrics_keys_and_average() -> None:
    rng = np.random.default_rng(0)
    per_cat = {}
    for cat in ("dress", "shirt", "toptee"):
        s = rng.normal(size=(30, 120))
        per_cat[cat] = (s, rng.integers(0, 120, 30))
    m = fashioniq_metrics(per_cat)
    assert list(m) == [
        "dress_R@10",
        "dress_R@50",
        "shirt_R@10",
        "shirt_R@50",
        "toptee_R@10",
        "toptee_R@50",
        "avg_R@10",
        "avg_R@50",
        "avg",
    ]
    for cat, (s, t) in per_cat.items():
        ranks = np.array([_ref_rank(s[i], t[i]) for i in range(len(t))])
        assert m[f"{cat}_R@10"] == pytest.approx(100 * np.mean(ranks < 10))
        assert m[f"{cat}_R@50"] == pytest.approx(100 * np.mean(ranks < 50))
    assert m["avg"] == pytest.approx((m["avg_R@10"] + m["avg_R@50"]) / 2)
    assert m["avg_R@10"] == pytest.approx(np.mean([m[f"{c}_R@10"] for c in per_cat]))


def test_recall_at_k() -> None:
    assert recall_at_k([0, 1, 5, 60], (1, 5, 50)) == {"R@1": 25.0, "R@5": 50.0, "R@50": 75.0}


def test_cirr_submission_format() -> None:
    scores, ref, _, subsets = _data(4, q=5, g=60, ties=False)
    names = [f"img{i}" for i in range(60)]
    recall, subset = cirr_submission(scores, ref, subsets, [101, 102, 103, 104, 105], names)
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    for q, pid in enumerate(range(101, 106)):
        top = recall[str(pid)]
        assert len(top) == 50 and names[ref[q]] not in top
        assert top == [names[j] for j in np.argsort(-scores[q]) if j != ref[q]][:50]
        members = [m for m in subsets[q] if m >= 0 and m != ref[q]]
        assert subset[str(pid)] == [names[j] for j in np.argsort(-scores[q]) if j in members][:3]
