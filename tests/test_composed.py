"""Combiner, baselines, composed loaders and `evaluate_composed` on real FashionIQ/CIRR
annotation files with placeholder images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from calibclip.composed import Combiner, build_combining, evaluate_composed, load_combiner, save_combiner
from calibclip.composed.evaluate import extract_features, score_queries
from calibclip.data.cache import FeatureCache
from calibclip.data.composed import (
    fashioniq_caption,
    fashioniq_caption_variants,
    load_cirr,
    load_fashioniq,
)
from calibclip.data.records import DatasetError
from fakes import HashEncoder as FakeEncoder
from test_composed_fakes import write_cirr_subset, write_fashioniq_subset

torch.set_num_threads(1)


# --- Combiner ------------------------------------------------------------------------------
def test_combiner_matches_the_formula_in_eval_mode() -> None:
    torch.manual_seed(0)
    c = Combiner.for_features(16, proj_mult=4, hidden_mult=8).eval()
    assert (c.projection_dim, c.hidden_dim) == (64, 128)
    img, txt = torch.randn(5, 16), torch.randn(5, 16)
    t = F.relu(c.text_projection(txt))
    i = F.relu(c.image_projection(img))
    joint = torch.cat([t, i], -1)
    mlp = c.output_layer(F.relu(c.combiner_layer(joint)))
    lam = torch.sigmoid(c.dynamic_scalar[3](F.relu(c.dynamic_scalar[0](joint))))
    want = F.normalize(mlp + lam * txt + (1 - lam) * img, dim=-1)
    assert torch.allclose(c(img, txt), want, atol=1e-6)
    assert torch.allclose(c(img, txt).norm(dim=-1), torch.ones(5))


def test_combiner_loss_uses_fixed_logit_scale_100() -> None:
    torch.manual_seed(0)
    c = Combiner(8, 16, 32).eval()
    img, txt, tgt = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)
    logits = 100.0 * c(img, txt) @ F.normalize(tgt, dim=-1).T
    assert torch.allclose(c.loss(img, txt, tgt), F.cross_entropy(logits, torch.arange(6)))
    assert c.logit_scale == 100.0 and "logit_scale" not in dict(c.named_parameters())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_roundtrip_and_fingerprint_check(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    c = Combiner(8, 16, 32).eval()
    path = save_combiner(tmp_path / f"comb{suffix}", c, "fake-123", note="x")
    loaded = load_combiner(path, encoder="fake-123")
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.allclose(loaded(x, y), c(x, y))
    with pytest.raises(ValueError, match="trained on features of encoder fake-123"):
        load_combiner(path, encoder="other-456")
    if suffix == ".pt":  # plain data: loads with weights_only=True
        assert torch.load(path, weights_only=True)["config"]["hidden_dim"] == 32


def test_build_combining_baselines_and_errors(tmp_path: Path) -> None:
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    # the sum baseline sums the *normalised* features (CLIP4Cir), the text weighted (default 1 without an encoder)
    unit = F.normalize(F.normalize(img, dim=-1) + F.normalize(txt, dim=-1), dim=-1)
    assert torch.allclose(build_combining("sum")(img, txt), unit)
    assert torch.allclose(build_combining("sum")(img * 30, txt * 0.1), unit, atol=1e-6)  # raw norms do not matter
    heavy = F.normalize(F.normalize(img, dim=-1) + 2.5 * F.normalize(txt, dim=-1), dim=-1)
    assert torch.allclose(build_combining("sum", text_weight=2.5)(img, txt), heavy)
    assert torch.allclose(build_combining("image")(img, txt), F.normalize(img, dim=-1))
    assert torch.allclose(build_combining("text")(img, txt), F.normalize(txt, dim=-1))
    with pytest.raises(ValueError, match="needs a trained Combiner checkpoint"):
        build_combining("combiner")
    with pytest.raises(ValueError, match="unknown combining"):
        build_combining("product")
    with pytest.raises(FileNotFoundError, match="train-combiner"):
        build_combining("combiner", tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Combiner checkpoint"):
        build_combining("combiner", tmp_path / "bad.pt")
    torch.manual_seed(0)
    c = Combiner(8, 16, 32).eval()
    fn = build_combining("combiner", save_combiner(tmp_path / "c.pt", c, "fp"))
    assert torch.allclose(fn(img.numpy(), txt.numpy()), c(img, txt))


# --- loaders -------------------------------------------------------------------------------
def test_fashioniq_captions() -> None:
    assert fashioniq_caption("is shiny and silver.", " fit and flare") == "Is shiny and silver and fit and flare"
    v = fashioniq_caption_variants("is red", "has stripes?")
    assert v == ("Is red and has stripes", "Has stripes and is red", "Is red", "Has stripes")


def test_fashioniq_loader_validates(tmp_path: Path, fashioniq_root: Path) -> None:
    root = write_fashioniq_subset(fashioniq_root, tmp_path / "fiq", n_pairs=10)
    data = load_fashioniq(root, "val")
    assert list(data) == ["dress", "shirt", "toptee"]
    ds = data["dress"]
    real = json.loads((fashioniq_root / "captions" / "cap.dress.val.json").read_text())[:10]
    assert [ds.image_names[i] for i in ds.target] == [p["target"] for p in real]
    assert [ds.image_names[i] for i in ds.reference] == [p["candidate"] for p in real]
    assert ds.has_targets and ds.images[0].suffix == ".jpg"
    # the full real annotation files parse (without images)
    full = load_fashioniq(fashioniq_root, "val", check_images=False)
    assert len(full["shirt"]) == 2038 and len(full["shirt"].images) == 6346
    assert not load_fashioniq(fashioniq_root, "test", check_images=False)["dress"].has_targets
    next((root / "images").iterdir()).unlink()
    with pytest.raises(DatasetError, match="1 of .* images .* missing"):
        load_fashioniq(root, "val")
    with pytest.raises(DatasetError, match="missing .*cap.dress.nope.json"):
        load_fashioniq(root, "nope")


def test_cirr_loader_layouts_and_errors(tmp_path: Path, cirr_root: Path) -> None:
    full = load_cirr(cirr_root, "val", check_images=False)  # flat layout, real files
    assert len(full) == 4181 and len(full.images) == 2297 and full.subsets.shape == (4181, 6)
    assert (full.subsets == full.reference[:, None]).any(1).all()
    test1 = load_cirr(cirr_root, "test1", check_images=False)
    assert not test1.has_targets and len(test1) == 4148
    root = write_cirr_subset(cirr_root, tmp_path / "cirr", n_pairs=12, with_train=False)
    ds = load_cirr(root, "val")  # nested layout: ROOT/cirr/captions, images under ROOT/dev
    assert len(ds) == 12 and all(p.is_file() for p in ds.images)
    with pytest.raises(DatasetError, match="Splits found: \\['test1', 'val'\\]"):
        load_cirr(root, "train")
    ds.images[0].unlink()
    with pytest.raises(DatasetError, match="1 of .* images .* missing"):
        load_cirr(root, "val")


# --- evaluation ----------------------------------------------------------------------------
def test_evaluate_fashioniq_end_to_end(tmp_path: Path, fashioniq_root: Path) -> None:
    root = write_fashioniq_subset(fashioniq_root, tmp_path / "fiq", n_pairs=15)
    enc, cache = FakeEncoder(), FeatureCache(tmp_path / "cache")
    m = evaluate_composed(enc, "fashioniq", root, "val", "sum", None, cache, 16, 0, progress=False)
    assert set(m) == {f"{c}_R@{k}" for c in ("dress", "shirt", "toptee") for k in (10, 50)} | {
        "avg_R@10",
        "avg_R@50",
        "avg",
    }
    assert all(0 <= v <= 100 for v in m.values())
    # an oracle combining function (the target's own feature) scores 100; the pipeline is protocol-correct
    ds = load_fashioniq(root, "val")["dress"]
    feats = extract_features(enc, ds, cache, progress=False)
    oracle = score_queries(lambda i, t: F.normalize(feats.images[ds.target], dim=-1), feats, ds)
    assert (oracle.argmax(1).numpy() == ds.target).all()
    with pytest.raises(ValueError, match="no target images"):
        evaluate_composed(enc, "fashioniq", fashioniq_root, "test", "sum", None, cache, 16, 0)


def test_evaluate_cirr_val_and_submission(tmp_path: Path, cirr_root: Path) -> None:
    root = write_cirr_subset(cirr_root, tmp_path / "cirr", n_pairs=20, with_train=False)
    enc, cache = FakeEncoder(), FeatureCache(tmp_path / "cache")
    m = evaluate_composed(enc, "cirr", root, "val", "image", None, cache, 16, 0, progress=False)
    assert list(m) == ["R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "avg"]
    assert m["avg"] == pytest.approx((m["R@5"] + m["Rsubset@1"]) / 2)
    with pytest.raises(ValueError, match="submission directory"):
        evaluate_composed(enc, "cirr", root, "test1", "sum", None, cache, 16, 0, progress=False)
    sub = tmp_path / "sub"
    assert evaluate_composed(enc, "cirr", root, "test1", "sum", None, cache, 16, 0, sub, progress=False) == {}
    recall = json.loads((sub / "recall_submission_test1_sum.json").read_text())
    subset = json.loads((sub / "recall_subset_submission_test1_sum.json").read_text())
    pairs = json.loads((root / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    assert set(recall) - {"version", "metric"} == {str(p["pairid"]) for p in pairs}
    for p in pairs:
        assert p["reference"] not in recall[str(p["pairid"])]
        got = subset[str(p["pairid"])]
        assert len(got) == 3 and set(got) <= set(p["img_set"]["members"]) - {p["reference"]}
    ds = load_cirr(root, "test1")
    n_gallery = len(ds.images)
    assert all(len(recall[str(p["pairid"])]) == min(50, n_gallery - 1) for p in pairs)


def test_loss_does_not_use_the_same_target_image_as_a_negative() -> None:
    torch.manual_seed(0)
    c = Combiner(8, 16, 32).eval()
    img, txt, tgt = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    tgt[2] = tgt[0]
    ids = torch.tensor([7, 3, 7, 5])
    logits = 100.0 * c(img, txt) @ F.normalize(tgt, dim=-1).T
    logits[0, 2] = logits[2, 0] = float("-inf")
    assert torch.allclose(c.loss(img, txt, tgt, ids), F.cross_entropy(logits, torch.arange(4)))
