"""Metric parity: the fast metrics equal a straightforward full-sort reference (IRRA's `rank`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibclip.evaluation import caption_metrics, retrieval_metrics
from calibclip.evaluation import metrics as metrics_module

torch.set_num_threads(1)


def reference_rank_metrics(sim: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, ks=(1, 5, 10)) -> dict:
    """IRRA's utils/metrics.py `rank`, with a stable descending sort (ties: lower index first)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    matches = g_ids[order] == q_ids[:, None]
    cmc = np.minimum(matches.cumsum(1), 1)
    out = {f"R@{k}": cmc[:, min(k, sim.shape[1]) - 1].mean() * 100 for k in ks}
    num_rel = matches.sum(1)
    tmp = matches.cumsum(1)
    last = np.array([np.nonzero(row)[0][-1] for row in matches])
    out["mINP"] = np.mean(tmp[np.arange(len(sim)), last] / (last + 1.0)) * 100
    precision = tmp / np.arange(1, sim.shape[1] + 1)[None, :]
    out["mAP"] = np.mean((precision * matches).sum(1) / num_rel) * 100
    return out


def reference_caption_metrics(sim: np.ndarray, cap_img: np.ndarray, ks=(1, 5, 10)) -> dict:
    out = {}
    order = np.argsort(-sim, axis=1, kind="stable")
    for k in ks:
        out[f"t2i_R@{k}"] = np.mean([cap_img[i] in order[i, :k] for i in range(len(sim))]) * 100
    images = np.unique(cap_img)
    order_t = np.argsort(-sim.T[images], axis=1, kind="stable")
    for k in ks:
        out[f"i2t_R@{k}"] = np.mean([np.any(cap_img[order_t[r, :k]] == im) for r, im in enumerate(images)]) * 100
    return out


def random_case(rng: np.random.Generator, n_q: int, n_g: int, n_ids: int, levels: int | None):
    g_ids = rng.integers(0, n_ids, n_g)
    g_ids[: min(n_ids, n_g)] = np.arange(min(n_ids, n_g))  # every id present at least once
    q_ids = rng.choice(np.unique(g_ids), n_q)
    sim = rng.standard_normal((n_q, n_g)).astype(np.float32)
    if levels:  # quantised similarities: many exact ties, including with the positives
        sim = np.round(sim * levels / 3) / levels
        sim = sim.astype(np.float32)
    return sim, q_ids, g_ids


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


@pytest.fixture(
    params=[((), 0), ((3,), 0), ((2, 16), 0), ((64, 1024), 0), ((64, 1024), 16), ((3,), 2), ((), 1000)],
    ids=["count", "top3", "top2-16", "top-default", "default", "scan2-top3", "scan-all"],
)
def top_levels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[int, ...]:
    """Force each code path: whole-row counting, small top sets with fallback, per-positive scans
    (``SCAN_MAX_POSITIVES``; 0 = off, 2 = a mix of scanned and top-set rows), the defaults."""
    levels, scan = request.param
    monkeypatch.setattr(metrics_module, "TOP_LEVELS", levels)
    monkeypatch.setattr(metrics_module, "SCAN_MAX_POSITIVES", scan)
    monkeypatch.setattr(metrics_module, "SCAN_THREADS", 2)
    return levels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 2, 8])
def test_retrieval_metrics_match_reference(seed: int, levels: int | None, top_levels: tuple) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_g = int(rng.integers(1, 60)), int(rng.integers(1, 80))
    n_ids = int(rng.integers(1, n_g + 1))  # from one id for everything to one image per id
    sim, q_ids, g_ids = random_case(rng, n_q, n_g, n_ids, levels)
    assert_close(retrieval_metrics(sim, q_ids, g_ids), reference_rank_metrics(sim, q_ids, g_ids))


def test_chunking_and_torch_input(monkeypatch: pytest.MonkeyPatch, top_levels: tuple) -> None:
    rng = np.random.default_rng(7)
    sim, q_ids, g_ids = random_case(rng, 97, 120, 30, levels=4)
    want = reference_rank_metrics(sim, q_ids, g_ids)
    monkeypatch.setattr(metrics_module, "CHUNK_ELEMENTS", 500)  # many small chunks
    assert_close(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(q_ids), list(g_ids)), want)
    assert_close(retrieval_metrics(sim.astype(np.float64), q_ids, g_ids), want)


def test_ties_rank_lower_index_first() -> None:
    sim = np.zeros((2, 4), dtype=np.float32)  # everything tied
    # query 0 matches gallery 3 only -> rank 4; query 1 matches gallery 0 -> rank 1
    m = retrieval_metrics(sim, [5, 6], [6, 1, 2, 5], ks=(1, 4))
    assert m["R@1"] == 50.0 and m["R@4"] == 100.0
    assert m["mAP"] == pytest.approx((1 / 4 + 1) / 2 * 100)


