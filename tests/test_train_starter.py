"""`calibclip train-starter` end to end on a tiny generated Flickr8k, and the recall metric."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibclip.models.starter_train import recall_at_k

torch.set_num_threads(1)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (245, 245, 245), "black": (10, 10, 10), "purple": (140, 30, 160), "orange": (250, 140, 0),
           "grey": (128, 128, 128)}


def make_flickr8k(root: Path) -> None:
    """6 train + 3 dev images in the official layout; a test split file naming a missing image
    (training must never read it)."""
    images = root / "Flicker8k_Dataset"
    text = root / "Flickr8k_text"
    images.mkdir(parents=True)
    text.mkdir()
    rng = np.random.default_rng(0)
    lines, names = [], []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        name = f"{1000 + i}_img.jpg"
        arr = np.clip(np.array(rgb) + rng.normal(0, 12, (90 + 10 * i, 120, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / name, quality=90)
        names.append(name)
        for k in range(5):
            lines.append(f"{name}#{k}\tA {colour} picture number {k} .")
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:6]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[6:]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("missing_test_image.jpg\n")


def test_recall_at_k_matches_a_loop():
    rng = np.random.default_rng(1)
    cap_img = np.repeat(np.arange(6), 3)
    sim = rng.normal(size=(18, 6))
    sim[np.arange(18), cap_img] += rng.normal(0.5, 1, 18)
    out = recall_at_k(torch.from_numpy(sim), torch.from_numpy(cap_img), ks=(1, 2, 5))
    for k in (1, 2, 5):
        t2i = np.mean([cap_img[q] in np.argsort(-sim[q])[:k] for q in range(18)]) * 100
        i2t = np.mean([any(cap_img[c] == i for c in np.argsort(-sim[:, i])[:k]) for i in range(6)]) * 100
        assert out[f"t2i_r{k}"] == pytest.approx(t2i) and out[f"i2t_r{k}"] == pytest.approx(i2t)


def test_train_starter_cli_tiny_run_resumes_and_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from calibclip.cli.main import main
    from calibclip.models.starter import Starter

    root = tmp_path / "flickr8k"
    make_flickr8k(root)
    args = ["train-starter", "--data-root", str(root), "--epochs", "3", "--batch-size", "4", "--backbones", "lite0",
            "--workers", "1", "--seed", "3"]
    run = tmp_path / "run"
    # a lock left behind by a killed extraction (its process is gone) is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "features" / "train-lite0").mkdir(parents=True)
    (run / "features" / "train-lite0" / "00000.lock").write_text(str(dead.pid))
    assert main([*args, "--out", str(run)]) == 0
    assert not list(run.glob("features/*/*.lock"))
    for name in ("starter.safetensors", "train_log.csv", "train_log.json", "train_curves.png"):
        assert (run / name).stat().st_size > 0, name
    log = json.loads((run / "train_log.json").read_text())
    assert log["train_images"] == 6 and log["dev_images"] == 3 and log["dev_captions"] == 15
    assert len(log["history"]) == 3 and 1 <= log["best_epoch"] <= 3
    shards = sorted((run / "features" / "train-lite0").glob("*.safetensors"))
    assert shards
    stamp = [p.stat().st_mtime_ns for p in shards]

    # re-running reuses the cached features and reproduces the weights exactly
    first = load_file(str(run / "starter.safetensors"))
    assert main([*args, "--out", str(run)]) == 0
    assert [p.stat().st_mtime_ns for p in shards] == stamp
    second = load_file(str(run / "starter.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    model = Starter(weights=run / "starter.safetensors")
    assert model.backbones == ("lite0",) and model.image_size == 224
    feats = model.encode(images=sorted((root / "Flicker8k_Dataset").glob("*.jpg"))[:2], normalize=True)
    assert feats.shape == (2, model.embed_dim) and np.isfinite(feats).all()


def test_train_starter_rejects_unknown_backbone(tmp_path):
    from calibclip.cli.main import main

    root = tmp_path / "flickr8k"
    make_flickr8k(root)
    assert main(["train-starter", "--data-root", str(root), "--out", str(tmp_path / "r"), "--backbones", "lite9"]) == 2
