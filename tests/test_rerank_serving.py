"""Serving the trained re-ranker (issue 12): re-ranker tokens stored in the index, `Index.search(rerank=...)`,
`calibclip search/index/explain --rerank`, and the web page's re-rank mode. Tiny encoder, tiny re-ranker."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from calibclip.calibration.reranker import CrossModalReranker, RerankerConfig, Reranking, load_reranker
from calibclip.index import Index, Storage
from fakes import PhotoEncoder

torch.set_num_threads(1)
SKIMAGE = Path(os.path.dirname(skimage.data.__file__))
NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "horse.png", "camera.png", "brick.png")
TEXT = "a cat on the red grass"


def make_images(root: Path, names: tuple[str, ...] = NAMES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        img = Image.open(SKIMAGE / name).convert("RGB")
        img.thumbnail((64, 64))
        img.save(root / (Path(name).stem + ".png"))
    return root


def make_reranker(folder: Path, encoder: PhotoEncoder, seed: int = 0, top_k: int = 4, head_only: Path | None = None):
    """A re-ranker for ``encoder`` with a random (non-zero) head; ``head_only``: copy the image projection
    of that re-ranker (same stored tokens, other scores)."""
    torch.manual_seed(seed)
    cfg = RerankerConfig(
        token_dim=encoder.embed_dim,
        width=8,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        top_k=top_k,
        fusion_weight=1.0,
        encoder=encoder.fingerprint(),
        encoder_name=encoder.name,
    )
    model = CrossModalReranker(cfg)
    torch.nn.init.normal_(model.head.weight, std=2.0)
    if head_only is not None:
        other = load_reranker(head_only)
        model.image_norm.load_state_dict(other.image_norm.state_dict())
        model.image_proj.load_state_dict(other.image_proj.state_dict())
    model.save(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rr")
    images = make_images(root / "images")
    enc = PhotoEncoder()
    rr = make_reranker(root / "rr", enc)
    index = Index.build(images, root / "ix", model=enc, batch_size=3, workers=0, progress=False, rerank=rr)
    plain = Index.build(images, root / "plain", model=enc, batch_size=3, workers=0, progress=False)
    return {"root": root, "images": images, "enc": enc, "rr": rr, "index": index, "plain": plain}


def test_index_stores_projected_fp16_tokens(setup):
    index, enc = setup["index"], setup["enc"]
    info = index.reranker_info
    assert index.has_rerank and info is not None
    assert info["tokens"] == [16, 8] and info["grid"] == [4, 4]
    assert info["source"] == str(Path(setup["rr"]).resolve()) and len(info["sha256"]) == 64
    rr = index.reranking()
    ids = index.ids
    stored = index.rerank_tokens(ids)
    assert stored.dtype == np.float16 and stored.shape == (len(ids), 16, 8)
    pixels = index.pixels([int(i) for i in ids])
    expected = rr.image_tokens(pixels).numpy()
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), atol=2e-3, rtol=2e-3)
    # the raw vectors are the encoder's (computed from the same forward)
    np.testing.assert_allclose(index.features("raw", ids), enc.encode_image(pixels).numpy(), atol=3e-3, rtol=3e-3)
    files = sorted(p.name for p in Path(index.location).iterdir())
    assert "reranker.json" in files and "reranker.safetensors" in files
    assert any(p.name.endswith(".tok.f16") for p in (Path(index.location) / "vectors").iterdir())
    assert index.info()["reranker"]["projection"] == rr.projection_id()


def test_rerank_search_moves_only_the_top_k(setup):
    index = setup["index"]
    plain = index.search(TEXT, k=7)
    rr = index.reranking(top_k=4)
    reranked = index.search(TEXT, k=7, rerank=True, rerank_top_k=4)
    assert [r.id for r in reranked[4:]] == [r.id for r in plain[4:]]  # below K: same order, same scores
    assert [r.score for r in reranked[4:]] == pytest.approx([r.score for r in plain[4:]])
    assert sorted(r.id for r in reranked[:4]) == sorted(r.id for r in plain[:4])
    # the top-K's order and scores are the fused ones, computed by hand from the stored tokens
    _, x, pad = rr.text_inputs(TEXT)
    cand = torch.from_numpy(index.rerank_tokens([r.id for r in plain[:4]]))[None]
    fused, _ = rr.rescore(torch.tensor([[r.score for r in plain[:4]]], dtype=torch.float64), x, pad, cand)
    want = sorted(zip(fused[0].tolist(), [r.id for r in plain[:4]]), key=lambda t: -t[0])
    assert [r.id for r in reranked[:4]] == [i for _, i in want]
    assert [r.score for r in reranked[:4]] == pytest.approx([s for s, _ in want], abs=1e-4)
    assert [r.rank for r in reranked] == list(range(1, 8))
    assert [r.id for r in reranked[:4]] != [r.id for r in plain[:4]] or fused.std() > 0  # not a no-op
    # k smaller than K: the first k of the re-ranked top-K
    assert [r.id for r in index.search(TEXT, k=2, rerank=True, rerank_top_k=4)] == [r.id for r in reranked[:2]]


def test_rerank_equals_evaluation_reranking(setup):
    """Index search's re-ranked order equals `Reranking.rerank_matrix` (what `evaluate --rerank` uses)."""
    index = setup["index"]
    rr = index.reranking(top_k=3)
    q = index.encode_text(TEXT)["raw"]
    gallery = index.features("raw")
    sim = torch.from_numpy(gallery / np.linalg.norm(gallery, axis=1, keepdims=True)) @ (q / q.norm())
    _, x, pad = rr.text_inputs(TEXT)
    scores = rr.rerank_matrix(sim[None].float(), x, pad, index.rerank_tokens(index.ids))
    order = index.ids[torch.argsort(scores[0], descending=True, stable=True).numpy()]
    got = [r.id for r in index.search(TEXT, k=len(index), rerank=True, rerank_top_k=3)]
    assert got == order.tolist()


