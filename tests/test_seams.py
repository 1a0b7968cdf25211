"""The extension seams (dataset, calibration-method and encoder tables), each with a new entry
registered from the test and used through the CLI, and the regression tests of the bugs found
with them (web calibrator defaults, Encoder.spec, silently dropped subcommands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from calibclip.calibration import CalibrationConfig, Calibrator
from calibclip.calibration import methods as cal_methods
from calibclip.cli import main as cli_main
from calibclip.cli.main import main
from calibclip.data import registry as data_registry
from calibclip.data.records import RetrievalDataset
from calibclip.evaluation.metrics import caption_metrics
from calibclip.index import Index
from calibclip.models import registry
from fakes import (
    NAMES,
    ColorEncoder,
    TokenEncoder,
    register_fake_model,
    save_person_image,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
#: (upper, lower) colours of the toy dataset's images; all different.
PAIRS = [(NAMES[i], NAMES[(i + 1 + i // 8) % 8]) for i in range(5)]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone afterwards (copies of the three tables)."""
    registry.list_models()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    monkeypatch.setattr(data_registry, "_DATASETS", dict(data_registry._DATASETS))
    monkeypatch.setattr(data_registry, "_ALIASES", dict(data_registry._ALIASES))
    monkeypatch.setattr(cal_methods, "_METHODS", dict(cal_methods._METHODS))


def make_toy_captions(root: Path) -> Path:
    """A folder in the toy dataset's own layout: ``toy.json`` ({image: [captions]}) + ``img/``."""
    entries = {}
    for top, bottom in PAIRS:
        name = f"{top}-{bottom}.png"
        save_person_image(root / "img" / name, top, bottom)
        entries[name] = [f"{top} over {bottom}", f"a {top} and {bottom} thing"]
    (root / "toy.json").write_text(json.dumps(entries))
    return root


def load_toy(root: str | Path, split: str = "test") -> RetrievalDataset:
    """The toy dataset's loader (what a new loader module under calibclip/data provides)."""
    root = Path(root)
    if split != "test":
        raise ValueError(f"toy has only a test split, got {split!r}")
    entries = json.loads((root / "toy.json").read_text())
    images = [root / "img" / name for name in entries]
    caps = [(i, c) for i, name in enumerate(entries) for c in entries[name]]
    return RetrievalDataset(
        name="toy",
        split=split,
        root=root,
        images=images,
        image_ids=np.arange(len(images)),
        captions=[c for _, c in caps],
        caption_ids=np.array([i for i, _ in caps]),
        caption_image=np.array([i for i, _ in caps]),
    )


def independent_metrics(root: Path, reverse: bool = False) -> dict[str, float]:
    """Encoder.encode + the metric function, no CLI, no cache, no table."""
    ds = load_toy(root)
    enc = ColorEncoder()
    sim = enc.encode(texts=ds.captions, normalize=True) @ enc.encode(images=ds.images, normalize=True).T
    return {k: round(v, 6) for k, v in caption_metrics(-sim if reverse else sim, ds.caption_image).items()}


