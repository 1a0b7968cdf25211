"""The trained cross-modal re-ranker (README's Calibrated Vision Encoder): scoring, top-K placement, files."""

from __future__ import annotations

import json

import pytest
import torch

from calibclip.calibration.rerank import fuse_scores, place_topk
from calibclip.calibration.reranker import (
    CrossModalReranker,
    RerankerConfig,
    Reranking,
    listwise_loss,
    load_reranker,
    render_match,
)


def _trained_like(cfg: RerankerConfig, seed: int = 0) -> CrossModalReranker:
    """A re-ranker with random (non-zero) head so that scores differ between candidates."""
    torch.manual_seed(seed)
    model = CrossModalReranker(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def tiny_clip():
    from calibclip.models.clip import CLIP, CLIPConfig

    torch.manual_seed(0)
    return CLIP(
        CLIPConfig(
            embed_dim=16,
            image_size=(64, 64),
            text_width=32,
            text_layers=1,
            text_heads=2,
            vision_heads=2,
            vision_layers=1,
            vision_width=32,
            vision_patch_size=16,
        )
    ).eval()


def test_scores_independent_of_other_candidates():
    model = _trained_like(RerankerConfig(token_dim=12, width=16, num_heads=4, dropout=0.1))
    text, pad = model.project_text(torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    images = model.project_image(torch.randn(2, 6, 9, 12))  # 2 queries x 6 candidates x 9 tokens
    with torch.no_grad():
        scores, _ = model.score_candidates(text, pad, images)
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        permuted, _ = model.score_candidates(text, pad, images[:, perm])
        alone, _ = model.score_candidates(text[1:], pad[1:], images[1:, 2:3])
    assert torch.allclose(permuted, scores[:, perm], atol=1e-6)
    assert torch.allclose(alone[0, 0], scores[1, 2], atol=1e-6)
    assert scores.std() > 0  # candidates are actually told apart


def test_padding_tokens_are_ignored():
    model = _trained_like(RerankerConfig(token_dim=8, width=16, num_heads=2))
    tokens = torch.randn(1, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0]])
    garbage = tokens.clone()
    garbage[0, 2:] = 100.0
    image = model.project_image(torch.randn(1, 5, 8))
    with torch.no_grad():
        a = model.match(*model.project_text(tokens, mask), image)[0]
        b = model.match(*model.project_text(garbage, mask), image)[0]
    assert torch.allclose(a, b, atol=1e-6)


def test_untrained_reranker_is_identity():
    model = CrossModalReranker(RerankerConfig(token_dim=8, width=16, num_heads=2)).eval()
    text, pad = model.project_text(torch.randn(3, 4, 8), torch.ones(3, 4))
    sim = torch.rand(3, 5)
    fused = model.fuse(sim, model.score_candidates(text, pad, model.project_image(torch.randn(3, 5, 6, 8)))[0])
    assert torch.equal(fused, sim)


def test_place_topk_only_moves_top_k():
    torch.manual_seed(1)
    raw = torch.rand(4, 30).double()
    k = 5
    idx = torch.topk(raw, k, dim=1).indices
    fused = torch.rand(4, k).double() * 10 - 5
    out = place_topk(raw, idx, fused)
    order = torch.argsort(out, dim=1, descending=True)
    for q in range(4):
        assert set(order[q, :k].tolist()) == set(idx[q].tolist())  # the top-K stay on top
        rest = order[q, k:]
        assert torch.all(raw[q, rest][:-1] >= raw[q, rest][1:])  # the others keep their raw order
    # fuse_scores is place_topk of the calibrated mix
    cal = torch.rand(4, 30).double()
    mix = torch.gather(raw, 1, idx) * 0.4 + torch.gather(cal, 1, idx) * 0.6
    assert torch.allclose(fuse_scores(raw, cal, k, 0.4), place_topk(raw, idx, mix))


def test_rerank_matrix_matches_pairwise_scoring():
    enc = tiny_clip()
    model = _trained_like(RerankerConfig(token_dim=16, width=16, num_heads=2, top_k=3))
    rr = Reranking(enc, model)
    pixels = torch.randn(5, 3, 64, 64)
    gallery = rr.image_tokens(pixels)
    assert gallery.dtype == torch.float16 and gallery.shape == (5, 16, 16)
    pooled, text, pad = rr.text_inputs(["a red car", "two dogs on the grass"])
    g = torch.nn.functional.normalize(enc.encode_image(pixels).float(), dim=-1)
    sim = torch.nn.functional.normalize(pooled, dim=-1) @ g.T
    out = rr.rerank_matrix(sim, text, pad, gallery, chunk=1)
    for q in range(2):
        top = torch.topk(sim[q], 3).indices
        expect = (
            sim[q, top].double()
            + model.score_candidates(text[q : q + 1], pad[q : q + 1], gallery[top][None].float())[0][0].double()
        )
        assert torch.allclose(out[q, top], expect, atol=1e-5)
        others = torch.tensor([i for i in range(5) if i not in top.tolist()])
        assert out[q, others].max() < out[q, top].min()