def test_hand_computed_example() -> None:
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    m = retrieval_metrics(sim, [1], [0, 1, 0, 1, 1], ks=(1, 2))  # positives at ranks 2, 4, 5
    assert m["R@1"] == 0.0 and m["R@2"] == 100.0
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3 * 100)
    assert m["mINP"] == pytest.approx(3 / 5 * 100)


def test_query_without_positive_is_an_error(top_levels: tuple) -> None:
    with pytest.raises(ValueError, match="no matching gallery item"):
        retrieval_metrics(np.zeros((2, 3)), [0, 9], [0, 1, 2])
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN"):
            retrieval_metrics(np.array([[0.5, 1.0], [bad, 1.0]]), [0, 1], [0, 1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 3])
def test_caption_metrics_match_reference(seed: int, levels: int | None, top_levels: tuple) -> None:
    rng = np.random.default_rng(100 + seed)
    n_img = int(rng.integers(1, 40))
    cap_img = np.repeat(np.arange(n_img), rng.integers(1, 6, n_img))
    sim = rng.standard_normal((len(cap_img), n_img)).astype(np.float32)
    if levels:
        sim = (np.round(sim * levels) / levels).astype(np.float32)
    assert_close(caption_metrics(sim, cap_img), reference_caption_metrics(sim, cap_img))


def test_caption_metrics_perfect_and_image_without_caption() -> None:
    cap_img = np.array([0, 0, 2, 2])  # image 1 has no caption: not an i2t query
    sim = np.full((4, 3), -1.0)
    sim[np.arange(4), cap_img] = 1.0
    m = caption_metrics(sim, cap_img)
    assert all(v == 100.0 for v in m.values())
    assert set(m) == {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}


def test_medium_matrix_is_exact(top_levels: tuple) -> None:
    rng = np.random.default_rng(3)
    sim, q_ids, g_ids = random_case(rng, 300, 900, 300, levels=None)
    first_match = np.array([np.flatnonzero(g_ids == q)[0] for q in q_ids])
    easy = rng.random(300) < 0.7  # a mix of easy queries (resolved in the top set) and hard ones
    sim[np.flatnonzero(easy), first_match[easy]] += 3.0
    assert_close(retrieval_metrics(sim, q_ids, g_ids), reference_rank_metrics(sim, q_ids, g_ids))


def test_positive_ranks_are_the_stable_sort_positions(top_levels: tuple) -> None:
    rng = np.random.default_rng(11)
    sim, q_ids, g_ids = random_case(rng, 40, 50, 12, levels=3)
    ranks, valid = metrics_module.positive_ranks(sim, q_ids, g_ids)
    order = np.argsort(-sim, axis=1, kind="stable")
    for q in range(len(sim)):  # the reference: 1-based positions of the positives in the sorted row
        want = np.flatnonzero(g_ids[order[q]] == q_ids[q]) + 1
        assert ranks[q][valid[q]].tolist() == want.tolist()
        assert (ranks[q][~valid[q]] == sim.shape[1] + 1).all()


def test_minus_infinity_ranks_last(top_levels: tuple) -> None:
    sim = np.array([[-np.inf, 0.2, -np.inf, 0.1]])
    m = retrieval_metrics(sim, [7], [7, 1, 7, 2], ks=(1, 3))  # positives at ranks 3 and 4
    assert m["R@3"] == 100.0 and m["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2 * 100)


def test_scan_threads_split_rows_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    sim, q_ids, g_ids = random_case(rng, 400, 300, 100, levels=3)  # >= 128 rows: two worker threads, ties
    monkeypatch.setattr(metrics_module, "SCAN_MAX_POSITIVES", 1000)
    assert_close(retrieval_metrics(sim, q_ids, g_ids), reference_rank_metrics(sim, q_ids, g_ids))


@settings(max_examples=60, deadline=None)
@given(
    n_q=st.integers(1, 30),
    n_g=st.integers(1, 40),
    n_ids=st.integers(1, 40),
    levels=st.sampled_from([None, 1, 2, 5]),
    scan=st.sampled_from([0, 1, 3, 1000]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_full_sort_reference(
    n_q: int, n_g: int, n_ids: int, levels: int | None, scan: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    sim, q_ids, g_ids = random_case(rng, n_q, n_g, min(n_ids, n_g), levels)
    old = metrics_module.SCAN_MAX_POSITIVES
    metrics_module.SCAN_MAX_POSITIVES = scan  # hypothesis forbids function-scoped fixtures such as monkeypatch
    try:
        got = retrieval_metrics(sim, q_ids, g_ids)
    finally:
        metrics_module.SCAN_MAX_POSITIVES = old
    assert_close(got, reference_rank_metrics(sim, q_ids, g_ids))
