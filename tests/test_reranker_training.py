"""Re-ranker training lists (training.reranker) and the starter's token views from its lower-activation cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from calibclip.training.config import RerankerOptions, settings_from_config
from calibclip.training.rerank_data import mine_candidates


def test_mine_candidates_noise_changes_lists_but_keeps_one_positive():
    torch.manual_seed(0)
    text, image = torch.randn(50, 8), torch.randn(30, 8)
    positives = torch.randint(0, 30, (50,))
    plain = mine_candidates(text, image, positives, 6)
    noisy = mine_candidates(text, image, positives, 6, noise=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(plain, noisy)
    for lists in (plain, noisy):
        assert ((lists == positives[:, None]).sum(1) == 1).all()
    assert torch.equal(plain, mine_candidates(text, image, positives, 6, noise=0.0))


def test_reranker_options_are_checked():
    cfg = {"training": {"target": "reranker", "reranker": {"train_top_k": 32, "list_size": 16, "random_negatives": 4}}}
    s = settings_from_config(cfg)
    assert s.reranker == RerankerOptions(train_top_k=32, list_size=16, random_negatives=4)
    with pytest.raises(ValueError, match="training.reranker.bogus"):
        settings_from_config({"training": {"reranker": {"bogus": 1}}})
    with pytest.raises(ValueError, match="must be below list_size"):
        settings_from_config({"training": {"reranker": {"list_size": 4, "random_negatives": 4}}})
    assert settings_from_config({}).fingerprint() != s.fingerprint()


def _target_with_lists(options: RerankerOptions, n_images: int = 20, n_captions: int = 40):
    """A RerankerTarget's list sampling over fake views (no encoder forward)."""
    from calibclip.training.reranker_target import RerankerTarget

    target = RerankerTarget.__new__(RerankerTarget)
    torch.manual_seed(0)
    target.options = options
    target.positives = torch.arange(n_captions) % n_images
    target.gallery = torch.nn.functional.normalize(torch.randn(n_images, 8), dim=-1)
    pool = options.train_top_k
    target.candidates = mine_candidates(torch.randn(n_captions, 8), target.gallery, target.positives, pool)
    target.list_size = options.list_size or pool
    target.generator = torch.Generator().manual_seed(0)
    return target


def test_training_lists_mix_mined_and_random_negatives():
    target = _target_with_lists(RerankerOptions(train_top_k=10, list_size=6, random_negatives=2))
    captions = torch.arange(40)
    cand, col = target.training_lists(captions)
    pos = target.positives[captions]
    assert cand.shape == (40, 6)
    assert torch.equal(cand[torch.arange(40), col], pos)
    assert ((cand == pos[:, None]).sum(1) == 1).all()  # exactly one positive: random ones skip it
    mined = target.candidates[captions]
    for row, pool in zip(cand[:, 1:4], mined):  # the mined part is drawn from the caption's own pool
        assert set(row.tolist()) <= set(pool.tolist())
    again, _ = target.training_lists(captions)
    assert not torch.equal(cand, again)  # a fresh draw each step
    full = _target_with_lists(RerankerOptions(train_top_k=5))
    lists, col = full.training_lists(captions)
    assert torch.equal(lists, full.candidates[captions])
    assert torch.equal(lists[torch.arange(40), col], full.positives[captions])


@pytest.mark.slow
def test_starter_token_views_from_lower_cache_match_the_encoder(tmp_path: Path):
    """The starter's token views computed from its lower-activation cache (upper part only) equal the full
    forward's up to the fp16 rounding of the cache; a complete cache is reused without writing to it."""
    from calibclip.data.tokens import extract_token_views
    from calibclip.datasets import load_dataset
    from calibclip.models.registry import create_model
    from calibclip.training.starter_tokens import lower_cache_folders, starter_token_views
    from test_train_starter import make_flickr_set

    data = make_flickr_set(tmp_path / "f8k", n_train=6, n_dev=2)
    ds = load_dataset("flickr8k", data, "train")
    enc = create_model("starter")
    img_dir, txt_dir, k, n_lower = lower_cache_folders(enc, ds, tmp_path / "cache")
    assert (k, n_lower) == (1, 4) and img_dir.name == "images-1-lite0+lite2" and txt_dir.name == "text-4"
    fast = starter_token_views(enc, ds, tmp_path / "cache", progress=False)
    full = extract_token_views(enc, ds.images, ds.captions, tmp_path / "tokens", progress=False)
    assert fast.image_tokens.shape == full.image_tokens.shape
    assert torch.equal(fast.text_offsets, full.text_offsets)
    for a, b in (
        (fast.image_pooled, full.image_pooled),
        (fast.text_pooled, full.text_pooled),
        (fast.image_tokens.float(), full.image_tokens.float()),
        (fast.text_tokens.float(), full.text_tokens.float()),
    ):
        cos = torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1)
        assert float(cos.min()) > 0.999
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")}
    again = starter_token_views(enc, ds, tmp_path / "cache", progress=False)
    assert torch.equal(again.image_tokens, fast.image_tokens)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")} == stamps
    with pytest.raises(TypeError, match="need the starter"):
        starter_token_views(SimpleNamespace(), ds, tmp_path / "cache")


def test_tune_reranker_tool_grid_matches_evaluate(tmp_path: Path, color_model: str, capsys) -> None:
    """tools/tune_reranker.py: every (K, w) of the grid, the choice, and the written re-ranker; `calibclip
    evaluate --rerank` of the written one reproduces the chosen grid row."""
    import importlib.util
    import json

    from calibclip.calibration.reranker import CrossModalReranker, RerankerConfig, load_reranker
    from calibclip.cli.main import main
    from calibclip.models.registry import create_model
    from fakes import make_flickr8k

    spec = importlib.util.spec_from_file_location("tune_reranker", Path(__file__).parents[1] / "tools/tune_reranker.py")
    tool = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(tool)  # type: ignore[union-attr]
    root = make_flickr8k(tmp_path / "f8k", n_images=6)
    enc = create_model(color_model)
    torch.manual_seed(0)
    model = CrossModalReranker(RerankerConfig(token_dim=enc.embed_dim, width=8, num_heads=2, encoder=enc.fingerprint()))
    torch.nn.init.normal_(model.head.weight, std=1.0)
    model.save(tmp_path / "rr")
    out = tmp_path / "tune.json"
    argv = ["--data-root", str(root), "--model", color_model, "--rerank", str(tmp_path / "rr")]
    argv += ["--top-k", "2,4", "--weights", "0.01,100", "--out", str(out), "--write", str(tmp_path / "tuned")]
    assert tool.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "dev" and len(report["plain"]["grid"]) == 4
    rows = {tuple(r[k] for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10")) for r in report["plain"]["grid"]}
    assert len(rows) > 1  # the grid points rank differently (the head is random, not the zero no-op)
    chosen = report["chosen"]
    tuned = load_reranker(tmp_path / "tuned")
    assert (tuned.config.top_k, tuned.config.fusion_weight) == (chosen["top_k"], chosen["fusion_weight"])
    assert tuned.card["dev_choice"]["chosen"] == chosen
    capsys.readouterr()
    base = ["evaluate", "--dataset", "flickr8k", "--data-root", str(root), "--split", "dev", "--model", color_model]
    assert main(base + ["--rerank", str(tmp_path / "tuned"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    assert {k: round(metrics[k], 2) for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10")} == {
        k: chosen[k] for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10")
    }
