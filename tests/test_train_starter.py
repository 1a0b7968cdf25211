"""The starter target: upper blocks/layers trained on cached lower activations (slow: real backbones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import COLOURS, REPO


def make_flickr_set(root: Path, n_train: int = 24, n_dev: int = 8, seed: int = 0) -> Path:
    """A Flickr8k-format folder of coloured shapes with captions naming colour and shape."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k_text").mkdir()
    tokens, splits = [], {"train": [], "dev": [], "test": []}
    names = list(COLOURS)
    for i in range(n_train + n_dev + 4):
        colour, shape = names[i % len(names)], ("circle", "square")[(i // len(names)) % 2]
        img = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(0, 60, 3)))
        d = ImageDraw.Draw(img)
        box = [20 + int(rng.integers(0, 10)), 20, 76, 76]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
        name = f"{i:04d}.jpg"
        img.save(root / "Flicker8k_Dataset" / name)
        split = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
        splits[split].append(name)
        for k, cap in enumerate([f"a {colour} {shape} on a dark background", f"there is a {shape} that is {colour}"]):
            tokens.append(f"{name}#{k}\t{cap}")
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    for split, file in (("train", "trainImages"), ("dev", "devImages"), ("test", "testImages")):
        (root / "Flickr8k_text" / f"Flickr_8k.{file}.txt").write_text("\n".join(splits[split]) + "\n")
    return root


@pytest.mark.slow
def test_starter_target_trains_upper_parts_and_exports_a_loadable_starter(tmp_path: Path) -> None:
    import yaml

    from calibclip.datasets import load_dataset
    from calibclip.models.registry import create_model
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import _validate_encoder, train

    data = make_flickr_set(tmp_path / "f8k")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "configs" / "flickr8k.yaml"),
                "training": {
                    "epochs": 2,
                    "batch_size": 8,
                    "lr": 1e-4,
                    "warmup_epochs": 0,
                    "trainable": "top",
                    "starter": {"image_blocks": 1, "text_layers": 1},
                },
                "model": {"dcc": {"image_curriculum_epochs": [2], "text_curriculum_epochs": []}},
            }
        )
    )
    settings = load_train_settings(cfg, {"data_root": str(data)})
    summary = train(settings, tmp_path / "out", progress=False)
    assert len(summary["history"]) == 2 and (tmp_path / "out" / "cache").is_dir()
    best = tmp_path / "out" / "best"
    assert json.loads((best / "config.json").read_text())["architecture"] == "starter"
    model = create_model(best)
    assert model.name == "starter" and model.meta["format"] == "2"
    before = create_model("starter")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any(k.startswith("image_tower.nets.0._blocks.15.") for k in changed)
    assert any(k.startswith("text_tower.encoder.layer.5.") for k in changed)
    assert not any(k.startswith(("text_tower.encoder.layer.4.", "image_tower.nets.0._blocks.14.")) for k in changed)
    # the exported encoder (decoding images itself) reproduces the validation numbers of the cached path
    dev = load_dataset("flickr8k", data, "dev")
    metrics = _validate_encoder(model, dev, 16)
    for k, v in summary["best_val"].items():
        assert metrics[k] == pytest.approx(v, abs=1e-6 + 100.0 / len(dev.captions) + 1e-9), k
