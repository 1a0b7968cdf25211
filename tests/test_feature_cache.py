"""The feature cache as the evaluator uses it: a second evaluation encodes nothing, a killed
extraction resumes at the first missing shard, and keys separate models/preprocessing/calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calibclip.data.cache import FeatureCache
from calibclip.datasets import load_dataset
from calibclip.evaluation import evaluate_retrieval
from fakes import ColorEncoder, make_person_dataset


@pytest.fixture
def dataset(tmp_path: Path):
    return load_dataset("cuhkpedes", make_person_dataset(tmp_path / "cuhk", "cuhkpedes", images_per_id=3), "test")


def test_second_evaluation_is_served_from_cache(dataset, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    enc = ColorEncoder()
    first = evaluate_retrieval(enc, dataset, batch_size=4, cache=cache, progress=False)
    assert enc.calls == {"image": len(dataset.images), "text": len(dataset.captions)}
    again = ColorEncoder()  # a new process would build a new model: same weights, same key
    assert evaluate_retrieval(again, dataset, batch_size=4, cache=cache, progress=False) == first
    assert again.calls == {"image": 0, "text": 0}
    disabled = ColorEncoder()
    evaluate_retrieval(disabled, dataset, cache=FeatureCache(tmp_path / "cache", enabled=False), progress=False)
    assert disabled.calls["image"] == len(dataset.images)


def test_different_weights_or_preprocessing_miss(dataset, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    evaluate_retrieval(ColorEncoder(), dataset, cache=cache, progress=False)
    other = ColorEncoder()
    with torch.no_grad():
        other.proj.weight.mul_(2.0)
    evaluate_retrieval(other, dataset, cache=cache, progress=False)
    assert other.calls["image"] == len(dataset.images)
    resized = ColorEncoder()
    resized.preprocess = type(resized.preprocess)(size=(32, 16), mode="resize", mean=(0.5,) * 3, std=(0.5,) * 3)
    evaluate_retrieval(resized, dataset, cache=cache, progress=False)
    assert resized.calls["image"] == len(dataset.images)


def test_killed_extraction_resumes(dataset, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", shard_size=4)
    enc = ColorEncoder()
    calls = {"n": 0}

    def dies_in_third_shard(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed while computing shard 3
        return {"raw": enc.encode_image(pixels)}

    tags = {"dataset": dataset.name, "split": dataset.split, "preprocess": enc.preprocess.describe()}
    with pytest.raises(KeyboardInterrupt):
        cache.image_features(enc, dataset.images, fn=dies_in_third_shard, batch_size=4, progress=False, **tags)
    assert enc.calls["image"] == 8  # two complete shards of 4 were saved
    resumed = ColorEncoder()
    feats = cache.image_features(resumed, dataset.images, batch_size=4, progress=False, **tags)["raw"]
    assert resumed.calls["image"] == len(dataset.images) - 8
    fresh = ColorEncoder().encode(images=dataset.images)
    np.testing.assert_allclose(feats, fresh, atol=1e-6)
    # the completed evaluation now hits the cache
    final = ColorEncoder()
    evaluate_retrieval(final, dataset, batch_size=4, cache=cache, progress=False)
    assert final.calls["image"] == 0
