"""`calibclip evaluate` / `batch-evaluate` end to end on tiny generated datasets (`fakes`) and the
Evaluator APIs; the ``color_model`` fixture (conftest) registers `fakes.ColorEncoder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from calibclip.cli.main import main
from calibclip.models import registry
from calibclip.models.base import Encoder
from fakes import ColorEncoder, make_flickr8k, make_person_dataset

torch.set_num_threads(1)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def expected_person_metrics(root: Path, fmt: str) -> dict[str, float]:
    """Independent path: Encoder.encode (no cache, no loader) + the metric function."""
    from calibclip.datasets import load_dataset
    from calibclip.evaluation import retrieval_metrics

    ds = load_dataset(fmt, root, "test")
    enc = ColorEncoder()
    sim = enc.encode(texts=ds.captions, normalize=True) @ enc.encode(images=ds.images, normalize=True).T
    return retrieval_metrics(sim, ds.caption_ids, ds.image_ids)


@pytest.mark.parametrize("fmt", ["cuhkpedes", "icfgpedes", "rstpreid"])
def test_evaluate_person_json(fmt: str, tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture) -> None:
    root = make_person_dataset(tmp_path / fmt, fmt)
    name = "rstp" if fmt == "rstpreid" else fmt  # the alias works too
    assert main(["evaluate", "--dataset", name, "--data-root", str(root), "--model", color_model, "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["dataset"] == fmt and out["split"] == "test" and out["model"] == color_model
    assert list(out["metrics"]) == ["R@1", "R@5", "R@10", "mAP", "mINP"]
    want = expected_person_metrics(root, fmt)
    assert out["metrics"] == pytest.approx(want, abs=1e-6)
    # ids 5 and 6 are indistinguishable: their 8 captions tie between 4 images, the rest are exact
    assert 60 < out["metrics"]["R@1"] < 100 and out["metrics"]["R@5"] == 100.0


def test_evaluate_flickr8k_report_and_cache(tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture) -> None:
    root = make_flickr8k(tmp_path / "f8k")
    out_dir = tmp_path / "report"
    args = [
        "evaluate",
        "--dataset",
        "flickr8k",
        "--data-root",
        str(root),
        "--split",
        "dev",
        "--model",
        color_model,
        "--output-dir",
        str(out_dir),
        "--json",
    ]
    assert main(args) == 0
    out = last_json(capsys.readouterr().out)
    assert list(out["metrics"]) == [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert out["metrics"]["t2i_R@1"] == 100.0 and out["metrics"]["i2t_R@1"] == 100.0
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved["metrics"] == out["metrics"] and saved["split"] == "dev"
    assert "t2i_R@1" in (out_dir / "metrics.md").read_text()
    assert (out_dir / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = list((tmp_path / "cache" / "features").glob("*/raw.npy"))
    assert len(cached) == 2  # images and texts
    assert main(args[:-3] + ["--json"]) == 0
    assert last_json(capsys.readouterr().out) == out


def test_evaluate_calibrate_runs_and_noop_equals_plain(
    tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture
) -> None:
    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    cfg = tmp_path / "noop.yaml"
    cfg.write_text("calibration:\n  lam: 1.0\n")
    base = ["evaluate", "--dataset", "cuhkpedes", "--data-root", str(root), "--model", color_model, "--json"]
    assert main(base) == 0
    plain = last_json(capsys.readouterr().out)["metrics"]
    assert main(base + ["--calibrate", "--config", str(cfg)]) == 0
    assert last_json(capsys.readouterr().out)["metrics"] == pytest.approx(plain, abs=1e-9)
    assert main(base + ["--calibrate"]) == 0
    calibrated = last_json(capsys.readouterr().out)["metrics"]
    assert set(calibrated) == set(plain) and all(0 <= v <= 100 for v in calibrated.values())


def test_batch_evaluate(tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture) -> None:
    roots = [make_person_dataset(tmp_path / f, f) for f in ("cuhkpedes", "icfgpedes", "rstpreid")]
    f8k = make_flickr8k(tmp_path / "f8k")
    out_dir = tmp_path / "batch"
    assert (
        main(
            [
                "batch-evaluate",
                "--model",
                color_model,
                "--datasets",
                "cuhkpedes",
                "icfgpedes",
                "rstp",
                "flickr8k",
                "--data-roots",
                *map(str, roots),
                str(f8k),
                "--output-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    rows = json.loads((out_dir / "results.json").read_text())
    assert [r["dataset"] for r in rows] == ["cuhkpedes", "icfgpedes", "rstpreid", "flickr8k"]
    csv_lines = (out_dir / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,split,model,R@1,R@5,R@10,mAP,mINP,t2i_R@1") and len(csv_lines) == 5
    assert (out_dir / "results.md").read_text().count("\n") == 6
    assert (out_dir / "recall.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["batch-evaluate", "--model", color_model, "--datasets", "nope", "--data-roots", "x", "--output-dir", "y"])
    assert (
        main(
            [
                "batch-evaluate",
                "--model",
                color_model,
                "--datasets",
                "cuhkpedes",
                "icfgpedes",
                "--data-roots",
                str(roots[0]),
                "--output-dir",
                str(out_dir),
            ]
        )
        == 2
    )
    assert "one folder per dataset" in capsys.readouterr().err


def test_evaluate_errors_are_actionable(tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--dataset", "cuhkpedes", "--data-root", str(tmp_path), "--model", color_model]) == 2
    err = capsys.readouterr().err
    assert "reid_raw.json" in err and "imgs/" in err
    assert main(["evaluate", "--model", color_model]) == 2
    assert "--dataset and --data-root" in capsys.readouterr().err
    root = make_person_dataset(tmp_path / "p", "cuhkpedes")
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "cuhkpedes",
                "--data-root",
                str(root),
                "--model",
                color_model,
                "--combining",
                "sum",
            ]
        )
        == 2
    )
    assert "fashioniq, cirr, css and pseudo-cir" in capsys.readouterr().err


def test_seed_evaluator_api(tmp_path: Path, color_model: str) -> None:
    from calibclip.datasets import build_dataloader, build_transforms
    from calibclip.evaluation import Evaluator

    root = make_person_dataset(tmp_path / "icfg", "icfgpedes")
    model = registry.create_model(color_model)
    transform = build_transforms(img_size=(16, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert transform.mode == "resize" and build_transforms(224).mode == "clip"
    loader = build_dataloader("icfgpedes", root, split="test", batch_size=4, transform=transform)
    result = Evaluator(model, device="cpu").evaluate(loader)
    want = expected_person_metrics(root, "icfgpedes")
    assert set(result) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert result["rank1"] == pytest.approx(want["R@1"]) and result["mINP"] == pytest.approx(want["mINP"])


def test_composed_dispatch(
    tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fashioniq/cirr/css go to calibclip.composed.evaluate_composed with the CLI's settings."""
    from calibclip import composed

    seen: dict[str, Any] = {}

    def fake(encoder: Encoder, dataset: str, data_root: Any, split: str, **kw: Any) -> dict[str, float]:
        seen.update(dataset=dataset, split=split, **kw)
        return {"R@1": 12.5, "R@5": 50.0, "R@10": 75.0, "R@50": 100.0}

    monkeypatch.setattr(composed, "evaluate_composed", fake)
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "css",
                "--data-root",
                str(tmp_path),
                "--model",
                color_model,
                "--combining",
                "text",
                "--batch-size",
                "7",
                "--json",
            ]
        )
        == 0
    )
    out = last_json(capsys.readouterr().out)
    assert out["metrics"]["R@1"] == 12.5 and out["split"] == "test"
    assert seen["dataset"] == "css" and seen["combining"] == "text" and seen["batch_size"] == 7
    assert main(["evaluate", "--dataset", "cirr", "--data-root", str(tmp_path), "--model", color_model, "--json"]) == 0
    assert last_json(capsys.readouterr().out)["split"] == "val" and seen["combining"] == "sum"


