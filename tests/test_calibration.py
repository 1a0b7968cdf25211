"""CalibCLIP calibration: config, CVE treatments on constructed token maps, DCC masking,
top-K re-ranking, no-op equivalence, batch independence, determinism, zero parameters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from calibclip.calibration import CalibCLIP, CalibrationConfig, Calibrator, build_calibclip, fuse_scores
from calibclip.calibration.cve import DECAY, RETAIN, SUPPRESS, TARGET, enhance, neighbour_mean
from calibclip.calibration.dcc import combine
from calibclip.models.base import ImageTokens
from calibclip.models.registry import register_model
from fakes import TokenEncoder as FakeEncoder
from fakes import pixels_from_mass

torch.set_num_threads(1)

NOOP_IMAGE = {"suppress_factor": 1.0, "decay_factor": 1.0, "retain_factor": 1.0}
NOOP_TEXT = {"max_masked_words": 0}


# --- constructed map ---------------------------------------------------------------------------
def constructed_mass() -> np.ndarray:
    """6x6 mass map: background 1; a 4x4 target blob (rows/cols 2-5) of 4 with a spike of 12 at (4, 4)
    and a mildly higher 6.5 at (3, 3); an isolated background spike of 15 at (0, 0).
    Shares (36 * mass / 108.5): background 0.33, blob 1.33, (4,4) 3.98, (3,3) 2.16, (0,0) 4.98.
    Neighbour means (dominant neighbours excluded): (0,0) 0.33 -> low-information; (4,4) and (3,3)
    1.33 -> target, contrasts 2.65 (spike) and 0.83 (not)."""
    m = np.ones((6, 6))
    m[2:6, 2:6] = 4.0
    m[4, 4] = 12.0
    m[3, 3] = 6.5
    m[0, 0] = 15.0
    return m


def constructed_view(dim: int = 40) -> ImageTokens:
    """Token view of `constructed_mass` with orthonormal token features (token i = e_i)."""
    mass = torch.as_tensor(constructed_mass().reshape(1, -1), dtype=torch.float32)
    att = mass / mass.sum()
    tokens = torch.eye(36, dim)[None]
    return ImageTokens(pooled=att @ tokens[0], tokens=tokens, attention=att, grid=(6, 6))


def test_neighbour_mean_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    share = torch.rand(2, 20, generator=g)
    include = torch.rand(2, 20, generator=g) > 0.3
    plain, masked = neighbour_mean(share, (4, 5), 3), neighbour_mean(share, (4, 5), 3, include=include)
    grid, inc = share.reshape(2, 4, 5), include.reshape(2, 4, 5)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                cells = [
                    (y, x)
                    for y in range(i - 1, i + 2)
                    for x in range(j - 1, j + 2)
                    if 0 <= y < 4 and 0 <= x < 5 and (y, x) != (i, j)
                ]
                vals = [float(grid[b, y, x]) for y, x in cells]
                kept = [float(grid[b, y, x]) for y, x in cells if inc[b, y, x]] or vals
                assert math.isclose(plain[b, i * 5 + j].item(), sum(vals) / len(vals), rel_tol=1e-5)
                assert math.isclose(masked[b, i * 5 + j].item(), sum(kept) / len(kept), rel_tol=1e-5)


def test_each_treatment_on_constructed_map() -> None:
    cfg = CalibrationConfig(suppress_factor=0.0, decay_factor=0.5, retain_factor=1.0)
    view = constructed_view()
    res = enhance(view, cfg)
    t = res.treatment[0].reshape(6, 6)
    assert t[0, 0] == SUPPRESS  # isolated spike on low-information background
    assert t[4, 4] == DECAY  # spike inside the target region
    assert t[3, 3] == RETAIN  # dominant but consistent with its neighbourhood
    assert int(res.dominant.sum()) == 3
    assert t[3, 4] == TARGET and t[5, 4] == TARGET and t[5, 0] == 0  # non-dominant: target / context
    a, w = view.attention[0], res.weights[0]
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert w[0] == 0.0  # suppressed: removed from the pool
    z = 1.0 - a[0] - 0.5 * a[28]  # renormaliser after suppress (0) and decay (0.5)
    assert torch.isclose(w[28], 0.5 * a[28] / z)  # decayed: half weight, renormalised
    assert torch.isclose(w[21], a[21] / z)  # retained: full weight, renormalised
    # with orthonormal tokens the calibrated embedding's coordinates are the new weights
    assert torch.allclose(res.calibrated[0, :36], w, atol=1e-6)


def test_visual_strength_scales_the_correction() -> None:
    view = constructed_view()
    full = enhance(view, CalibrationConfig()).calibrated
    half = enhance(view, CalibrationConfig(visual_strength=0.5)).calibrated
    assert torch.allclose(half, view.pooled + 0.5 * (full - view.pooled), atol=1e-6)


def test_capped_number_of_dominant_tokens() -> None:
    res = enhance(constructed_view(), CalibrationConfig(max_dominant_frac=1 / 36))
    assert int(res.dominant.sum()) == 1 and res.treatment[0, 0] == SUPPRESS  # only the largest share


@pytest.mark.parametrize("settings", [NOOP_IMAGE, {"dominant_ratio": 1e9}, {"visual": False}, {"visual_strength": 0.0}])
def test_cve_noop_is_bitwise_identity(settings: dict) -> None:
    view = constructed_view()
    assert torch.equal(enhance(view, CalibrationConfig(**settings)).calibrated, view.pooled)


# --- DCC ------------------------------------------------------------------------------------------
def test_dcc_masks_the_dominant_word_and_reencodes() -> None:
    enc = FakeEncoder()
    cal = Calibrator(enc, CalibrationConfig(text_mix=0.7))
    feats = cal.text_features(["a man with a red backpack"])
    (exp,) = cal.explain_text("a man with a red backpack")
    assert exp.masked_words == ["man"] and exp.dominant_words == ["man"]
    assert exp.masked_text == "a with a red backpack"
    assert not any(m for m, s in zip(exp.masked, exp.special) if s)  # SOT has the largest attention
    reencoded = enc.encode_text(enc.tokenize(["a with a red backpack"]))
    expected = combine(feats["raw"], reencoded, CalibrationConfig(text_mix=0.7))
    assert torch.allclose(feats["calibrated"], expected, atol=1e-6)
    n = lambda x: x / x.norm()
    man = enc.emb[enc.tokenize(["man"]).input_ids[0, 1]]
    assert torch.dot(n(feats["calibrated"][0]), n(man)) < torch.dot(n(feats["raw"][0]), n(man))


def test_dcc_budget_rules() -> None:
    enc = FakeEncoder()
    texts = ["a man", "a man with a woman", "a man with a woman and a dog".replace(" and", " in")]
    sel = Calibrator(enc, CalibrationConfig(max_masked_words=2, max_mask_frac=0.34, min_words=3)).explain_text(texts)
    assert sel[0].masked_words == []  # 2 words < min_words
    assert sel[1].masked_words == ["man"]  # floor(0.34 * 5) = 1; ties go to the earlier word
    assert sel[2].masked_words == ["man", "woman"] and sel[2].dominant_words == ["man", "woman", "dog"]
    noop = Calibrator(enc, CalibrationConfig(**NOOP_TEXT)).text_features(texts)
    assert torch.equal(noop["raw"], noop["calibrated"])


# --- re-ranking -----------------------------------------------------------------------------------
def reference_order(raw: np.ndarray, cal: np.ndarray, k: int, lam: float) -> np.ndarray:
    rows = []
    for r, c in zip(raw, cal):
        top = np.argsort(-r, kind="stable")[:k]
        fused = lam * r[top] + (1 - lam) * c[top]
        rest = [j for j in np.argsort(-r, kind="stable") if j not in set(top)]
        rows.append(np.concatenate([top[np.argsort(-fused, kind="stable")], rest]))
    return np.asarray(rows)


@pytest.mark.parametrize("k,lam", [(5, 0.3), (1, 0.0), (12, 0.5), (50, 0.8)])
def test_fuse_matches_loop_reference(k: int, lam: float) -> None:
    rng = np.random.default_rng(k)
    raw, cal = rng.normal(size=(7, 12)).astype(np.float32), rng.normal(size=(7, 12)).astype(np.float32)
    scores = fuse_scores(raw, cal, k, lam)
    assert isinstance(scores, np.ndarray) and scores.shape == raw.shape
    np.testing.assert_array_equal(
        np.argsort(-scores, axis=1, kind="stable"), reference_order(raw, cal, min(k, 12), lam)
    )


def test_fuse_noop_cases() -> None:
    rng = np.random.default_rng(0)
    raw, cal = torch.as_tensor(rng.normal(size=(6, 30))), torch.as_tensor(rng.normal(size=(6, 30)))
    order = torch.argsort(-raw, dim=1, stable=True)
    for scores in (fuse_scores(raw, cal, 10, 1.0), fuse_scores(raw, raw, 10, 0.3), fuse_scores(raw, cal, 0, 0.3)):
        assert torch.equal(torch.argsort(-scores, dim=1, stable=True), order)
    with pytest.raises(ValueError, match=r"\[Q, G\]"):
        fuse_scores(raw, cal[:, :3], 5, 0.5)


def test_noop_calibration_ranks_exactly_like_plain_search() -> None:
    enc = FakeEncoder()
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(12, 3, 24, 24, generator=g)
    texts = ["a man with a red backpack", "a dog runs on the grass", "a woman in a blue hat", "the man"]
    for settings in ({"lam": 1.0}, {**NOOP_IMAGE, **NOOP_TEXT, "lam": 0.2}):
        cal = Calibrator(enc, CalibrationConfig(top_k=5, **settings))
        q, gal = cal.text_features(texts), cal.image_features(pixels)
        plain = torch.nn.functional.normalize(q["raw"], dim=-1) @ torch.nn.functional.normalize(gal["raw"], dim=-1).T
        got = cal.scores(q, gal)
        assert torch.equal(torch.argsort(-got, dim=1, stable=True), torch.argsort(-plain, dim=1, stable=True))


# --- properties -----------------------------------------------------------------------------------
def test_batch_independence_and_determinism() -> None:
    enc = FakeEncoder()
    cal = Calibrator(enc, CalibrationConfig())
    g = torch.Generator().manual_seed(5)
    mass = torch.as_tensor(constructed_mass())
    pixels = torch.cat([pixels_from_mass(constructed_mass())[None], torch.rand(4, 3, 24, 24, generator=g) * mass.max()])
    batch = cal.image_features(pixels)["calibrated"]
    for i in range(len(pixels)):
        alone = cal.image_features(pixels[i : i + 1])["calibrated"]
        assert torch.allclose(alone[0], batch[i], atol=1e-5)
    assert torch.equal(cal.image_features(pixels)["calibrated"], batch)
    texts = ["a man", "a dog runs on the grass in a red hat", "a woman with a blue backpack"]
    both = cal.text_features(texts)["calibrated"]
    for i, t in enumerate(texts):
        assert torch.allclose(cal.text_features([t])["calibrated"][0], both[i], atol=1e-5)
    assert torch.equal(cal.text_features(texts)["calibrated"], both)


def test_zero_new_parameters() -> None:
    enc = FakeEncoder().requires_grad_(False)
    cal = Calibrator(enc)
    assert not isinstance(cal, torch.nn.Module)
    model = CalibCLIP(enc)
    assert {id(p) for p in model.parameters()} == {id(p) for p in enc.parameters()}
    assert not any(p.requires_grad for p in model.parameters())
    assert set(dict(model.named_buffers())) == {f"model.{k}" for k, _ in enc.named_buffers()}


# --- config -------------------------------------------------------------------------------------
def test_config_roundtrip_yaml_and_errors(tmp_path) -> None:
    cfg = CalibrationConfig(top_k=20, lam=0.7, text_mix=1.5)
    assert CalibrationConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "d.yaml"
    path.write_text("dataset: x\ncalibration:\n  top_k: 30\n  visual: 'false'\n  decay_factor: 0.25\n")
    loaded = CalibrationConfig.from_yaml(path)
    assert (loaded.top_k, loaded.visual, loaded.decay_factor) == (30, False, 0.25)
    with pytest.raises(ValueError, match="unknown calibration setting.*valid settings"):
        CalibrationConfig.from_dict({"topk": 3})
    with pytest.raises(ValueError, match="lam must be in"):
        CalibrationConfig(lam=1.5)
    with pytest.raises(ValueError, match="suppress_factor <= decay_factor"):
        CalibrationConfig(suppress_factor=0.8, decay_factor=0.2)
    with pytest.raises(FileNotFoundError):
        CalibrationConfig.from_yaml(tmp_path / "missing.yaml")
    assert isinstance(CalibrationConfig.default_for("ViT-B/16"), CalibrationConfig)
    assert CalibrationConfig.default_for("no-such-encoder") == CalibrationConfig()


def test_config_id_is_stable_and_feature_specific() -> None:
    enc = FakeEncoder()
    a = Calibrator(enc, CalibrationConfig())
    assert a.config_id() == Calibrator(enc, CalibrationConfig()).config_id()
    assert a.config_id() == Calibrator(enc, CalibrationConfig(top_k=50, lam=0.1)).config_id()  # ranking only
    assert a.config_id() != Calibrator(enc, CalibrationConfig(decay_factor=0.3)).config_id()
    assert a.config_id("text") == Calibrator(enc, CalibrationConfig(decay_factor=0.3)).config_id("text")
    assert a.config_id() != Calibrator(FakeEncoder(seed=1), CalibrationConfig()).config_id()


def test_explanations_are_json_ready() -> None:
    cal = Calibrator(FakeEncoder(), CalibrationConfig())
    (img,) = cal.explain_image(pixels_from_mass(constructed_mass())[None])
    assert img.grid == (6, 6) and img.treatment[0, 0] == "suppress" and img.treatment[4, 4] == "decay"
    assert img.counts()["retain"] == 1 and math.isclose(float(img.attention.sum()), 1.0, rel_tol=1e-5)
    json.dumps(img.to_dict())
    json.dumps(cal.explain_text(["a man with a red backpack"])[0].to_dict())


# --- CalibCLIP / build_calibclip ----------------------------------------------------------------
register_model("fake-calib", lambda **kw: FakeEncoder(**kw), "test-only fake encoder", pretrained="random")


def test_build_calibclip_validates_architecture() -> None:
    model = build_calibclip("fake-calib", embed_dim=8, vision_layers=1, text_layers=1, top_k=3, lam=0.25)
    assert isinstance(model, CalibCLIP) and (model.config.top_k, model.config.lam) == (3, 0.25)
    px = torch.rand(3, 3, 24, 24)
    assert torch.allclose(model.encode_image(px), model.image_features(px)["calibrated"])
    assert torch.allclose(model.encode_image_raw(px), model.image_features(px)["raw"])
    assert model.encode_text(["a man with a red hat"]).shape == (1, 8)
    assert model(px, ["a dog", "a man with a red hat"]).shape == (2, 3)
    with pytest.raises(ValueError, match="embed_dim=512 given but the checkpoint has embed_dim=8"):
        build_calibclip("fake-calib", embed_dim=512, vision_layers=1, text_layers=1)
    with pytest.raises(ValueError, match="vision_layers=12 given"):
        build_calibclip("fake-calib", embed_dim=8, vision_layers=12, text_layers=1)


# --- real encoders ------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_tiny_random_clip_token_views(vision: str) -> None:
    """The calibration runs on CLIP's own token views (ViT CLS attention / ResNet attention pool)."""
    from calibclip.models.clip import CLIP, CLIPConfig

    torch.manual_seed(0)
    arch = (
        {"vision_layers": 1, "vision_width": 32, "vision_patch_size": 8}
        if vision == "vit"
        else {"vision_layers": (1, 1, 1, 1), "vision_width": 8}
    )
    model = (
        CLIP(
            CLIPConfig(
                embed_dim=16, image_size=(64, 64), text_width=32, text_layers=1, text_heads=2, vision_heads=2, **arch
            )
        )
        .eval()
        .requires_grad_(False)
    )
    cal = Calibrator(model, CalibrationConfig(dominant_ratio=1.2, word_ratio=1.0))
    px = torch.randn(3, 3, 64, 64)
    feats = cal.image_features(px)
    assert torch.allclose(feats["raw"], model.encode_image(px), atol=1e-5)
    assert torch.allclose(cal.image_features(px[1:2])["calibrated"][0], feats["calibrated"][1], atol=1e-5)
    texts = ["a photo of a red car", "a dog", "two people walking along a sandy beach at sunset"]
    tf = cal.text_features(texts)
    assert torch.allclose(tf["raw"], model.encode_text(model.tokenize(texts)), atol=1e-5)
    assert torch.allclose(cal.text_features(texts[2:])["calibrated"][0], tf["calibrated"][2], atol=1e-5)
    (exp,) = cal.explain_text(texts[:1])
    assert exp.tokens[0] == "<sot>" and exp.tokens[-1] == "<eot>" and "car" in exp.tokens
    noop = Calibrator(model, CalibrationConfig(**NOOP_IMAGE, **NOOP_TEXT))
    assert torch.equal(noop.image_features(px)["calibrated"], noop.image_features(px)["raw"])
    wrapped = CalibCLIP(model, cal.config)
    import calibclip

    assert torch.allclose(wrapped.encode_text(calibclip.tokenize(texts)), tf["calibrated"], atol=1e-5)


@pytest.mark.slow
def test_starter_batch_independence(flickr8k_root) -> None:
    """The built-in starter model: batch independence and exact raw features (slow: loads it)."""
    from calibclip.data.captions import load_flickr8k
    from calibclip.models.registry import create_model

    enc = create_model("starter")
    ds = load_flickr8k(flickr8k_root, "dev")
    px = torch.stack([enc.preprocess(p) for p in ds.images[:3]])
    cal = Calibrator(enc)
    feats = cal.image_features(px)
    assert torch.allclose(feats["raw"], enc.encode_image(px), atol=1e-4)
    assert torch.allclose(cal.image_features(px[2:])["calibrated"][0], feats["calibrated"][2], atol=1e-5)
    tf = cal.text_features(ds.captions[:4])
    assert torch.allclose(cal.text_features(ds.captions[1:2])["calibrated"][0], tf["calibrated"][1], atol=1e-5)