def test_other_encoder_is_a_clear_error(tmp_path):
    enc = tiny_clip()
    with pytest.raises(ValueError, match="width 32.*width 16"):
        Reranking(enc, CrossModalReranker(RerankerConfig(token_dim=32, width=16, num_heads=2, encoder_name="starter")))
    other = CrossModalReranker(RerankerConfig(token_dim=16, width=16, num_heads=2, encoder="starter-0123"))
    with pytest.raises(ValueError, match="trained on encoder starter-0123"):
        Reranking(enc, other)


def test_save_load_roundtrip_and_bad_files(tmp_path):
    model = _trained_like(RerankerConfig(token_dim=8, width=16, num_heads=2, top_k=7))
    model.save(tmp_path / "rr", card={"trained_on": "synthetic"})
    loaded = load_reranker(tmp_path / "rr")
    assert loaded.config == model.config and loaded.card == {"trained_on": "synthetic"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(FileNotFoundError, match="not a re-ranker checkpoint"):
        load_reranker(tmp_path / "missing")
    (tmp_path / "rr" / "reranker.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable re-ranker config"):
        load_reranker(tmp_path / "rr")
    model.save(tmp_path / "nan")
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan" / "reranker.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        load_reranker(tmp_path / "nan")
    meta = json.loads((tmp_path / "nan" / "reranker.json").read_text())
    meta["config"]["width"] = 32
    (tmp_path / "nan" / "reranker.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit"):
        load_reranker(tmp_path / "nan")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        RerankerConfig(token_dim=8, width=10, num_heads=3)
    with pytest.raises(ValueError, match="unknown re-ranker setting"):
        RerankerConfig.from_dict({"token_dim": 8, "layers": 2})


def test_listwise_training_learns_a_match():
    """A few steps of listwise training teach it to prefer the candidate whose tokens echo the query."""
    torch.manual_seed(0)
    model = CrossModalReranker(RerankerConfig(token_dim=8, width=32, num_heads=4, dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n: int = 32, k: int = 4):
        text = torch.randn(n, 3, 8)
        images = torch.randn(n, k, 5, 8)
        target = torch.randint(0, k, (n,))
        images[torch.arange(n), target, :3] = text  # the true candidate contains the query's tokens
        return text, images, target

    def accuracy() -> float:
        model.eval()
        text, images, target = batch(256)
        with torch.no_grad():
            x, pad = model.project_text(text, torch.ones(256, 3))
            s, _ = model.score_candidates(x, pad, model.project_image(images))
        model.train()
        return float((s.argmax(1) == target).float().mean())

    before = accuracy()
    for _ in range(150):
        text, images, target = batch()
        x, pad = model.project_text(text, torch.ones(len(text), 3))
        s, _ = model.score_candidates(x, pad, model.project_image(images))
        loss = listwise_loss(model.fuse(torch.zeros_like(s), s), target, temperature=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 0.4 and accuracy() > 0.9


def test_evaluate_with_reranking_only_moves_top_k(tmp_path):
    from calibclip.data.cache import FeatureCache
    from calibclip.datasets import load_dataset
    from calibclip.evaluation.evaluator import (
        dataset_features,
        dataset_metrics,
        dataset_token_views,
        evaluate_retrieval,
        rerank_similarity,
        similarity_matrix,
    )
    from fakes import make_flickr8k

    enc = tiny_clip()
    ds = load_dataset("flickr8k", make_flickr8k(tmp_path / "f8k", n_images=8), "dev")
    cache = FeatureCache(tmp_path / "cache" / "features")
    plain = evaluate_retrieval(enc, ds, cache=cache, progress=False)
    identity = Reranking(enc, CrossModalReranker(RerankerConfig(token_dim=16, width=16, num_heads=2, top_k=3)))
    assert evaluate_retrieval(enc, ds, cache=cache, progress=False, reranking=identity) == plain
    model = _trained_like(RerankerConfig(token_dim=16, width=16, num_heads=2, top_k=3), seed=3)
    texts, images = dataset_features(enc, ds, cache=cache, progress=False)
    sim = similarity_matrix(texts, images)
    views = dataset_token_views(enc, ds, cache, progress=False)
    assert views.image_tokens.shape[:2] == (8, 16) and len(views.text_offsets) == len(ds.captions) + 1
    out = rerank_similarity(sim, views, Reranking(enc, model), chunk=3)
    top = torch.topk(sim, 3, dim=1).indices
    new_top = torch.topk(out, 3, dim=1).indices
    assert all(set(a) == set(b) for a, b in zip(top.tolist(), new_top.tolist()))  # same candidates on top
    rest_order = torch.argsort(out, dim=1, descending=True)[:, 3:]
    assert torch.equal(
        rest_order,
        torch.argsort(
            sim.double() - 10 * torch.zeros_like(sim.double()).scatter_(1, top, -1.0), dim=1, descending=True
        )[:, 3:],
    )  # the others keep their order
    assert not torch.equal(out.argsort(dim=1), sim.double().argsort(dim=1))
    assert set(dataset_metrics(out, ds)) == set(plain)
    # cached token views are reused (same folder, same arrays)
    again = dataset_token_views(enc, ds, cache, progress=False)
    assert torch.equal(again.image_tokens, views.image_tokens)


def test_explain_match_maps_words_to_regions(tmp_path):
    from PIL import Image

    enc = tiny_clip()
    rr = Reranking(enc, _trained_like(RerankerConfig(token_dim=16, width=16, num_heads=2)))
    exp = rr.explain("a red car", torch.randn(1, 3, 64, 64))
    assert exp.tokens and len(exp.tokens) == exp.maps.shape[0] and exp.maps.shape[1:] == (4, 4)
    assert torch.allclose(exp.maps.flatten(1).sum(1), torch.ones(len(exp.tokens)), atol=1e-4)
    assert abs(exp.fused - (exp.similarity + exp.match)) < 1e-5
    png = render_match(Image.new("RGB", (64, 64), "white"), exp, tmp_path / "m.png")
    assert png.stat().st_size > 1000


def test_evaluate_cli_rerank_flag(tmp_path, capsys):
    """`calibclip evaluate --rerank PATH` re-ranks with a saved re-ranker and reports the same keys;
    a re-ranker of another encoder and a missing packaged one are one-line errors."""
    from calibclip.cli.main import main
    from fakes import make_flickr8k

    enc = tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save(enc.state_dict(), path)
    root = make_flickr8k(tmp_path / "f8k", n_images=8)
    base = [
        "evaluate",
        "--dataset",
        "flickr8k",
        "--data-root",
        str(root),
        "--split",
        "dev",
        "--model",
        str(path),
        "--json",
        "--no-cache",
    ]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from calibclip.models.registry import create_model

    loaded = create_model(str(path))
    model = _trained_like(RerankerConfig(token_dim=16, width=16, num_heads=2, top_k=4, encoder=loaded.fingerprint()))
    model.save(tmp_path / "rr")
    assert main(base + ["--rerank", str(tmp_path / "rr")]) == 0
    reranked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(reranked["metrics"]) == set(plain["metrics"])
    assert {k: v for k, v in reranked["metrics"].items() if k.startswith("i2t")} == {
        k: v for k, v in plain["metrics"].items() if k.startswith("i2t")
    }
    other = _trained_like(RerankerConfig(token_dim=32, width=16, num_heads=2, encoder_name="starter"))
    other.save(tmp_path / "other")
    assert main(base + ["--rerank", str(tmp_path / "other")]) == 2
    assert "width 32" in capsys.readouterr().err
    assert main(base + ["--rerank"]) == 2
    assert "no re-ranker ships with" in capsys.readouterr().err


def test_trainer_reranker_target(tmp_path):
    """One trainer, a `reranker` target: the frozen dual encoder's top-K is re-ranked by a re-ranker
    trained with the listwise loss; best/last load with `load_reranker`; evaluate --rerank uses them."""
    from calibclip.cli.main import main
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import train
    from test_train import make_person_set, make_tiny_clip, write_config

    people = make_person_set(tmp_path / "people")
    clip = make_tiny_clip(tmp_path / "clip")
    cfg = write_config(
        tmp_path / "cfg.yaml", training={"target": "reranker", "epochs": 2, "lr": 1e-3, "max_train_images": 40}
    )
    import yaml

    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["cve"] = {"num_layers": 1, "num_heads": 2, "width": 16, "top_k": 4, "dropout": 0.0}
    cfg.write_text(yaml.safe_dump(raw))
    settings = load_train_settings(cfg, {"data_root": str(people)})
    summary = train(settings, tmp_path / "out", checkpoint=str(clip), progress=False)
    assert len(summary["history"]) == 2 and all("train_loss" in h for h in summary["history"])
    model = load_reranker(tmp_path / "out" / "best")
    assert model.config.top_k == 4 and model.config.width == 16 and model.config.num_layers == 1
    assert any(float(p.abs().sum()) > 0 for p in model.head.parameters())  # it trained (the head starts at zero)
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "cuhkpedes",
                "--data-root",
                str(people),
                "--split",
                "val",
                "--model",
                str(clip),
                "--rerank",
                str(tmp_path / "out" / "best"),
                "--no-cache",
                "--json",
            ]
        )
        == 0
    )


def test_token_cache_refuses_other_data_and_bad_images(tmp_path):
    """A token-view folder of other items is a clear error (never silently mixed); an unreadable training
    image is one error naming how many could not be read."""
    from calibclip.data.tokens import extract_token_views
    from calibclip.datasets import load_dataset
    from fakes import make_flickr8k

    enc = tiny_clip()
    ds = load_dataset("flickr8k", make_flickr8k(tmp_path / "f8k", n_images=4), "dev")
    extract_token_views(enc, ds.images, ds.captions, tmp_path / "tok", progress=False)
    with pytest.raises(ValueError, match="other data or another encoder"):
        extract_token_views(enc, ds.images[:2], ds.captions, tmp_path / "tok", progress=False)
    bad = list(ds.images)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    bad[1] = tmp_path / "broken.jpg"
    with pytest.raises(RuntimeError, match="could not be read"):
        extract_token_views(enc, bad, ds.captions, tmp_path / "tok2", progress=False)
