"""Pseudo-CIR: the triplet rule on hand-made features, `make-pseudo-cir` on a tiny generated
Flickr8k-layout dataset (deterministic, annotations only), the loader, evaluation and training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import calibclip.models.registry as registry
from calibclip.cli.main import main
from calibclip.composed import evaluate_composed
from calibclip.composed.evaluate import extract_features
from calibclip.composed.pseudo_cir import build_triplets, make_pseudo_cir
from calibclip.composed.train import TrainConfig, train_combiner
from calibclip.data.cache import FeatureCache
from calibclip.data.composed import load_pseudo_cir
from calibclip.data.records import DatasetError
from test_composed_fakes import FakeEncoder

torch.set_num_threads(1)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
THINGS = ("dog", "bike", "boat")


def make_flickr8k(root: Path) -> Path:
    """12 train + 6 dev generated photos (a colour x a thing, noisy) with 5 captions each."""
    images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
    images.mkdir(parents=True)
    text.mkdir()
    rng = np.random.default_rng(0)
    lines, names = [], []
    for i in range(18):
        colour, thing = list(COLOURS)[i % 4], THINGS[i % 3]
        name = f"{2000 + i}_gen.jpg"
        base = np.array(COLOURS[colour]) * (0.6 + 0.4 * (i % 3) / 2)
        arr = np.clip(base + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / name, quality=90)
        names.append(name)
        for k in range(5):
            lines.append(
                f"{name}#{k}\tA {colour} {thing} {['outside', 'in the park', 'at night', 'near water', 'today'][k]} ."
            )
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:12]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[12:]) + "\n")
    return root


@pytest.fixture(scope="module")
def flickr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_flickr8k(tmp_path_factory.mktemp("f8k") / "flickr8k")


def test_rule_on_hand_made_features() -> None:
    # image 0's visual neighbours: 1 (closest), 2, 3 (a near-duplicate); captions: 1 is described like 0, 2 is not
    img = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.31, 0.0], [0.9, 0.0, 0.44], [1.0, 0.0, 0.001], [0.0, 0.0, 1.0]])
    cap = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.9, 0.1, 0.0],  # image 0: "dog", "dog, a bit of grass"
            [1.0, 0.05, 0.0],
            [0.95, 0.0, 0.0],  # image 1: described like image 0
            [0.0, 1.0, 0.0],
            [0.1, 0.9, 0.1],  # image 2: described differently
            [1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],  # image 3 (near-duplicate of 0)
            [0.0, 0.0, 1.0],
            [0.0, 0.1, 1.0],  # image 4
        ]
    )
    owner = np.repeat(np.arange(5), 2)
    trip = build_triplets(img, cap, owner, neighbours=2)
    assert [t["target"] for t in trip] == [0, 1, 2, 3, 4]
    first = trip[0]
    # candidates of 0 are {1, 2} (3 is a near-duplicate, cos >= 0.98); 2 is described least like 0
    assert first["reference"] == 2 and first["visual_rank"] == 2
    # the text: image 0's caption least similar to image 2's captions (caption 1 has the grass, closer to 2's)
    assert first["caption"] == 0
    assert all(t["reference"] != t["target"] for t in trip)
    assert all(owner[t["caption"]] == t["target"] for t in trip)
    assert trip == build_triplets(img, cap, owner, neighbours=2)  # deterministic
    two = build_triplets(img, cap, owner, neighbours=3, references_per_target=2)
    # 3 candidates {1, 2, 4}: the two described least like image 0, least similar first
    assert len(two) == 10 and [two[0]["reference"], two[1]["reference"]] == [4, 2]
    with pytest.raises(ValueError, match="references_per_target"):
        build_triplets(img, cap, owner, neighbours=2, references_per_target=3)
    with pytest.raises(ValueError, match="at least 2 images"):
        build_triplets(img[:1], cap[:2], owner[:2])


def test_make_pseudo_cir_is_deterministic_and_writes_annotations_only(tmp_path: Path, flickr: Path) -> None:
    enc = FakeEncoder()
    out1, out2 = tmp_path / "a", tmp_path / "b"
    s = make_pseudo_cir(
        enc, "flickr8k", flickr, "dev", out1, cache=FeatureCache(tmp_path / "c1"), neighbours=3, progress=False
    )
    make_pseudo_cir(
        enc, "flickr8k", flickr, "val", out2, cache=FeatureCache(tmp_path / "c2"), neighbours=3, progress=False
    )
    assert s["triplets"] == 6 and s["images"] == 6 and s["split"] == "dev"
    assert [p.name for p in out1.iterdir()] == ["pseudo-cir.dev.json"]  # no images copied, val = dev
    assert (out1 / "pseudo-cir.dev.json").read_bytes() == (out2 / "pseudo-cir.dev.json").read_bytes()
    data = json.loads((out1 / "pseudo-cir.dev.json").read_text())
    assert data["data_root"] == str(flickr.resolve()) and data["encoder"] == enc.fingerprint()
    captions = {}
    for line in (flickr / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, cap = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(cap)
    for t in data["triplets"]:
        assert t["reference"] != t["target"] and t["caption"] in captions[t["target"]]
        assert t["target_captions"] == captions[t["target"]] and 1 <= t["visual_rank"] <= 3
    ds = load_pseudo_cir(out1, "dev")
    assert len(ds) == 6 and len(ds.images) == 6 and all(p.is_file() for p in ds.images)
    assert [ds.image_names[i] for i in ds.target] == [t["target"] for t in data["triplets"]]
    assert (ds.reference != ds.target).all()
    # the first N images only
    s3 = make_pseudo_cir(
        enc,
        "flickr8k",
        flickr,
        "train",
        out1,
        cache=FeatureCache(tmp_path / "c1"),
        neighbours=3,
        references_per_target=2,
        max_images=8,
        progress=False,
    )
    assert s3["images"] == 8 and s3["triplets"] == 16
    assert len(load_pseudo_cir(out1, "train").images) == 8


def test_loader_errors(tmp_path: Path, flickr: Path) -> None:
    with pytest.raises(DatasetError, match="make-pseudo-cir"):
        load_pseudo_cir(tmp_path / "none", "dev")
    out = tmp_path / "p"
    make_pseudo_cir(FakeEncoder(), "flickr8k", flickr, "dev", out, cache=FeatureCache(tmp_path / "c"), progress=False)
    data = json.loads((out / "pseudo-cir.dev.json").read_text())
    data["data_root"] = str(tmp_path / "moved")
    (out / "pseudo-cir.dev.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="does not exist"):
        load_pseudo_cir(out, "dev")
    assert len(load_pseudo_cir(out, "dev", data_root=flickr)) == 6  # an explicit data root wins
    with pytest.raises(ValueError, match="supports --dataset flickr8k"):
        make_pseudo_cir(FakeEncoder(), "coco", flickr, "dev", out, progress=False)


def test_evaluate_and_train_on_pseudo_cir(
    tmp_path: Path, flickr: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(registry, "create_model", lambda *a, **k: FakeEncoder())
    out, cache_dir = tmp_path / "pcir", tmp_path / "cache"
    for split in ("train", "dev"):
        assert (
            main(
                [
                    "make-pseudo-cir",
                    "--dataset",
                    "flickr8k",
                    "--data-root",
                    str(flickr),
                    "--split",
                    split,
                    "--out",
                    str(out),
                    "--neighbours",
                    "4",
                    "--cache-dir",
                    str(cache_dir),
                    "--json",
                ]
            )
            == 0
        )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["triplets"] == 6
    enc, cache = FakeEncoder(), FeatureCache(cache_dir)
    results = {
        c: evaluate_composed(enc, "pseudo-cir", out, "dev", c, None, cache, progress=False)
        for c in ("sum", "image", "text")
    }
    assert all(list(m) == ["R@1", "R@5", "R@10", "R@50"] for m in results.values())
    # image-only never returns the reference (removed), so it cannot score 100 unless the target is its top neighbour
    ds = load_pseudo_cir(out, "dev")
    feats = extract_features(enc, ds, cache, progress=False)
    gallery = F.normalize(feats.images, dim=-1)
    sims = gallery[ds.reference] @ gallery.T
    sims[torch.arange(len(ds)), ds.reference] = -2
    want = 100 * float((sims.argmax(1).numpy() == ds.target).mean())
    assert results["image"]["R@1"] == pytest.approx(want)
    with pytest.raises(ValueError, match="none is packaged for encoder 'fake'"):
        evaluate_composed(enc, "pseudo-cir", out, "dev", "combiner", None, cache, progress=False)
    # training variants are every caption of the target; validation on dev by default
    train = load_pseudo_cir(out, "train")
    tf = extract_features(enc, train, cache, variants=True, progress=False)
    assert tf.variants.shape == (12, 5, 32)
    assert torch.allclose(
        tf.variants[3, 2], torch.from_numpy(enc.encode(texts=[train.info["variants"][3][2]])[0]), atol=1e-5
    )
    summary = train_combiner(
        enc,
        out,
        tmp_path / "run",
        TrainConfig(dataset="pseudo-cir", epochs=2, batch_size=8),
        cache=cache,
        progress=False,
    )
    assert summary["config"]["val_split"] == "dev" and summary["train_pairs"] == 12
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "pseudo-cir",
                "--data-root",
                str(out),
                "--split",
                "dev",
                "--combining",
                "text",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["dataset"] == "pseudo-cir" and got["metrics"]["R@1"] == pytest.approx(results["text"]["R@1"])