def test_four_modes_and_calibrated_rerank(setup, tmp_path):
    enc = PhotoEncoder()
    index = Index.build(
        setup["images"], tmp_path / "ix", model=enc, workers=0, progress=False, rerank=setup["rr"], calibrate=True
    )
    modes = {
        "plain": index.search(TEXT, k=7),
        "calibrated": index.search(TEXT, k=7, calibrate=True),
        "reranked": index.search(TEXT, k=7, rerank=True),
        "both": index.search(TEXT, k=7, calibrate=True, rerank=True),
    }
    for hits in modes.values():
        assert sorted(h.id for h in hits) == sorted(index.ids.tolist())
    k = index.reranking().top_k
    assert [h.id for h in modes["both"][k:]] == [h.id for h in modes["calibrated"][k:]]
    assert sorted(h.id for h in modes["both"][:k]) == sorted(h.id for h in modes["calibrated"][:k])


def test_rerank_errors(setup, tmp_path):
    index, plain, enc = setup["index"], setup["plain"], setup["enc"]
    with pytest.raises(ValueError, match=r"holds no re-ranker tokens.*calibclip index .* --rerank"):
        plain.search(TEXT, rerank=True)
    with pytest.raises(ValueError, match="text queries"):
        index.search(image=int(index.ids[0]), rerank=True)
    with pytest.raises(ValueError, match="text queries"):
        index.search(TEXT, image=int(index.ids[0]), rerank=True)
    other = make_reranker(tmp_path / "other", enc, seed=5)
    with pytest.raises(ValueError, match="projects image tokens differently"):
        index.search(TEXT, rerank=other)
    # a re-ranker of another encoder (token width): load_reranker/Reranking's own check
    wide = PhotoEncoder(dim=12)
    make_reranker(tmp_path / "wide", wide)
    with pytest.raises(ValueError, match="width"):
        index.search(TEXT, rerank=tmp_path / "wide")
    # same width, other encoder: the fingerprint check
    make_reranker(tmp_path / "seed", PhotoEncoder(seed=3))
    with pytest.raises(ValueError, match="trained on encoder"):
        index.search(TEXT, rerank=tmp_path / "seed")
    with pytest.raises(FileNotFoundError, match="not a re-ranker"):
        index.search(TEXT, rerank=tmp_path / "nothing")
    with pytest.raises(ValueError, match="no re-ranker ships"):
        Index.build(setup["images"], tmp_path / "p", model=enc, workers=0, progress=False, rerank=True)


