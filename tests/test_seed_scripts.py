"""The seed README's three scripts work as written (run in-process with a registered test model,
plus one real subprocess), and the shipped configs are valid."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from calibclip.evaluation.config import load_config
from fakes import make_person_dataset, save_person_image

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(REPO / "scripts" / name), *args])
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    try:
        runpy.run_path(str(REPO / "scripts" / name), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_evaluate_script(
    tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    out = tmp_path / "results"
    code = run_script(
        "evaluate.py",
        [
            "--config",
            str(REPO / "configs/cuhkpedes.yaml"),
            "--checkpoint",
            color_model,
            "--data_root",
            str(root),
            "--output_dir",
            str(out),
        ],
        monkeypatch,
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "cuhkpedes" and set(metrics["metrics"]) == {"R@1", "R@5", "R@10", "mAP", "mINP"}
    assert "| R@1 |" in capsys.readouterr().out


def test_batch_evaluate_script(tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = [str(make_person_dataset(tmp_path / f, f)) for f in ("cuhkpedes", "icfgpedes", "rstpreid")]
    out = tmp_path / "results" / "batch"
    code = run_script(
        "batch_evaluate.py",
        [
            "--checkpoint",
            color_model,
            "--datasets",
            "cuhkpedes",
            "icfgpedes",
            "rstp",
            "--data_roots",
            *roots,
            "--output_dir",
            str(out),
        ],
        monkeypatch,
    )
    assert code == 0
    assert [r["dataset"] for r in json.loads((out / "results.json").read_text())] == [
        "cuhkpedes",
        "icfgpedes",
        "rstpreid",
    ]
    assert (out / "results.csv").exists() and (out / "results.md").exists() and (out / "recall.png").exists()


def test_demo_script(
    tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    images = tmp_path / "gallery"
    for name, (top, bottom) in {"a": ("red", "blue"), "b": ("green", "red"), "c": ("red", "black")}.items():
        save_person_image(images / f"{name}.png", top, bottom)
    (images / "broken.jpg").write_bytes(b"not an image")
    args = [
        "--config",
        str(REPO / "configs/cuhkpedes.yaml"),
        "--checkpoint",
        color_model,
        "--image_dir",
        str(images),
        "--query",
        "A woman wearing a red dress and blue shoes",
        "--topk",
        "2",
    ]
    assert run_script("demo.py", args, monkeypatch) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith('top 2 of 3 images for "A woman wearing a red dress')
    assert lines[1].endswith("a.png") and len(lines) == 3
    assert "skipping broken.jpg" in captured.err


def test_script_runs_as_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/evaluate.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--data-root" in proc.stdout


@pytest.mark.parametrize("name", ["base", "cuhkpedes", "icfgpedes", "rstp", "flickr8k"])
def test_shipped_configs(name: str) -> None:
    from calibclip.calibration import CalibrationConfig

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    CalibrationConfig.from_dict(cfg["calibration"])  # every key is a CalibrationConfig field
    # CUHK-PEDES evaluates offline with the person model trained on its train split; the rest with the starter
    assert cfg["model"]["name"] == ("starter-person" if name == "cuhkpedes" else "starter")
    if name in ("cuhkpedes", "icfgpedes", "rstp"):
        assert cfg["model"]["clip_image_size"] == [384, 128] and cfg["dataset"] in (
            "cuhkpedes",
            "icfgpedes",
            "rstpreid",
        )


def test_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['modle'\]"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        load_config(loop)
