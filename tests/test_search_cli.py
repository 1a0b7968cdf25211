"""`calibclip index` / `search` / `info` end to end (in-process CLI, a registered toy model), plus a
slow check on Flickr8k with the default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibclip.cli.main import main
from calibclip.models import registry
from fakes import PhotoEncoder as FakeEncoder
from test_index_helpers import make_photo_folder

torch.set_num_threads(1)


@pytest.fixture()
def fake_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only two toy models in the registry (isolated from the real providers)."""
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")
    registry.register_model("fake-other", lambda **kw: FakeEncoder(seed=5), pretrained="random")


def cli_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {out!r}"
    return json.loads(lines[0])


def test_index_info_search_cli(tmp_path, capsys, fake_models):
    good, bad = make_photo_folder(tmp_path / "img")
    ix = str(tmp_path / "ix")
    report = cli_json(
        capsys,
        [
            "index",
            str(tmp_path / "img"),
            "--out",
            ix,
            "--model",
            "fake-test",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--json",
            "--quiet",
        ],
    )
    assert report["count"] == len(good) and report["skipped"] == len(bad)

    again = cli_json(capsys, ["index", str(tmp_path / "img"), "--out", ix, "--json", "--quiet"])  # recorded model
    # skipped files are not "unchanged" images (issue 16): only the good ones are
    assert (again["added"], again["count"], again["unchanged"]) == (0, len(good), len(good))

    info = cli_json(capsys, ["info", ix, "--json", "--skipped"])
    assert (info["count"], info["skipped"], info["model"]) == (len(good), len(bad), "fake-test")
    assert {s["path"]: s["reason"] for s in info["skipped_files"]} == bad
    assert main(["info", ix, "--skipped"]) == 0
    text = capsys.readouterr().out
    assert all(path in text for path in bad) and "too_large" in text

    out = cli_json(capsys, ["search", ix, "--text", "a cat", "--top-k", "3", "--json"])
    assert out["query"]["text"] == "a cat" and len(out["results"]) == 3
    for rank, r in enumerate(out["results"], 1):
        assert Path(r["path"]).is_file() and isinstance(r["score"], float) and r["rank"] == rank
    assert [r["score"] for r in out["results"]] == sorted((r["score"] for r in out["results"]), reverse=True)

    by_path = cli_json(capsys, ["search", ix, "--image", "chelsea.png", "--top-k", "2", "--json"])
    assert by_path["results"][0]["relpath"] == "chelsea.png"
    ref = by_path["results"][0]["id"]
    composed = cli_json(capsys, ["search", ix, "--image", f"id:{ref}", "--text", "darker", "--json"])
    assert composed["query"]["combining"] == "sum" and ref not in [r["id"] for r in composed["results"]]
    assert len(composed["results"]) == len(good) - 1

    for kind in ("exact", "ivf", "hnsw"):
        res = cli_json(capsys, ["search", ix, "--text", "a cat", "--top-k", "5", "--json", "--ann", kind])
        assert res["query"]["ann"] == kind and len(res["results"]) == 5
    assert (Path(ix) / "ann" / "raw.hnsw.faiss").exists()

    # human-readable output
    assert main(["search", ix, "--text", "a cat", "--top-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_cli_errors_are_clear(tmp_path, capsys, fake_models):
    make_photo_folder(tmp_path / "img")
    ix = str(tmp_path / "ix")
    assert main(["index", str(tmp_path / "img"), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", ix, "--text", "a cat", "--model", "fake-other"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "img"), "--out", ix, "--model", "fake-other", "--quiet"]) == 2
    assert "built with model 'fake-test'" in capsys.readouterr().err
    assert main(["search", ix, "--text", "a cat", "--calibrate"]) == 2
    assert "re-run `calibclip index" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nothing"), "--text", "x"]) == 2
    assert "not an index" in capsys.readouterr().err
    assert main(["search", ix]) == 2
    assert main(["index", str(tmp_path / "missing"), "--out", ix, "--model", "fake-test"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_flickr8k_caption_rank_matches_evaluation(flickr8k_root, tmp_path, capsys):
    """Index 100 Flickr8k dev images with the default model; for 20 of their captions the rank that
    `calibclip search` gives the captioned image is the rank the evaluator's features and scores give
    (`dataset_features` + `similarity_matrix` + `positive_ranks` on the same 100-image gallery)."""
    import shutil

    from calibclip.data.cache import FeatureCache
    from calibclip.data.captions import load_flickr8k
    from calibclip.data.records import RetrievalDataset
    from calibclip.evaluation.evaluator import dataset_features, similarity_matrix
    from calibclip.evaluation.metrics import positive_ranks
    from calibclip.index import Index
    from calibclip.models.registry import create_model

    full = load_flickr8k(flickr8k_root, "dev")
    n = 100
    qi = np.flatnonzero(full.caption_image < n)[::5][:20]
    ds = RetrievalDataset(
        "flickr8k",
        "dev",
        full.root,
        full.images[:n],
        np.arange(n),
        [full.captions[i] for i in qi],
        full.caption_image[qi],
        full.caption_image[qi],
    )
    encoder = create_model("starter")
    texts, images = dataset_features(encoder, ds, cache=FeatureCache(tmp_path / "cache"), workers=1, progress=False)
    eval_ranks, _ = positive_ranks(similarity_matrix(texts, images), ds.caption_ids, ds.image_ids)

    folder = tmp_path / "img"
    folder.mkdir()
    for p in ds.images:
        shutil.copy(p, folder / p.name)
    Index.build(folder, tmp_path / "ix", model=encoder, batch_size=32, workers=1, progress=False).close()
    exact = 0
    for q, caption in enumerate(ds.captions):
        out = cli_json(capsys, ["search", str(tmp_path / "ix"), "--text", caption, "--top-k", str(n), "--json"])
        names = [Path(r["path"]).name for r in out["results"]]
        got = names.index(ds.images[int(ds.caption_image[q])].name) + 1
        want = int(eval_ranks[q, 0])
        assert abs(got - want) <= 2, (caption, got, want)  # float16 storage may swap near-ties
        exact += got == want
    assert exact >= 0.9 * len(ds.captions)
