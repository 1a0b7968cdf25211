"""Exact unit tests of the training losses, the curriculum schedule and the batch sampler."""

from __future__ import annotations

import math

import pytest
import torch

from calibclip.training.objectives import DualEncoderObjective, info_nce, sdm
from calibclip.training.sampler import (
    ANCHOR,
    FALLBACK,
    IMAGE_NEIGHBOUR,
    TEXT_NEIGHBOUR,
    CurriculumSchedule,
    neighbour_table,
    plan_epoch,
)

# images e0, e1; texts e0 and (e0 + e1)/sqrt(2): cos t2i = [[1, 0], [c, c]], c = 1/sqrt(2)
IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXT = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # un-normalised on purpose


def test_sdm_hand_computed_distinct_ids() -> None:
    # q = identity. t2i rows: softmax([1, 0]) = [e/(e+1), 1/(e+1)], softmax([c, c]) = [.5, .5];
    # i2t rows (columns): softmax([1, c]), softmax([0, c]).
    # KL(p || q) = sum_j p_j (log p_j - log(q_j + 1e-8)); SDM = mean_i KL_i2t + mean_i KL_t2i = 12.76324192...
    e, c = math.e, 1 / math.sqrt(2)

    def kl(p: list[float], target: int) -> float:
        return sum(pj * (math.log(pj) - math.log((1.0 if j == target else 0.0) + 1e-8)) for j, pj in enumerate(p))

    def softmax(r: list[float]) -> list[float]:
        z = [math.exp(v) for v in r]
        return [v / sum(z) for v in z]

    t2i = [[e / (e + 1), 1 / (e + 1)], [0.5, 0.5]]
    i2t = [softmax([1.0, c]), softmax([0.0, c])]
    expected = (kl(i2t[0], 0) + kl(i2t[1], 1)) / 2 + (kl(t2i[0], 0) + kl(t2i[1], 1)) / 2
    assert expected == pytest.approx(12.76324192063263, rel=1e-12)
    got = sdm(IMAGE, TEXT, torch.tensor([0, 1]), 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_sdm_same_identity_targets_uniform() -> None:
    # both pairs of one person: q = [.5, .5] on every row -> 0.09017659973838865
    assert float(sdm(IMAGE, TEXT, torch.tensor([7, 7]), 1.0)) == pytest.approx(0.09017659973838865, rel=1e-5)


def test_sdm_is_zero_only_for_matching_distributions() -> None:
    x = torch.eye(3)
    # with a huge scale the prediction is one-hot on the diagonal = q for distinct ids
    assert float(sdm(x, x, torch.tensor([0, 1, 2]), 1000.0)) == pytest.approx(0.0, abs=1e-5)


def test_info_nce_hand_computed() -> None:
    # 0.5 * (mean CE over i2t rows + mean CE over t2i rows) with scale 1 = 0.49115703961126583
    assert float(info_nce(IMAGE, TEXT, 1.0)) == pytest.approx(0.49115703961126583, rel=1e-6)
    # scale matters and the loss is symmetric in swapping the modalities
    assert float(info_nce(IMAGE, TEXT, 10.0)) != pytest.approx(0.49115703961126583)
    assert float(info_nce(TEXT, IMAGE, 3.0)) == pytest.approx(float(info_nce(IMAGE, TEXT, 3.0)), rel=1e-6)


def test_objective_weights_and_learnable_temperature() -> None:
    obj = DualEncoderObjective({"infonce": 1.0, "sdm": 0.5}, temperature=0.05, sdm_temperature=0.02)
    assert obj.temperature() == pytest.approx(0.05, rel=1e-5)
    total, parts = obj(IMAGE, TEXT, torch.tensor([0, 1]))
    assert float(total.detach()) == pytest.approx(parts["infonce"] + 0.5 * parts["sdm"], rel=1e-6)
    total.backward()
    assert obj.logit_scale.grad is not None and obj.logit_scale.grad != 0
    with pytest.raises(ValueError, match="unknown loss weight"):
        DualEncoderObjective({"triplet": 1.0})
    with pytest.raises(ValueError, match="all loss weights are 0"):
        DualEncoderObjective({"infonce": 0.0})


def test_schedule_levels() -> None:
    s = CurriculumSchedule(image_epochs=[2, 4], text_epochs=[3], step=0.25)
    assert [s.levels(e) for e in (1, 2, 3, 4, 9)] == [(0, 0), (0.25, 0), (0.25, 0.25), (0.5, 0.25), (0.5, 0.25)]
    assert s.counts(4, 8) == (4, 2)
    with pytest.raises(ValueError, match="leaves no anchors"):
        CurriculumSchedule(image_epochs=[1, 2], text_epochs=[3, 4], step=0.25)


def test_neighbour_table_excludes_self_and_same_identity() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2], [-1.0, 0.0]])
    table = neighbour_table(emb, 2)
    assert table[0].tolist() == [1, 3]
    ids = torch.tensor([0, 0, 1, 2, 3])  # item 1 is the same person as item 0: never its neighbour
    assert neighbour_table(emb, 2, ids)[0].tolist() == [3, 2]
    assert neighbour_table(emb[:2], 3, torch.tensor([5, 5]))[0].tolist() == [-1, -1, -1]


def test_sampler_batches_hold_the_promised_share_of_neighbours() -> None:
    n, b = 40, 8
    torch.manual_seed(0)
    img_table = neighbour_table(torch.randn(n, 4), 16)
    txt_table = neighbour_table(torch.randn(n, 4), 16)
    gen = torch.Generator().manual_seed(3)
    items, kinds = plan_epoch(n, b, 2, 3, gen, img_table, txt_table)
    assert items.shape == (n // b, b)
    for row, kind in zip(items.tolist(), kinds.tolist()):
        assert len(set(row)) == b  # no item twice in a batch
        assert kind.count(ANCHOR) == 3 and kind.count(IMAGE_NEIGHBOUR) == 2 and kind.count(TEXT_NEIGHBOUR) == 3
        anchors = row[:3]
        for j, item in enumerate(row[3:5]):  # image slot j serves anchor j mod 3, nearest first
            anchor = anchors[j % 3]
            cands = [c for c in img_table[anchor].tolist() if c not in row[: 3 + j]]
            assert item == cands[0]
        for j, item in enumerate(row[5:]):
            assert item in txt_table[anchors[j % 3]].tolist()
    # same generator seed -> same plan
    again = plan_epoch(n, b, 2, 3, torch.Generator().manual_seed(3), img_table, txt_table)
    assert torch.equal(again[0], items)


def test_sampler_level_zero_is_random_anchors_and_fallback_is_counted() -> None:
    items, kinds = plan_epoch(20, 5, 0, 0, torch.Generator().manual_seed(0))
    assert (kinds == ANCHOR).all() and sorted(items.flatten().tolist()) == list(range(20))
    empty = torch.full((20, 2), -1, dtype=torch.long)
    _, kinds = plan_epoch(20, 5, 2, 0, torch.Generator().manual_seed(0), empty, None)
    assert (kinds == FALLBACK).sum(1).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="fewer than the batch size"):
        plan_epoch(4, 8, 0, 0, torch.Generator())


def test_warmup_cosine_schedule() -> None:
    from calibclip.training.trainer import lr_lambda

    f = lr_lambda(total_steps=110, warmup_steps=10, warmup_factor=0.1, min_factor=0.0)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(100, 0, 0.1, 0.2)(100) == pytest.approx(0.2)
