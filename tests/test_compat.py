"""The CalibCLIP reference repository's public names (kane2kang/CalibCLIP: calibclip.datasets,
calibclip.evaluation, calibclip.models) work as thin aliases over calibclip's implementations.

Expected values are computed independently here (brute-force sorts, OpenAI-compatible token ids, the
reference tests' own hand-computed numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import calibclip
from calibclip.models import registry
from calibclip.models.clip import CLIP, CLIPConfig

try:  # the shared test helpers (tests/fakes.py; the color_model fixture then lives in conftest.py)
    from fakes import make_person_dataset
except ImportError:  # before the helpers moved there
    from test_evaluate_cli import color_model, make_person_dataset  # noqa: F401 (fixture)

torch.set_num_threads(1)


# --- brute-force reference metrics -----------------------------------------------------------------
def _ranks(row: np.ndarray) -> np.ndarray:
    """1-based rank of every gallery column (stable descending order)."""
    order = np.argsort(-row, kind="stable")
    ranks = np.empty(len(row), dtype=np.int64)
    ranks[order] = np.arange(1, len(row) + 1)
    return ranks


def _brute(sim: np.ndarray, positives: dict[int, list[int]], ks: list[int]) -> dict[str, float]:
    hits = {k: [] for k in ks}
    aps, inps = [], []
    for q, pos in positives.items():
        r = np.sort(_ranks(sim[q])[pos])
        for k in ks:
            hits[k].append(r[0] <= k)
        aps.append(np.mean(np.arange(1, len(r) + 1) / r))
        inps.append(len(r) / r[-1])
    return {**{f"R@{k}": float(np.mean(hits[k])) for k in ks}, "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps))}


# --- calibclip.evaluation --------------------------------------------------------------------------
def test_reference_metric_functions_match_their_tests_and_brute_force() -> None:
    from calibclip.evaluation import (  # noqa: I001
        compute_ap,
        compute_map,
        compute_metrics,
        compute_minp,
        compute_minp_all,
        compute_rank,
    )

    # the reference repository's own test cases (tests/test_evaluation.py)
    sim = np.array([[1.0, 0.5, 0.3], [0.3, 1.0, 0.5]])
    assert compute_rank(sim, np.array([0, 1]), np.array([0, 1, 2]), topk=[1, 2]) == {"R@1": 100.0, "R@2": 100.0}
    sim = np.array([[0.5, 1.0, 0.3], [0.3, 1.0, 0.5]])
    assert compute_rank(sim, np.array([0, 1]), np.array([0, 1, 2]), topk=[1, 2]) == {"R@1": 50.0, "R@2": 100.0}
    row = np.array([1.0, 0.8, 0.6, 0.4, 0.2])
    assert compute_ap(row, 0, np.array([0, 0, 1, 1, 1])) == pytest.approx(1.0)
    assert compute_ap(row, 0, np.array([1, 0, 0, 1, 1])) == pytest.approx((0.5 + 2 / 3) / 2)
    assert compute_minp(row, 0, np.array([1, 0, 0, 1, 1])) == pytest.approx(2 / 3)

    rng = np.random.default_rng(42)
    sim = rng.random((10, 20))
    q_ids, g_ids = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]), np.array([0, 1, 2, 3, 4] * 4)
    positives = {q: list(np.nonzero(g_ids == q_ids[q])[0]) for q in range(10)}
    want = _brute(sim, positives, [1, 5, 10])
    got = compute_metrics(sim, q_ids, g_ids, topk=[1, 5, 10], compute_map_flag=True, compute_minp_flag=True)
    assert set(got) == {"R@1", "R@5", "R@10", "mAP", "mINP"}
    for key, value in want.items():
        assert got[key] == pytest.approx(100 * value)
    assert compute_map(sim, q_ids, g_ids) == pytest.approx(100 * want["mAP"])
    assert compute_minp_all(sim, q_ids, g_ids) == pytest.approx(100 * want["mINP"])
    assert set(compute_metrics(sim, q_ids, g_ids, topk=[1], compute_map_flag=False, compute_minp_flag=False)) == {"R@1"}
    with pytest.raises(ValueError):  # a query id with no gallery image: undefined, not silently 0
        compute_rank(sim, np.full(10, 99), g_ids)


def test_metrics_only_evaluator_with_ground_truth() -> None:
    from calibclip.evaluation import Evaluator

    rng = np.random.default_rng(0)
    sim = np.round(rng.random((12, 30)), 1)  # many ties: the stable rule decides
    gt = {q: sorted(rng.choice(30, size=int(rng.integers(1, 4)), replace=False).tolist()) for q in range(0, 12, 2)}
    want = _brute(sim, gt, [1, 5, 10])
    for evaluator in (Evaluator(topk=[1, 5, 10]), Evaluator([1, 5, 10]), Evaluator()):
        got = evaluator.evaluate(torch.from_numpy(sim), gt, query_type="text")
        assert got == pytest.approx(want)
    assert set(Evaluator(topk=[2], compute_map=False, compute_minp=False).evaluate(sim, gt)) == {"R@2"}
    with pytest.raises(ValueError, match="no model"):
        Evaluator().evaluate(sim)
    with pytest.raises(ValueError, match="outside"):
        Evaluator().evaluate(sim, {12: [0]})
    with pytest.raises(ValueError, match="no positive"):
        Evaluator().evaluate(sim, {0: []})
    with pytest.raises(ValueError, match="query_type"):
        Evaluator().evaluate(sim, gt, query_type="audio")


def test_retrieval_engine() -> None:
    from calibclip.evaluation import RetrievalEngine, compute_similarity
    from calibclip.evaluation.evaluator import compute_similarity as from_module

    assert from_module is compute_similarity
    gen = torch.Generator().manual_seed(0)
    q, q_disc, g = (
        torch.randn(5, 16, generator=gen),
        torch.randn(5, 16, generator=gen),
        torch.randn(40, 16, generator=gen),
    )
    engine = RetrievalEngine(lambda_weight=0.3, top_k=7)
    sim = engine.compute_similarity(q, g)
    assert sim.shape == (5, 40)
    assert torch.allclose(sim, torch.nn.functional.cosine_similarity(q[:, None], g[None], dim=-1), atol=1e-6)
    assert torch.allclose(engine.compute_similarity(q, g, normalize=False), q @ g.T)

    fused = engine.two_stage_retrieval(q, q_disc, g)
    disc = engine.compute_similarity(q_disc, g)
    for i in range(5):
        top = torch.argsort(sim[i], descending=True, stable=True)[:7]
        rest = torch.argsort(sim[i], descending=True, stable=True)[7:]
        want = 0.3 * sim[i, top] + 0.7 * disc[i, top]
        assert torch.allclose(fused[i, top], want, atol=1e-6)  # the top-7 carry the fused score
        assert fused[i, rest].max() < fused[i, top].min()  # and stay above the rest
        assert torch.equal(
            torch.argsort(fused[i, rest], descending=True, stable=True), torch.arange(len(rest))
        )  # which keep their original order

    similarity, indices = engine.retrieve(q, g)
    assert similarity.shape == (5, 40) and indices.shape == (5, 40)
    assert torch.equal(indices, torch.argsort(sim, dim=-1, descending=True, stable=True))
    _, top3 = engine.retrieve(q, g, query_disc_features=q_disc, top_k=3)
    assert top3.shape == (5, 3) and torch.equal(top3, torch.argsort(fused, dim=-1, descending=True, stable=True)[:, :3])
    with pytest.raises(ValueError):
        RetrievalEngine(lambda_weight=1.5)


# --- calibclip.datasets ----------------------------------------------------------------------------
def test_simple_tokenizer_and_tokenize() -> None:
    from calibclip.datasets import SimpleTokenizer, tokenize

    tok = SimpleTokenizer()
    texts = ["hello world", "a person walking"]
    assert torch.equal(tok(texts, context_length=77), calibclip.tokenize(texts))
    assert tok(texts).dtype == torch.long and tok(texts).shape == (2, 77)
    single = tok("hello world", context_length=77)
    assert single.shape == (77,) and torch.equal(single, calibclip.tokenize(["hello world"])[0])
    assert tok("hello world", max_length=16).shape == (16,)
    long_ids = tok(" ".join(["word"] * 100), context_length=77)
    assert long_ids.shape == (77,) and int(long_ids[-1]) == tok.eot_token  # <end_of_text> kept
    ids = tok.encode("a person wearing a red shirt")
    assert ids == calibclip.tokenize(["a person wearing a red shirt"])[0, 1 : len(ids) + 1].tolist()
    assert tok.sot_token not in ids and "person" in tok.decode(ids)
    assert torch.equal(tokenize(["hello world"], context_length=77), calibclip.tokenize(["hello world"]))
    with pytest.raises(ValueError, match="bundled"):
        SimpleTokenizer(bpe_path="bpe_simple_vocab_16e6.txt.gz")


def test_reference_transforms(tmp_path: Path) -> None:
    from PIL import Image

    from calibclip.data.transforms import ImageTransform
    from calibclip.datasets import TestTransforms, TrainTransforms, build_transforms

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 30, 3), dtype=np.uint8))
    test = build_transforms(is_train=False, image_size=(384, 128))
    assert isinstance(test, TestTransforms) and isinstance(test, ImageTransform) and test.mode == "resize"
    assert test(img).shape == (3, 384, 128)
    assert build_transforms(False, (64, 32)).size == (64, 32)  # the reference's positional order
    resized = np.asarray(img.resize((32, 64), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array(test.mean)[:, None, None], np.array(test.std)[:, None, None]
    assert np.allclose(TestTransforms((64, 32))(img).numpy(), (resized.transpose(2, 0, 1) - mean) / std, atol=1e-5)

    train = build_transforms(is_train=True, image_size=(64, 32))
    assert isinstance(train, TrainTransforms)
    a, b = TrainTransforms((64, 32), seed=3), TrainTransforms((64, 32), seed=3)
    outs = [a(img) for _ in range(12)]
    assert all(torch.equal(x, b(img)) for x in outs)  # seeded: reproducible
    assert all(x.shape == (3, 64, 32) for x in outs)
    plain = TestTransforms((64, 32))(img)
    assert any(not torch.equal(x, plain) for x in outs)  # flips / jitter happen
    flipped = TestTransforms((64, 32))(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert any(torch.equal(x, flipped) for x in outs) or any(torch.allclose(x.flip(-1), plain, atol=0.5) for x in outs)
    with pytest.raises(ValueError):
        build_transforms(img_size=(8, 8), image_size=(8, 8))
    # the seed form is unchanged
    assert build_transforms(img_size=(16, 8)).mode == "resize" and build_transforms(224).mode == "clip"


def test_build_dataset_items_and_dataloader(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from calibclip.datasets import (
        DATASET_REGISTRY,
        CUHKPEDESDataset,
        RSTPDataset,
        SimpleTokenizer,
        build_dataloader,
        build_dataset,
    )

    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes", test_only=True)
    entries = [e for e in json.loads((root / "reid_raw.json").read_text()) if e["split"] == "test"]
    ds = build_dataset("cuhkpedes", root, split="test", image_size=(32, 16), tokenizer=SimpleTokenizer())
    assert isinstance(ds, CUHKPEDESDataset) and DATASET_REGISTRY["rstp"] is RSTPDataset
    assert len(ds) == sum(len(e["captions"]) for e in entries)
    item = ds[1]
    assert item["images"].shape == (3, 32, 16)
    assert item["captions"] == entries[0]["captions"][1] and item["image_ids"] == entries[0]["id"]
    assert item["caption_ids"] == f"{entries[0]['id']}_1"
    assert torch.equal(item["text_tokens"], calibclip.tokenize([entries[0]["captions"][1]])[0])
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn)))
    assert batch["images"].shape == (4, 3, 32, 16) and batch["text_tokens"].shape == (4, 77)
    assert batch["captions"] == [ds[i]["captions"] for i in range(4)]

    plain = build_dataset("cuhk-pedes", root)  # no tokenizer: the caption text
    assert plain[0]["text_tokens"] == plain[0]["captions"]
    assert build_dataset("cuhkpedes", root, json_path=root / "reid_raw.json").json_path == str(root / "reid_raw.json")
    with pytest.raises(ValueError, match="annotation file"):
        build_dataset("cuhkpedes", root, json_path=tmp_path / "elsewhere.json")
    with pytest.raises(ValueError, match="Unknown dataset"):
        build_dataset("market1501", root)

    loader = build_dataloader(
        "cuhkpedes",
        root,
        split="test",
        image_size=(32, 16),
        batch_size=5,
        num_workers=0,
        tokenizer=SimpleTokenizer(),
        shuffle=False,
    )
    first = next(iter(loader))  # iterating yields the reference's batches
    assert first["images"].shape == (5, 3, 32, 16) and first["text_tokens"].shape == (5, 77)
    assert first["captions"] == [ds[i]["captions"] for i in range(5)]


def test_evaluator_accepts_reference_dataloaders(tmp_path: Path, color_model: str) -> None:  # noqa: F811
    from torch.utils.data import DataLoader

    from calibclip.datasets import TestTransforms, build_dataloader, build_dataset
    from calibclip.evaluation import Evaluator

    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    model = registry.create_model(color_model)
    want = Evaluator(model).evaluate(build_dataloader("cuhkpedes", root, split="test", batch_size=4))
    ds = build_dataset("cuhkpedes", root, split="test")
    assert Evaluator(model).evaluate(DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn)) == pytest.approx(want)
    # an explicit transform is used, as the reference applies the dataset's transform
    calls = []

    class Spy(TestTransforms):
        def __call__(self, source):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().__call__(source)

    custom = Spy((16, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = build_dataset("cuhkpedes", root, split="test", transform=custom)
    assert ds.eval_transform is custom
    assert Evaluator(model).evaluate(DataLoader(ds, batch_size=4)) == pytest.approx(want)
    assert len(calls) == len(ds.retrieval_dataset.images)  # every gallery image went through it
    assert model.preprocess is not custom  # and the model's own preprocessing is restored
    assert set(want) == {"rank1", "rank5", "rank10", "mAP", "mINP"}


# --- calibclip.models ------------------------------------------------------------------------------
def test_models_names_and_unsupported_pointers() -> None:
    import calibclip.models as models
    from calibclip.calibration import CalibCLIP, build_calibclip
    from calibclip.models import CalibCLIP as FromModels
    from calibclip.models import build_calibclip as build_from_models

    assert FromModels is CalibCLIP and build_from_models is build_calibclip
    assert calibclip.CalibCLIP is CalibCLIP and calibclip.build_calibclip is build_calibclip
    for name in ("ContrastiveVisualEnhancer", "DiscriminativeConceptCalibrator", "VisionEncoder", "TextEncoder"):
        with pytest.raises(AttributeError, match="calibclip"):
            getattr(models, name)
    with pytest.raises(AttributeError, match="training-free"):
        calibclip.ContrastiveVisualEnhancer  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        models.nothing_here  # noqa: B018
    from calibclip.models import registry as reg  # submodules still import normally

    assert reg.create_model is calibclip.create_model


def test_build_calibclip_reference_keywords(tmp_path: Path) -> None:
    from calibclip.calibration import CalibCLIP, build_calibclip

    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=32,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=16,
        image_size=32,
        text_width=64,
        text_layers=2,
    )
    path = tmp_path / "tiny.pt"
    torch.save(CLIP(cfg).state_dict(), path)
    model = build_calibclip(
        model_name=str(path),
        image_size=(64, 32),
        stride_size=16,
        embed_dim=32,
        vision_layers=2,
        text_layers=2,
        cve_config=None,
        dcc_config={},
    )
    assert isinstance(model, CalibCLIP) and model.model.cfg.image_size == (64, 32)
    assert model.encode_image(torch.randn(1, 3, 64, 32)).shape == (1, 32)
    assert build_calibclip(
        name=str(path), embed_dim=None, vision_layers=None, text_layers=None
    ).model.cfg.image_size == (32, 32)
    with pytest.raises(ValueError, match="stride"):
        build_calibclip(model_name=str(path), stride_size=8, embed_dim=32, vision_layers=2, text_layers=2)
    with pytest.raises(ValueError, match="trainable"):
        build_calibclip(
            model_name=str(path), cve_config={"residual_coefficient": 0.1}, embed_dim=32, vision_layers=2, text_layers=2
        )
    with pytest.raises(ValueError, match="once"):
        build_calibclip(str(path), model_name=str(path))


def test_reference_readme_python_api(tmp_path: Path) -> None:
    """The reference README's "Python API" example, with a tiny checkpoint and a tiny dataset."""
    from calibclip import CalibCLIP, build_calibclip
    from calibclip.datasets import build_dataloader, build_transforms
    from calibclip.evaluation import Evaluator

    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=32,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=16,
        image_size=32,
        text_width=64,
        text_layers=2,
    )
    path = tmp_path / "calibclip_cuhkpedes.pth"
    torch.save({"state_dict": CLIP(cfg).state_dict()}, path)
    model = build_calibclip(pretrained=str(path), embed_dim=32, vision_layers=2, text_layers=2, image_size=(64, 32))
    model.eval()
    assert isinstance(model, CalibCLIP)
    transform = build_transforms(is_train=False, image_size=(64, 32))
    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    dataloader = build_dataloader("cuhkpedes", root, split="test", batch_size=8, transform=transform)
    results = Evaluator(model, device="cpu").evaluate(dataloader)
    assert set(results) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert 0.0 <= results["rank1"] <= results["rank5"] <= results["rank10"] <= 100.0