@pytest.mark.slow
def test_flickr8k_dev_default_model(flickr8k_root: Path, capsys: pytest.CaptureFixture) -> None:
    """The acceptance command: `calibclip evaluate --dataset flickr8k --data-root ../shared/data/flickr8k
    --split dev --json` with the default model (starter)."""
    assert (
        main(["evaluate", "--dataset", "flickr8k", "--data-root", str(flickr8k_root), "--split", "dev", "--json"]) == 0
    )
    out = last_json(capsys.readouterr().out)
    assert out["model"] == "starter" and out["split"] == "dev"
    assert out["metrics"]["t2i_R@1"] > 5.0 and out["metrics"]["t2i_R@10"] > out["metrics"]["t2i_R@1"]


def test_report_curves_and_tables(tmp_path: Path) -> None:
    from calibclip.evaluation.report import markdown_table, recall_curves, write_report

    curves = recall_curves({"R@10": 3.0, "R@1": 1.0, "Rsubset@2": 4.0, "dress_R@50": 2.0, "mAP": 9.0, "avg": 5.0})
    assert curves == {"R": [(1, 1.0), (10, 3.0)], "Rsubset": [(2, 4.0)], "dress": [(50, 2.0)]}
    assert markdown_table([{"a": 1.234, "b": "x"}], ["a", "b", "c"]).splitlines()[2] == "| 1.23 | x |  |"
    paths = write_report(
        {"dataset": "cirr", "split": "val", "model": "m", "metrics": {"R@1": 10.0, "Rsubset@1": 30.0}}, tmp_path
    )
    assert json.loads(paths["json"].read_text())["metrics"]["Rsubset@1"] == 30.0 and paths["plot"].stat().st_size


