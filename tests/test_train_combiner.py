"""Combiner training: CSS, FashionIQ and CIRR (real annotations, placeholder images), resume,
checkpoints, logs and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import calibclip.models.registry as registry
from calibclip.cli.main import main
from calibclip.composed import evaluate_composed, load_combiner
from calibclip.composed.css import make_css
from calibclip.composed.train import TrainConfig, train_combiner
from calibclip.data.cache import FeatureCache
from fakes import HashEncoder as FakeEncoder
from test_composed_fakes import write_cirr_subset, write_fashioniq_subset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def css_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("css") / "bench"
    make_css(root, seed=11, n_train=64, n_val=16, n_test=16, size=48, progress=False)
    return root


def _config(**kw) -> TrainConfig:
    base = dict(dataset="css", epochs=4, batch_size=16, lr=1e-3, proj_mult=2, hidden_mult=2, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_run_and_resume_is_exact(tmp_path: Path, css_root: Path) -> None:
    enc, cache = FakeEncoder(), FeatureCache(tmp_path / "cache")
    full = train_combiner(enc, css_root, tmp_path / "full", _config(), cache=cache, progress=False)
    run = tmp_path / "full"
    for name in ("best.pt", "last.pt", "log.csv", "log.json", "curves.png", "baselines.json", "summary.json"):
        assert (run / name).is_file(), name
    log = json.loads((run / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"]
    assert set(full["baselines"]) == {"sum", "image", "text"}
    assert set(full["best"]) == {"R@1", "R@5", "R@10", "R@50"}
    assert full["best"]["R@1"] == max(r["R@1"] for r in log)
    # interrupted after 2 epochs, then resumed to 4: identical weights
    train_combiner(enc, css_root, tmp_path / "split", _config(epochs=2), cache=cache, progress=False)
    resumed = train_combiner(enc, css_root, tmp_path / "split", _config(epochs=4), cache=cache, progress=False)
    assert resumed["best"] == full["best"]
    a = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="belongs to another run"):
        train_combiner(enc, css_root, tmp_path / "split", _config(epochs=5, lr=1e-4), cache=cache, progress=False)
    with pytest.raises(ValueError, match="trained on features of encoder"):
        load_combiner(run / "best.pt", encoder=FakeEncoder(seed=1))
    # the best checkpoint reproduces its logged validation metrics through evaluate_composed
    m = evaluate_composed(enc, "css", css_root, "val", "combiner", str(run / "best.pt"), cache, 16, 0, progress=False)
    best_row = next(r for r in log if r["epoch"] == full["best_epoch"])
    assert m == pytest.approx({k: best_row[k] for k in m})


def test_fashioniq_training_uses_caption_variants(tmp_path: Path, fashioniq_root: Path) -> None:
    root = write_fashioniq_subset(fashioniq_root, tmp_path / "fiq", n_pairs=12)
    enc, cache = FakeEncoder(), FeatureCache(tmp_path / "cache")
    summary = train_combiner(
        enc, root, tmp_path / "run", _config(dataset="fashioniq", epochs=2), cache=cache, progress=False
    )
    assert summary["train_pairs"] == 36 and summary["headline"] == "avg"
    assert {"dress_R@10", "toptee_R@50", "avg"} <= set(summary["best"])
    from calibclip.composed.evaluate import extract_features
    from calibclip.data.composed import load_fashioniq

    ds = load_fashioniq(root, "train")["dress"]
    feats = extract_features(enc, ds, cache, variants=True, progress=False)
    assert feats.variants.shape == (12, 4, 32)
    want = enc.encode(texts=[f"{ds.captions[0][1].strip('.?, ').capitalize()}"])[0]
    assert torch.allclose(feats.variants[0, 3], torch.from_numpy(want), atol=1e-5)


def test_cli_cirr_train_then_evaluate(
    tmp_path: Path, cirr_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = write_cirr_subset(cirr_root, tmp_path / "cirr", n_pairs=20)
    monkeypatch.setattr(registry, "create_model", lambda *a, **k: FakeEncoder())
    run = tmp_path / "run"
    rc = main(
        [
            "train-combiner",
            "--dataset",
            "cirr",
            "--data-root",
            str(root),
            "--out",
            str(run),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--proj-mult",
            "1",
            "--hidden-mult",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["headline"] == "avg" and summary["train_pairs"] == 40
    assert set(summary["best"]) == {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "avg"}
    sub = tmp_path / "sub"
    m = evaluate_composed(
        FakeEncoder(),
        "cirr",
        root,
        "test1",
        "combiner",
        str(run / "best.pt"),
        FeatureCache(tmp_path / "cache"),
        16,
        0,
        sub,
        progress=False,
    )
    assert m == {} and len(list(sub.glob("*.json"))) == 2
    rc = main(
        [
            "train-combiner",
            "--dataset",
            "cirr",
            "--data-root",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "r2"),
            "--no-cache",
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
