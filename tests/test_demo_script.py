"""scripts/demo.py: one-line errors, an index of the folder built once and reused, composed queries,
and a one-line message outside the project's environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fakes import save_person_image
from test_seed_scripts import REPO, run_script


def _gallery(tmp_path: Path) -> Path:
    images = tmp_path / "gallery"
    for name, (top, bottom) in {"a": ("red", "blue"), "b": ("green", "red"), "c": ("red", "black")}.items():
        save_person_image(images / f"{name}.png", top, bottom)
    return images


def test_demo_builds_the_index_once(
    tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    images, index = _gallery(tmp_path), tmp_path / "idx"
    args = [
        "--checkpoint",
        color_model,
        "--image_dir",
        str(images),
        "--index",
        str(index),
        "--query",
        "red top and blue trousers",
        "--topk",
        "2",
    ]
    assert run_script("demo.py", args, monkeypatch) == 0
    first = capsys.readouterr()
    assert "indexed 3 new or changed images" in first.err and (index / "meta.sqlite").exists()
    assert run_script("demo.py", args, monkeypatch) == 0  # second run: nothing re-encoded
    second = capsys.readouterr()
    assert "indexed" not in second.err and second.out == first.out
    save_person_image(images / "d.png", "red", "blue")
    assert run_script("demo.py", args, monkeypatch) == 0
    assert "indexed 1 new or changed images" in capsys.readouterr().err
    composed = args + ["--image", str(images / "b.png")]
    assert run_script("demo.py", composed, monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    assert "applied to" in out[0] and not any(line.endswith("b.png") for line in out[1:])  # reference left out


def test_demo_errors_are_one_line(
    tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    images = _gallery(tmp_path)
    assert (
        run_script(
            "demo.py",
            ["--checkpoint", str(tmp_path / "missing.pt"), "--image_dir", str(images), "--query", "x"],
            monkeypatch,
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt not found" in err[0] and "Traceback" not in err[0]
    assert (
        run_script(
            "demo.py", ["--checkpoint", color_model, "--image_dir", str(tmp_path / "nope"), "--query", "x"], monkeypatch
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope is not a folder" in err[0]


@pytest.mark.parametrize("script", ["demo.py", "evaluate.py", "batch_evaluate.py"])
def test_seed_scripts_outside_the_environment_say_what_to_do(script: str) -> None:
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['x', '--help']; "
        f"runpy.run_path({str(REPO / 'scripts' / script)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and ". .venv/bin/activate" in proc.stderr