def test_clip_checkpoint_person_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A (tiny, random) CLIP checkpoint on a person dataset is rebuilt at the config's 384x128 with
    the 'reid' direct-resize transform, and evaluates end to end through the CLI."""
    from calibclip.evaluation.runner import load_encoder
    from calibclip.models.clip import CLIP, CLIPConfig

    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=16,
        vision_layers=1,
        vision_width=64,
        vision_patch_size=32,
        text_width=64,
        text_layers=1,
        image_size=(224, 224),
    )
    ckpt = tmp_path / "tiny-clip.pt"
    torch.save(CLIP(cfg).state_dict(), ckpt)
    enc = load_encoder(str(ckpt), "person", device="cpu", clip_image_size=[384, 128])
    assert enc.config()["image_size"] == [384, 128]
    assert enc.preprocess.mode == "resize" and enc.preprocess.size == (384, 128)
    assert load_encoder(str(ckpt), "captions", device="cpu", clip_image_size=[384, 128]).config()["image_size"] == [
        224,
        224,
    ]
    root = make_person_dataset(tmp_path / "rstp", "rstpreid", images_per_id=1)
    repo = Path(__file__).resolve().parents[1]
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(repo / "configs/rstp.yaml"),
                "--data-root",
                str(root),
                "--checkpoint",
                str(ckpt),
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    out = last_json(capsys.readouterr().out)
    assert out["dataset"] == "rstpreid" and out["model"] == str(ckpt)
    assert set(out["metrics"]) == {"R@1", "R@5", "R@10", "mAP", "mINP"} and out["metrics"]["R@10"] == 100.0


def test_batch_evaluate_checks_every_root_first(
    tmp_path: Path, color_model: str, capsys: pytest.CaptureFixture
) -> None:
    """A missing second root fails before the first dataset runs (nothing written); two roots of one dataset give
    rows that name their root."""
    cuhk = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    out_dir = tmp_path / "batch"
    argv = [
        "batch-evaluate",
        "--model",
        color_model,
        "--datasets",
        "cuhkpedes",
        "icfgpedes",
        "--data-roots",
        str(cuhk),
        str(tmp_path / "no-icfg"),
        "--output-dir",
        str(out_dir),
    ]
    assert main(argv) == 2
    err = capsys.readouterr()
    assert "no-icfg" in err.err and "nothing was evaluated" in err.err and err.out == ""
    assert not out_dir.exists()
    other = make_person_dataset(tmp_path / "cuhk2", "cuhkpedes")
    argv = [
        "batch-evaluate",
        "--model",
        color_model,
        "--datasets",
        "cuhkpedes",
        "cuhkpedes",
        "--data-roots",
        str(cuhk),
        str(other),
        "--output-dir",
        str(out_dir),
    ]
    assert main(argv) == 0
    rows = json.loads((out_dir / "results.json").read_text())
    assert [r["dataset"] for r in rows] == [f"cuhkpedes ({cuhk})", f"cuhkpedes ({other})"]
