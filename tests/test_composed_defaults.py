"""Per-encoder composed defaults (configs/composed.yaml): the recipe train-combiner uses and records,
the normalised sum's text weight, and the packaged Combiner that index builds install and composed
search, `evaluate --combining combiner` and `default_combining` use without a --combiner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import calibclip.composed.defaults as defaults
import calibclip.models.registry as registry
from calibclip.cli.main import main
from calibclip.composed import Combiner, build_combining, composed_defaults, default_combining, save_combiner
from calibclip.composed.baselines import normalized_sum, packaged_combiner_for, sum_text_weight
from calibclip.composed.css import make_css
from calibclip.composed.train import TrainConfig, resolve_config, train_combiner
from calibclip.data.cache import FeatureCache
from calibclip.index import Index
from test_composed_fakes import FakeEncoder

torch.set_num_threads(1)

CLIP4CIR = {
    "lr": 2e-5,
    "proj_mult": 4.0,
    "hidden_mult": 8.0,
    "batch_size": 4096,
    "epochs": 30,
    "dropout": 0.5,
    "normalize_inputs": False,
}


def test_packaged_table_lookup() -> None:
    star = composed_defaults("starter")
    assert star["key"] == "starter" and set(star["recipe"]) == set(CLIP4CIR)
    assert composed_defaults("ViT-B/32")["recipe"] == CLIP4CIR and composed_defaults(None)["key"] == "*"
    assert composed_defaults("ViT-B/32")["sum_text_weight"] == 1.0  # CLIP4Cir: the plain normalised sum
    assert composed_defaults("starter-v9")["key"] == "starter"  # longest prefix
    assert sum_text_weight(None) == 1.0


@pytest.fixture()
def fake_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A composed.yaml with an entry for the fake encoder (weight 2, a recipe, a css refinement, a Combiner)."""
    table = {
        "*": {"sum_text_weight": 1.0, "combiner": None, "recipe": dict(CLIP4CIR)},
        "fake": {
            "sum_text_weight": 2.0,
            "combiner": "fake-combiner.safetensors",
            "recipe": {"lr": 1e-3, "epochs": 3, "batch_size": 16, "proj_mult": 1.0, "hidden_mult": 2.0},
            "recipes": {"css": {"epochs": 2}},
        },
    }
    monkeypatch.setattr(defaults, "_table", lambda: table)
    monkeypatch.setattr(defaults, "weights_dir", lambda: tmp_path / "weights")
    torch.manual_seed(0)
    enc = FakeEncoder()
    comb = Combiner.for_features(enc.embed_dim, 1, 2).eval()
    save_combiner(tmp_path / "weights" / "fake-combiner.safetensors", comb, enc.fingerprint())
    return table, comb