# --- datasets ----------------------------------------------------------------------------------
def test_toy_dataset_registered_from_the_test_evaluates_through_the_cli(
    tmp_path: Path, tables: None, color_model: str, capsys: pytest.CaptureFixture
) -> None:
    data_registry.register_dataset(
        "toy", load_toy, task="captions", aliases=("toy-set",), description="test-only colour captions"
    )
    root = make_toy_captions(tmp_path / "toy")
    assert main(["evaluate", "--dataset", "toy-set", "--data-root", str(root), "--model", color_model, "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert (result["dataset"], result["split"], result["model"]) == ("toy", "test", color_model)
    assert result["metrics"] == independent_metrics(root)
    assert (
        main(
            [
                "batch-evaluate",
                "--datasets",
                "toy",
                "--data-roots",
                str(root),
                "--model",
                color_model,
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["metrics"] == result["metrics"]
    data_registry.unregister_dataset("toy")
    with pytest.raises(SystemExit):  # the CLI's choices come from the table
        main(["evaluate", "--dataset", "toy", "--data-root", str(root), "--model", color_model])


def test_dataset_table_api_and_errors(tables: None) -> None:
    import calibclip.datasets
    from calibclip.datasets import (
        DATASETS,
        canonical_dataset,
        dataset_task,
        get_dataset,
    )

    assert canonical_dataset(" RSTP ") == "rstpreid" and dataset_task("cuhk-pedes") == "person"
    assert get_dataset("fashioniq").default_split == "val" and get_dataset("css").headline == "R@1"
    assert DATASETS == (
        "cuhkpedes",
        "icfgpedes",
        "rstpreid",
        "flickr8k",
        "karpathy",
        "fashioniq",
        "cirr",
        "css",
        "pseudo-cir",
    )
    data_registry.register_dataset("extra", load_toy, task="captions")
    assert calibclip.datasets.DATASETS[-1] == "extra"
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; expected one of \['cuhkpedes'"):
        canonical_dataset("nope")
    with pytest.raises(ValueError, match=r"dataset name\(s\) \['rstp'\] already registered"):
        data_registry.register_dataset("mine", load_toy, task="captions", aliases=("rstp",))
    with pytest.raises(ValueError, match="task must be one of"):
        data_registry.register_dataset("mine", load_toy, task="video")

    @data_registry.register_dataset("lazy", task="captions")
    def load_lazy(root: Any, split: str) -> str:
        return f"{root}:{split}"

    assert load_lazy("r", "s") == "r:s" and data_registry.get_dataset("lazy").load("root") == "root:test"
    bad = data_registry.register_dataset("bad", "calibclip.data.captions:no_such_loader", task="captions")
    with pytest.raises(ValueError, match="has no function 'no_such_loader'"):
        bad.load("x")


def test_every_dataset_has_its_config_file() -> None:
    from calibclip.evaluation.config import load_config

    for spec in data_registry.list_datasets():
        assert spec.config, f"{spec.name} names no config file"
        cfg = load_config(REPO / "configs" / spec.config)
        assert data_registry.canonical_dataset(cfg["dataset"]) == spec.name
        assert (cfg["evaluation"]["split"] or "test") == spec.default_split and spec.default_split in spec.splits


# --- calibration methods -----------------------------------------------------------------------
class ReversedRanking:
    """Toy calibration method: raw features for both sets, and a fused score that reverses the ranking."""

    def __init__(self, encoder: Any, config: CalibrationConfig):
        self.encoder, self.config = encoder, config
        self.calls = 0
        self.options: dict[str, Any] = {}

    def config_id(self, part: str = "features") -> str:
        return f"reversed-{part}-{self.encoder.fingerprint()}"

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        raw = self.encoder.encode_image(pixels)
        return {"raw": raw, "calibrated": raw}

    def text_features(self, text: Any) -> dict[str, torch.Tensor]:
        batch = text if not isinstance(text, list) else self.encoder.tokenize(text)
        raw = self.encoder.encode_text(batch)
        return {"raw": raw, "calibrated": raw}

    def fuse(self, sim_raw: Any, sim_cal: Any) -> torch.Tensor:
        return -torch.as_tensor(sim_raw)

    def scores(self, queries: Any, gallery: Any) -> torch.Tensor:
        return -(queries["raw"] @ gallery["raw"].T)

    def rerank(self, queries: Any, gallery: Any, candidates: torch.Tensor) -> torch.Tensor:
        return -torch.einsum("qd,qkd->qk", queries["raw"], gallery["raw"][candidates])


def test_toy_calibration_method_registered_from_the_test_runs_through_the_cli(
    tmp_path: Path, tables: None, color_model: str, capsys: pytest.CaptureFixture
) -> None:
    made: list[ReversedRanking] = []

    @cal_methods.register_calibration_method("reversed", description="test-only")
    def make(encoder: Any, config: CalibrationConfig, **options: Any) -> ReversedRanking:
        made.append(ReversedRanking(encoder, config))
        made[-1].options = options
        return made[-1]

    data_registry.register_dataset("toy", load_toy, task="captions")
    root = make_toy_captions(tmp_path / "toy")
    args = ["evaluate", "--dataset", "toy", "--data-root", str(root), "--model", color_model, "--json", "--calibrate"]
    assert main([*args, "--calibration-method", "reversed"]) == 0
    reversed_metrics = last_json(capsys.readouterr().out)["metrics"]
    assert reversed_metrics == independent_metrics(root, reverse=True) != independent_metrics(root)
    assert made and made[0].calls > 0 and isinstance(made[0], cal_methods.CalibrationMethod)
    assert made[0].config == CalibrationConfig.default_for("color-test")  # the factory's settings
    assert main(args) == 0  # the default method (calibclip) is unaffected
    assert last_json(capsys.readouterr().out)["metrics"] != reversed_metrics

    # the index records the method; Index.calibrator and `search --calibrate` use it
    ix = str(tmp_path / "ix")
    assert (
        main(
            [
                "index",
                str(root / "img"),
                "--out",
                ix,
                "--model",
                color_model,
                "--calibrate",
                "--calibration-method",
                "reversed",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["index", str(root / "img"), "--out", ix, "--json", "--quiet"]) == 0  # update keeps it
    assert last_json(capsys.readouterr().out)["unchanged"] == len(PAIRS)
    assert Index.open(ix).info()["calibration"]["method"] == "reversed"
    assert isinstance(Index.open(ix).calibrator(), ReversedRanking)
    query = ["search", ix, "--text", f"{PAIRS[0][0]} {PAIRS[0][1]}", "--top-k", str(len(PAIRS)), "--json"]
    assert main(query) == 0
    plain = [Path(r["path"]).name for r in last_json(capsys.readouterr().out)["results"]]
    assert main([*query, "--calibrate"]) == 0
    assert [Path(r["path"]).name for r in last_json(capsys.readouterr().out)["results"]] == plain[::-1]
    assert plain[0] == f"{PAIRS[0][0]}-{PAIRS[0][1]}.png"
    assert "reversed" in cal_methods.calibration_methods()
    cal_methods.create_calibrator(ColorEncoder(), "reversed", options={"checkpoint": "x.pt"})
    assert made[-1].options == {"checkpoint": "x.pt"}  # a method's own arguments reach its factory
    with pytest.raises(SystemExit):
        main([*args, "--calibration-method", "nope"])
    with pytest.raises(ValueError, match=r"unknown calibration method 'nope'; registered: \['calibclip', 'reversed'\]"):
        cal_methods.create_calibrator(ColorEncoder(), "nope")


def test_create_calibrator_settings_precedence() -> None:
    enc = TokenEncoder()
    assert isinstance(cal_methods.create_calibrator(enc), Calibrator)
    assert cal_methods.create_calibrator(enc).config == CalibrationConfig.default_for(enc.name)
    assert cal_methods.create_calibrator(enc, settings={"top_k": 3}).config.top_k == 3
    base = CalibrationConfig(lam=0.2)
    assert cal_methods.create_calibrator(enc, config=base, settings={"top_k": 4}).config == base.replace(top_k=4)
    recorded = {"config": CalibrationConfig(decay_factor=0.3).to_dict()}
    assert cal_methods.create_calibrator(enc, settings={"top_k": 9}, recorded=recorded).config.decay_factor == 0.3
    cal = cal_methods.create_calibrator(enc)
    q, g = (
        {"raw": torch.randn(3, 8), "calibrated": torch.randn(3, 8)},
        {"raw": torch.randn(5, 8), "calibrated": torch.randn(5, 8)},
    )
    cand = torch.tensor([[4, 0], [1, 2], [3, 3]])
    full = cal.scores(q, g)
    small = cal_methods.create_calibrator(enc, settings={"top_k": 2}).rerank(q, g, cand)
    two = cal_methods.create_calibrator(enc, settings={"top_k": 2})
    sims = [
        torch.einsum(
            "qd,qkd->qk", torch.nn.functional.normalize(q[n], dim=-1), torch.nn.functional.normalize(g[n], dim=-1)[cand]
        )
        for n in ("raw", "calibrated")
    ]
    assert torch.allclose(small, two.fuse(*sims)) and full.shape == (3, 5)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        cal_methods.unregister_calibration_method("calibclip")


class StarterNamed(TokenEncoder):
    """A fake that the packaged calibration defaults take for ``starter`` (``textual: false``)."""

    name = "starter"


def test_web_explanations_use_the_encoders_packaged_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Regression: the web app built CalibrationConfig() and masked words `calibclip explain` does not."""
    from calibclip.web.service import ServedIndex

    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (80 * i, 40, 200 - 60 * i)).save(images / f"{i}.png")
    index = Index.build(images, tmp_path / "ix", model=StarterNamed(), progress=False)
    served = ServedIndex("ix", index)
    text = "a man with a red backpack"
    assert not served.can_calibrate
    assert served.calibrator().config == CalibrationConfig.default_for("starter")
    assert not any(w["masked"] for w in served.explain_text(text))
    assert any(Calibrator(StarterNamed(), CalibrationConfig()).explain_text(text)[0].masked)  # what the bug did
    register_fake_model(monkeypatch, "fake-starter", StarterNamed)
    assert main(["explain", "--model", "fake-starter", "--image", str(images / "0.png"), "--text", text, "--json"]) == 0
    data = last_json(capsys.readouterr().out)
    assert data["config"] == served.calibrator().config.to_dict()
    assert data["text_explanation"]["masked_words"] == []


# --- encoders ----------------------------------------------------------------------------------
def test_toy_encoder_registered_from_the_test_indexes_and_searches_through_the_cli(
    tmp_path: Path, tables: None, capsys: pytest.CaptureFixture
) -> None:
    @registry.register_model("toy-colour", description="test-only colour encoder", pretrained="random")
    def make_toy(**kwargs: Any) -> ColorEncoder:
        return ColorEncoder()

    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["toy-colour"] == {
        "name": "toy-colour",
        "pretrained": "random",
        "description": "test-only colour encoder",
    }
    assert listed["starter"]["pretrained"] == "built-in" and listed["ViT-B/16"]["pretrained"] == "download"
    root = make_toy_captions(tmp_path / "toy")
    ix = str(tmp_path / "ix")
    assert main(["index", str(root / "img"), "--out", ix, "--model", "toy-colour", "--json", "--quiet"]) == 0
    assert last_json(capsys.readouterr().out)["count"] == len(PAIRS)
    for top, bottom in PAIRS:
        assert main(["search", ix, "--text", f"{top} {bottom}", "--top-k", "1", "--json"]) == 0
        assert Path(last_json(capsys.readouterr().out)["results"][0]["path"]).name == f"{top}-{bottom}.png"
    assert Index.open(ix).encoder.spec == "toy-colour"


def test_encoder_hooks_are_declared_with_defaults(tables: None) -> None:
    import calibclip
    from calibclip.models import tokenizer
    from calibclip.models.clip import CLIP, CLIPConfig

    enc = ColorEncoder()  # declares none of the optional hooks
    assert enc.token_strings([11, 3, 12]) == ["#11", "#3", "#12"] and enc.precision == "fp32" and enc.spec is None
    ids = calibclip.tokenize(["a red car"])[:, :6]
    batch = enc.batch_from_ids(ids)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    assert batch.special_mask.tolist() == [[True, False, False, False, True, False]]
    assert enc.token_strings(ids[0, :5].tolist()) == tokenizer.token_strings(ids[0, :5].tolist())
    clip = CLIP(
        CLIPConfig(
            embed_dim=16,
            vision_layers=1,
            vision_width=32,
            vision_patch_size=16,
            image_size=32,
            text_width=32,
            text_layers=1,
        )
    )
    assert clip.token_strings(ids[0, :5].tolist()) == tokenizer.token_strings(ids[0, :5].tolist())
    registry.register_model("toy-clip", lambda **kw: clip, pretrained="random", aliases=("toy-alias",))
    assert registry.create_model("toy-alias").spec == "toy-clip"  # the registered name, not the alias
    assert TokenEncoder().token_strings([1, 3, 2]) == ["<sot>", "a", "<eot>"]  # an override wins


def test_index_built_from_a_checkpoint_path_reopens_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: Index recorded getattr(model, "spec") that nothing set (the name, not the file)."""
    from calibclip.models.clip import CLIP, CLIPConfig

    torch.manual_seed(0)
    tiny = CLIP(
        CLIPConfig(
            embed_dim=32,
            vision_layers=2,
            vision_width=64,
            vision_patch_size=16,
            image_size=32,
            text_width=64,
            text_layers=2,
        )
    ).eval()
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    torch.save(tiny.state_dict(), ckpt_dir / "clip.pt")
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (90 * i, 30, 60)).save(images / f"{i}.png")
    monkeypatch.chdir(ckpt_dir)
    encoder = registry.create_model("clip.pt")
    assert encoder.spec == str((ckpt_dir / "clip.pt").resolve())
    built = Index.build(images, tmp_path / "ix", model=encoder, progress=False)
    want = built.search(text="a red square", k=3)
    built.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reopened = Index.open(tmp_path / "ix")
    assert reopened.info()["model_spec"] == encoder.spec
    assert reopened.encoder.fingerprint() == encoder.fingerprint()
    got = reopened.search(text="a red square", k=3)
    assert [r.id for r in got] == [r.id for r in want]


# --- CLI ---------------------------------------------------------------------------------------
def test_a_subcommand_module_that_fails_to_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: build_parser skipped a missing subcommand module silently."""
    monkeypatch.setattr(cli_main, "COMMANDS", (*cli_main.COMMANDS, "renamed_away"))
    with pytest.raises(RuntimeError, match=r"calibclip\.cli\.renamed_away cannot be imported"):
        cli_main.build_parser()
