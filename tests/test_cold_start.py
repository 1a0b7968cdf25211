"""Cold start of a text search with the starter (issue 14): the image tower is built lazily, MiniLM is
loaded without a random initialisation, and the fingerprint is cached on disk keyed by the weight files.

No timing is asserted here (`bench/bench_cold_start.py` measures it); these tests check that the fast
path gives the same answers as the eager one and that the fingerprint cache cannot go stale.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibclip.index import Index
from calibclip.models.base import Encoder
from calibclip.models.registry import create_model
from calibclip.models.starter import Starter, default_weights_path, read_heads, save_heads

torch.set_num_threads(1)
TEXTS = ["a red square", "a dog runs on the grass", "two people on a beach at sunset"]


def _full_hash(model: Starter) -> str:
    """The fingerprint computed from every tensor, with the disk cache bypassed."""
    model.__dict__.pop("_fingerprint", None)
    model.fingerprint_files = lambda: []  # type: ignore[method-assign]
    try:
        return Encoder.fingerprint(model)
    finally:
        del model.__dict__["fingerprint_files"]
        model.__dict__.pop("_fingerprint", None)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CALIBCLIP_CACHE", str(root))
    return root


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "w" / "starter.safetensors"
    path.parent.mkdir()
    shutil.copy(default_weights_path(), path)
    return path


def test_text_search_matches_eager_model_without_building_the_image_tower(tmp_path, cache):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 240, 240)]):
        arr = (np.asarray(colour, dtype=np.float32) + rng.normal(0, 20, (64, 80, 3))).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.png")
    eager = create_model("starter")
    _ = eager.image_tower  # type: ignore[attr-defined]  # built up front, as before
    built = Index.build(folder, tmp_path / "ix", model=eager, workers=0, progress=False)
    want = {t: [(r.id, r.score) for r in built.search(text=t, k=4)] for t in TEXTS}
    built.close()

    index = Index.open(tmp_path / "ix")  # the recorded model, loaded on first use (lazy tower)
    got = {t: [(r.id, r.score) for r in index.search(text=t, k=4)] for t in TEXTS}
    assert not index.encoder.image_tower_built  # type: ignore[attr-defined]
    assert got == want
    lazy = index.encoder
    batch = lazy.tokenize(TEXTS)
    assert torch.equal(lazy.encode_text(batch), eager.encode_text(batch))
    assert lazy.fingerprint() == eager.fingerprint()
    # an image query builds it on demand, with the same embeddings as the eager model
    pixels = eager.preprocess(folder / "0.png")[None]
    assert torch.equal(lazy.encode_image(pixels), eager.encode_image(pixels))
    assert lazy.image_tower_built  # type: ignore[attr-defined]
    index.close()


def test_lazy_model_state_matches_eager_and_follows_to_and_train():
    lazy, eager = Starter(), Starter()
    _ = eager.image_tower
    assert not lazy.image_tower_built
    assert lazy.fingerprint_cacheable()
    sd = lazy.state_dict()  # needs the tower: builds it
    assert lazy.image_tower_built and sd.keys() == eager.state_dict().keys()
    assert all(torch.equal(v, eager.state_dict()[k]) for k, v in sd.items())

    moved = Starter().double().train()
    tower = moved.image_tower  # built after .double()/.train(): follows both
    assert next(tower.parameters()).dtype == torch.float64 and tower.training
    assert not any(p.requires_grad for p in tower.parameters())
    trainable = Starter().requires_grad_(True)
    assert not trainable.fingerprint_cacheable()
    assert all(p.requires_grad for p in trainable.image_tower.parameters())


def test_fingerprint_cache_hit_skips_the_image_tower_and_equals_the_full_hash(cache, weights):
    first = Starter(weights=weights)
    fp = first.fingerprint()
    assert fp == _full_hash(Starter(weights=weights))
    assert len(list((cache / "fingerprints").iterdir())) == 1
    second = Starter(weights=weights)
    assert second.fingerprint() == fp and not second.image_tower_built


def test_fingerprint_cache_invalidates_when_the_weights_file_changes(cache, weights):
    old = Starter(weights=weights).fingerprint()
    tensors, meta = read_heads(weights)
    tensors["logit_scale"] = tensors["logit_scale"] + 0.5
    save_heads(weights, tensors, {k: v for k, v in meta.items() if k != "format"})
    changed = Starter(weights=weights)
    new = changed.fingerprint()
    assert changed.image_tower_built  # a miss: computed from the tensors
    assert new != old and new == _full_hash(Starter(weights=weights))


def test_fingerprint_cache_ignores_tensors_edited_in_memory(cache, weights):
    clean = Starter(weights=weights).fingerprint()
    edited = Starter(weights=weights)
    with torch.no_grad():
        edited.text_head.linear.weight.add_(1e-3)
    assert edited.fingerprint() != clean
    assert edited.fingerprint() == _full_hash(edited)


def test_unwritable_cache_never_breaks_the_fingerprint(tmp_path, monkeypatch, weights):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("CALIBCLIP_CACHE", str(blocker))
    model = Starter(weights=weights)
    assert model.fingerprint() == _full_hash(Starter(weights=weights))


def test_image_tower_edited_in_memory_changes_the_cache_key(cache, weights):
    clean = Starter(weights=weights).fingerprint()
    tuned = Starter(weights=weights)
    with torch.no_grad():
        next(tuned.image_tower.parameters()).mul_(1.01)  # e.g. fine-tuned in this process
    assert tuned.fingerprint() != clean
    assert tuned.fingerprint() == _full_hash(tuned)
