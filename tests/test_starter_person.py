"""Non-square input geometry of the starter and the packaged `starter-person` (issue 17).

The default suite needs no dataset; the one test that re-evaluates `starter-person` on the CUHK-PEDES
subset is ``slow`` and skips without ``../shared/data/cuhkpedes``. No CUHK-PEDES content is stored here.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from calibclip.models.starter import Starter, StarterImageTower, default_weights_path, read_heads

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _no_network(*args, **kwargs):
    raise OSError("network access attempted while loading a starter model")


@pytest.fixture(scope="module")
def person():
    """The registry's `starter-person`, created with sockets disabled in-process."""
    from calibclip.models.registry import create_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "socket", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return create_model("starter-person")


def test_default_starter_geometry_unchanged():
    model = Starter()
    tower = model.image_tower
    assert tower.image_hw is None and tower.input_sizes == ((224, 224), (260, 260))
    pre = model.preprocess.describe()
    assert pre["mode"] == "clip" and pre["size"] == [260, 260]
    assert "image_hw" not in model.config() and model.config()["image_size"] == 260
    assert "image_height" not in model.meta


def test_non_square_tower_runs_each_backbone_at_scaled_geometry():
    tower = StarterImageTower(("lite0", "lite2"), image_hw=(128, 48))
    assert tower.input_sizes == ((110, 41), (128, 48))
    pixels = torch.rand(2, 3, 128, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        fmap = tower(pixels)
    assert fmap.shape == (2, 2560, 7, 7)
    with pytest.raises(ValueError, match="at least 32x32"):
        StarterImageTower(("lite0",), image_hw=(16, 64))


def test_cached_split_matches_full_tower_at_non_square_geometry():
    """The training path (frozen lower part cached, upper part recomputed) equals one full pass."""
    from calibclip.models.starter_parts import image_lower, image_split_index, resize_pixels, tower_upper

    tower = StarterImageTower(("lite0", "lite2"), image_hw=(192, 64))
    pixels = torch.rand(1, 3, 192, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        splits = [image_split_index(net, 1) for net in tower.nets]
        lowers = [image_lower(net, x, s) for net, x, s in zip(tower.nets, resize_pixels(tower, pixels), splits)]
        torch.testing.assert_close(tower_upper(tower, lowers, splits), tower(pixels), rtol=1e-4, atol=1e-5)


def test_geometry_override_transform_and_encode(tmp_path):
    model = Starter(image_hw=(128, 48), image_mode="resize")
    assert model.meta["image_height"] == "128" and model.meta["image_mode"] == "resize"
    assert model.config()["image_hw"] == [128, 48]
    img = Image.new("RGB", (30, 90), (200, 30, 30))  # a tall crop (width 30, height 90)
    x = model.preprocess(img)
    assert x.shape == (3, 128, 48)
    emb = model.encode_image(x[None])
    assert emb.shape == (1, model.embed_dim) and torch.isfinite(emb).all()
    assert model.fingerprint() != Starter().fingerprint()
    with pytest.raises(ValueError, match="image_mode"):
        Starter(image_mode="stretch")


def test_training_settings_accept_starter_geometry():
    from calibclip.training.config import settings_from_config

    base = settings_from_config({"training": {"trainable": "top"}})
    geo = settings_from_config(
        {"training": {"trainable": "top", "starter": {"image_size": [384, 128], "image_mode": "resize"}}}
    )
    assert geo.starter.image_size == [384, 128] and geo.starter.image_mode == "resize"
    assert base.fingerprint() != geo.fingerprint()
    with pytest.raises(ValueError, match="image_size"):
        settings_from_config({"training": {"starter": {"image_size": [384]}}})


def test_starter_person_is_registered_built_in_and_loads_offline(person):
    from calibclip.models.registry import list_models

    entry = {e.name: e for e in list_models()}["starter-person"]
    assert entry.pretrained == "built-in"
    assert isinstance(person, Starter) and person.spec == "starter-person"
    cfg = person.config()
    h, w = cfg["image_hw"]
    assert h > w  # tall person crops
    assert person.preprocess.describe()["size"] == [h, w]
    assert person.fingerprint() != Starter().fingerprint()
    img = Image.new("RGB", (40, 120), (20, 20, 160))
    emb = person.encode_image(person.preprocess(img)[None])
    txt = person.encode_text(person.tokenize(["a woman in a blue coat and black trousers"]))
    assert emb.shape == txt.shape == (1, person.embed_dim)
    assert torch.isfinite(emb).all() and torch.isfinite(txt).all()


def test_starter_person_weights_are_small_and_documented(person):
    path = Path(person.weights_path)
    assert path.name == "starter-person.safetensors" and path.stat().st_size < 30_000_000
    tensors, meta = read_heads(path)
    val = json.loads(meta["dev_metrics"])
    card = (default_weights_path().parent / "STARTER_PERSON_MODEL_CARD.md").read_text()
    assert f"{val['R@1']:.1f}" in card
    assert val["R@1"] >= 15.0


def test_cuhkpedes_config_evaluates_with_starter_person_by_default():
    from calibclip.evaluation.config import load_config

    assert load_config(REPO / "configs" / "cuhkpedes.yaml")["model"]["name"] == "starter-person"


@pytest.mark.slow
def test_starter_person_reproduces_documented_val_numbers(person):
    """Re-encode the CUHK-PEDES subset's val split: the packaged model's recorded val R@1 holds (0.5)."""
    from calibclip.evaluation.config import load_config
    from calibclip.evaluation.runner import run_evaluation
    from conftest import shared_path

    root = shared_path("cuhkpedes")
    cfg = load_config(REPO / "configs" / "cuhkpedes.yaml")
    cfg["evaluation"]["cache"] = False
    result = run_evaluation("cuhkpedes", root, cfg, split="val", encoder=person, progress=False)
    expected = json.loads(person.meta["val_metrics"])
    assert abs(result["metrics"]["R@1"] - expected["R@1"]) < 0.5, (result["metrics"], expected)