def test_same_projection_other_head_shares_the_tokens(setup, tmp_path):
    index, enc = setup["index"], setup["enc"]
    head = make_reranker(tmp_path / "head", enc, seed=9, head_only=Path(setup["rr"]))
    hits = index.search(TEXT, k=7, rerank=head, rerank_top_k=4)
    assert sorted(h.id for h in hits[:4]) == sorted(h.id for h in index.search(TEXT, k=4))
    assert isinstance(index.reranking(head), Reranking)


def test_update_keeps_tokens_and_resumes(setup, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    enc = PhotoEncoder()
    out = tmp_path / "ix"
    Index.build(images, out, model=enc, batch_size=2, workers=0, progress=False, rerank=setup["rr"]).close()
    Image.open(SKIMAGE / "grass.png").convert("RGB").resize((48, 48)).save(images / "grass.png")
    (images / "brick.png").unlink()
    again = Index.build(images, out, model=enc, batch_size=2, workers=0, progress=False)  # rerank=None: keep
    assert again.report is not None and again.report.added == 1 and again.report.removed == 1
    assert again.has_rerank
    new = again.find("grass.png")
    assert new is not None
    want = again.reranking().image_tokens(again.pixels([new])).numpy().astype(np.float32)
    np.testing.assert_allclose(again.rerank_tokens([new]).astype(np.float32), want, atol=2e-3, rtol=2e-3)
    # compaction keeps tokens aligned with their images
    st = Storage(out, writable=True)
    st.compact()
    st.close()
    reopened = Index.open(out, model=enc)
    np.testing.assert_array_equal(reopened.rerank_tokens([new]), again.rerank_tokens([new]))
    assert reopened.search(TEXT, k=3, rerank=True)
    # rerank=False drops the tokens and the copy
    dropped = Index.build(images, out, model=enc, workers=0, progress=False, rerank=False)
    assert not dropped.has_rerank and not (out / "reranker.json").exists()
    assert not any(p.name.endswith(".tok.f16") for p in (out / "vectors").iterdir())


def test_uncommitted_token_tail_is_truncated(setup, tmp_path):
    """A build killed after writing a batch's rows but before its commit: the tails are dropped."""
    out = tmp_path / "ix"
    shutil.copytree(setup["index"].location, out)
    st = Storage(out, writable=True)
    path = st.token_path("rerank")
    size = path.stat().st_size
    st.close()
    with open(path, "ab") as f:
        f.write(b"\x00" * 1000)  # a half-written batch
    st = Storage(out, writable=True)  # the next writer recovers
    st.close()
    assert path.stat().st_size == size
    with open(path, "r+b") as f:
        f.truncate(size - 2)  # a committed row missing: damage, said on open
    from calibclip.index import IndexStateError

    with pytest.raises(IndexStateError, match="damaged"):
        Index.open(out)


def test_explain_match_from_stored_tokens(setup):
    index = setup["index"]
    hit = index.search(TEXT, k=1, rerank=True)[0]
    exp = index.explain_match(TEXT, hit.id)
    assert len(exp.tokens) == len(TEXT.split())  # the fake encoder names tokens #id
    assert tuple(exp.maps.shape) == (len(exp.tokens), 4, 4)
    torch.testing.assert_close(exp.maps.sum((1, 2)), torch.ones(len(exp.tokens)), atol=1e-4, rtol=0)
    assert exp.fused == pytest.approx(hit.score, abs=1e-3)  # plain + re-rank: the fused score shown
    pixels_exp = index.reranking().explain(TEXT, index.pixels([hit.id]))
    torch.testing.assert_close(exp.maps, pixels_exp.maps, atol=2e-3, rtol=0)


def test_milvus_refuses_rerank_in_one_line():
    from calibclip.index.stores.base import no_tokens_message

    msg = no_tokens_message("milvus")
    assert "\n" not in msg and "--rerank" in msg and "--out DIR" in msg


def test_milvus_store_build_refuses(setup, tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    with pytest.raises(ValueError, match="milvus store does not hold the re-ranker"):
        Index.build(
            setup["images"],
            f"milvus:{tmp_path / 'm.db'}",
            model=setup["enc"],
            workers=0,
            progress=False,
            rerank=setup["rr"],
        )


# --- CLI -----------------------------------------------------------------------------------------
@pytest.fixture()
def cli_setup(setup, monkeypatch):
    from fakes import register_fake_model

    register_fake_model(monkeypatch, "fake-test", lambda **_: PhotoEncoder())
    return setup


def test_cli_index_and_search_rerank(cli_setup, tmp_path, capsys):
    from calibclip.cli.main import main

    s = cli_setup
    out = tmp_path / "ix"
    assert (
        main(
            [
                "index",
                str(s["images"]),
                "--out",
                str(out),
                "--model",
                "fake-test",
                "--rerank",
                str(s["rr"]),
                "--quiet",
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == len(NAMES) and report["reranker"]["tokens"] == [16, 8]
    assert main(["search", str(out), "--text", TEXT, "--top-k", "5", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["search", str(out), "--text", TEXT, "--top-k", "5", "--rerank", "--rerank-top-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["query"]["rerank"] == str(Path(s["rr"]).resolve()) and got["query"]["rerank_top_k"] == 3
    assert [r["id"] for r in got["results"][3:]] == [r["id"] for r in plain["results"][3:]]
    assert [r["reranked"] for r in got["results"]] == [True] * 3 + [False] * 2
    assert main(["search", str(out), "--text", TEXT, "--rerank", str(s["rr"]), "--json"]) == 0
    capsys.readouterr()


def test_cli_search_rerank_errors(cli_setup, tmp_path, capsys):
    from calibclip.cli.main import main

    s = cli_setup
    assert (
        main(
            [
                "index",
                str(s["images"]),
                "--out",
                str(tmp_path / "p"),
                "--model",
                "fake-test",
                "--quiet",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(["search", str(tmp_path / "p"), "--text", TEXT, "--rerank"])
    err = capsys.readouterr().err
    assert code != 0 and "--rerank" in err and "calibclip index" in err and len(err.strip().splitlines()) == 1
    code = main(["search", str(tmp_path / "p"), "--image", "id:1", "--rerank"])
    assert code != 0 and "text queries" in capsys.readouterr().err


def test_cli_explain_rerank(cli_setup, tmp_path, capsys):
    from calibclip.cli.main import main

    s = cli_setup
    img = s["images"] / "chelsea.png"
    png = tmp_path / "why.png"
    assert (
        main(
            [
                "explain",
                "--image",
                str(img),
                "--text",
                TEXT,
                "--model",
                "fake-test",
                "--rerank",
                str(s["rr"]),
                "--out",
                str(png),
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    rr = data["rerank"]
    assert len(rr["tokens"]) == len(TEXT.split()) and rr["grid"] == [4, 4] and len(rr["attention"]) == len(TEXT.split())
    assert Path(data["rerank_png"]).is_file() and Path(data["rerank_png"]).read_bytes()[:4] == b"\x89PNG"
    code = main(["explain", "--image", str(img), "--model", "fake-test", "--rerank", str(s["rr"])])
    assert code != 0 and "--text" in capsys.readouterr().err


# --- web -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(setup, tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from calibclip.web.app import WebConfig, create_app
    from calibclip.web.service import ServedIndex

    enc = setup["enc"]
    served = [
        ServedIndex("rr", Index.open(setup["index"].location, model=enc), refresh_s=None),
        ServedIndex("plain", Index.open(setup["plain"].location, model=enc), refresh_s=None),
    ]
    app = create_app(WebConfig(index_dirs=[], upload_dir=str(tmp_path_factory.mktemp("up"))), indexes=served)
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def test_api_search_rerank(client, setup):
    info = {i["name"]: i for i in client.get("/api/indexes").json()["indexes"]}
    assert info["rr"]["rerank"] is True and info["plain"]["rerank"] is False
    plain = client.post("/api/search", json={"index": "rr", "text": TEXT, "k": 7}).json()
    r = client.post("/api/search", json={"index": "rr", "text": TEXT, "k": 7, "rerank": True, "rerank_top_k": 3})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["query"]["rerank"] is True and data["query"]["rerank_top_k"] == 3
    assert [x["reranked"] for x in data["results"]] == [True] * 3 + [False] * 4
    assert [x["id"] for x in data["results"][3:]] == [x["id"] for x in plain["results"][3:]]
    assert all(x["match_url"].startswith("/api/match-heatmap/") for x in data["results"][:3])
    assert all(x["match_url"] is None for x in data["results"][3:])
    direct = setup["index"].search(TEXT, k=7, rerank=True, rerank_top_k=3)
    assert [x["id"] for x in data["results"]] == [str(h.id) for h in direct]


def test_api_search_rerank_errors(client):
    r = client.post("/api/search", json={"index": "plain", "text": TEXT, "rerank": True})
    assert r.status_code == 400 and "calibclip index" in r.json()["detail"] and "--rerank" in r.json()["detail"]
    r = client.post("/api/search", json={"index": "rr", "reference": "1", "rerank": True})
    assert r.status_code == 400 and "text queries" in r.json()["detail"]
    r = client.post("/api/search", json={"index": "rr", "text": TEXT, "rerank": True, "rerank_top_k": 0})
    assert r.status_code == 422


def test_api_explain_match_and_heatmap(client, setup):
    hit = client.post("/api/search", json={"index": "rr", "text": TEXT, "k": 1, "rerank": True}).json()["results"][0]
    r = client.post("/api/explain-match", json={"index": "rr", "text": TEXT, "id": hit["id"]})
    assert r.status_code == 200, r.text
    exp = r.json()
    assert len(exp["tokens"]) == len(TEXT.split()) and exp["grid"] == [4, 4]
    assert len(exp["attention"]) == len(exp["tokens"]) and all(len(a) == 16 for a in exp["attention"])
    assert exp["fused"] == pytest.approx(hit["score"], abs=1e-3)
    png = client.get(hit["match_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    r = client.post("/api/explain-match", json={"index": "plain", "text": TEXT, "id": hit["id"]})
    assert r.status_code == 400
    r = client.post("/api/explain-match", json={"index": "rr", "text": TEXT, "id": "999999"})
    assert r.status_code == 404


def test_search_page_has_the_rerank_toggle(client):
    page = client.get("/search?index=rr").text
    assert 'id="rerank"' in page and 'data-rerank="true"' in page
    page = client.get("/search?index=plain").text
    assert 'data-rerank="false"' in page


def test_cli_info_shows_the_reranker(setup, capsys):
    from calibclip.cli.main import main

    assert main(["info", str(setup["index"].location)]) == 0
    out = capsys.readouterr().out
    assert "reranker" in out and "16x8 fp16 tokens/image = 256 bytes" in out


def test_inference_fast_path_equals_the_full_forward():
    """`match` in eval mode (first block's self-attention once per query, last block on the summary token
    only) gives the scores of the full forward (the path with attention maps, and training's)."""
    torch.manual_seed(0)
    for layers in (1, 2, 3):
        cfg = RerankerConfig(token_dim=12, width=16, num_layers=layers, num_heads=4, dropout=0.0)
        model = CrossModalReranker(cfg).eval()
        torch.nn.init.normal_(model.head.weight, std=1.0)
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1, 1, 0, 0, 0, 0]])
        text, pad = model.project_text(torch.randn(3, 6, 12), mask)
        images = model.project_image(torch.randn(3, 5, 9, 12))
        with torch.no_grad():
            fast, none = model.score_candidates(text, pad, images)
            full, maps = model.score_candidates(text, pad, images, need_weights=True)
            model.train()  # no dropout (0.0): training's path, same function
            trained, _ = model.score_candidates(text, pad, images)
        assert none is None and maps is not None
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast, trained, atol=1e-5, rtol=1e-5)