def test_recipe_defaults_are_used_and_recorded(tmp_path: Path, fake_table, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "css"
    make_css(root, seed=3, n_train=32, n_val=8, n_test=8, size=32, progress=False)
    enc = FakeEncoder()
    resolved = resolve_config(TrainConfig(dataset="css", lr=5e-4), "fake")
    assert (resolved.lr, resolved.epochs, resolved.batch_size, resolved.dropout) == (5e-4, 2, 16, 0.5)
    assert resolved.recipe == "fake/css" and "lr" not in resolved.recipe_fields and resolved.val_split == "val"
    summary = train_combiner(
        enc, root, tmp_path / "run", TrainConfig(dataset="css"), cache=FeatureCache(tmp_path / "c")
    )
    out = capsys.readouterr().out
    assert "Combiner recipe: lr 0.001" in out and "recipe 'fake/css'" in out and "images/s" in out
    assert summary["recipe"] == "fake/css" and set(summary["recipe_fields"]) == set(CLIP4CIR)
    assert summary["config"]["epochs"] == 2 and len(json.loads((tmp_path / "run" / "log.json").read_text())) == 2
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["train_config"]["recipe"] == "fake/css" and best["config"]["projection_dim"] == enc.embed_dim
    # an encoder without an entry gets CLIP4Cir's recipe, and the run says so
    assert resolve_config(TrainConfig(dataset="cirr"), "ViT-B/32").lr == 2e-5


def test_normalised_sum_weight_comes_from_the_table(fake_table) -> None:
    img, txt = torch.randn(3, 32) * 25, torch.randn(3, 32) * 12
    fn = build_combining("sum", encoder=FakeEncoder())
    assert fn.text_weight == 2.0 and torch.allclose(fn(img, txt), normalized_sum(img, txt, 2.0))
    assert build_combining("sum").text_weight == 1.0


def test_packaged_combiner_is_the_default(
    tmp_path: Path, fake_table, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _, comb = fake_table
    enc = FakeEncoder()
    assert packaged_combiner_for(enc) == tmp_path / "weights" / "fake-combiner.safetensors"
    img, txt = torch.randn(4, 32), torch.randn(4, 32)
    for fn in (build_combining("combiner", encoder=enc), default_combining(enc)):
        assert torch.allclose(fn(img, txt), comb(img, txt), atol=1e-6)
    # a Combiner trained on another encoder's features is not used: the normalised sum instead
    other = FakeEncoder(seed=1)
    assert packaged_combiner_for(other) is None and default_combining(other).text_weight == 2.0
    # index builds install it; composed search uses it
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(photos / f"{i}.png")
    with Index.build(photos, tmp_path / "idx", model=enc, workers=0, progress=False) as index:
        assert index.combiner is not None and index.combiner.suffix == ".safetensors"
        ref = index.find("0.png")
        q = index.query(text="make it blue", image=ref)
        i_raw = torch.from_numpy(index.features("raw", [ref]))
        t_raw = index.encode_text("make it blue")["raw"][None]
        with torch.inference_mode():
            assert torch.allclose(q.raw, comb(i_raw, t_raw)[0], atol=1e-5)
    # evaluate --combining combiner without --combiner: the packaged one (not an error)
    monkeypatch.setattr(registry, "create_model", lambda *a, **k: FakeEncoder())
    root = tmp_path / "css"
    make_css(root, seed=4, n_train=8, n_val=8, n_test=8, size=32, progress=False)
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "css",
                "--data-root",
                str(root),
                "--split",
                "val",
                "--combining",
                "combiner",
                "--json",
            ]
        )
        == 0
    )
    packaged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    run = tmp_path / "best.pt"
    save_combiner(run, comb, enc.fingerprint())
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "css",
                "--data-root",
                str(root),
                "--split",
                "val",
                "--combiner",
                str(run),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"] == packaged


def test_export_to_half_precision_safetensors(tmp_path: Path) -> None:
    from calibclip.composed.combiner import export_combiner, load_combiner, read_combiner_checkpoint

    torch.manual_seed(0)
    comb = Combiner(32, 16, 32).eval()
    src = save_combiner(tmp_path / "best.pt", comb, "fp-1", epoch=7, metrics={"R@1": 50.0})
    dst = export_combiner(src, tmp_path / "packaged.safetensors", command="train-combiner ...")
    record = read_combiner_checkpoint(dst)
    assert (
        record["epoch"] == 7 and record["command"] == "train-combiner ..." and record["encoder_fingerprint"] == "fp-1"
    )
    assert all(v.dtype == torch.float16 for v in record["state_dict"].values())
    loaded = load_combiner(dst, encoder="fp-1")
    img, txt = torch.randn(4, 32), torch.randn(4, 32)
    assert next(loaded.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(loaded(img, txt), comb(img, txt), atol=2e-3)


def test_the_starter_ships_its_combiner() -> None:
    """The packaged Combiner was trained on v1 features: it applies to ``starter-v1`` only (v2, the
    default, uses the normalised sum until a v2 Combiner is trained)."""
    from calibclip.composed.combiner import read_combiner_checkpoint
    from calibclip.models.registry import create_model

    starter = create_model("starter-v1")
    path = packaged_combiner_for(starter)
    assert path is not None and path.name == "starter-combiner.safetensors" and path.stat().st_size < 4_000_000
    record = read_combiner_checkpoint(path)
    assert record["encoder_fingerprint"] == starter.fingerprint() and record["config"]["normalize_inputs"]
    fn = default_combining(starter)
    assert fn.description == "combiner (packaged starter-combiner.safetensors)"
    img, txt = torch.randn(2, 512) * 25, torch.randn(2, 512) * 12
    assert torch.allclose(fn(img, txt).norm(dim=-1), torch.ones(2), atol=1e-5)
    assert sum_text_weight(starter) == 1.25 and composed_defaults("starter", "pseudo-cir")["recipe"]["normalize_inputs"]
