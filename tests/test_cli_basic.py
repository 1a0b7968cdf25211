"""`calibclip --help`, `calibclip models`, `calibclip version` (in-process and as a real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from calibclip.cli.main import main


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: calibclip" in out and "models" in out and "version" in out
    assert main([]) == 0  # no subcommand prints help


def test_models_lists_clip_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("ViT-B/16", "ViT-B/32", "ViT-L/14@336px", "RN50", "RN50x64"):
        assert name in out
    assert main(["models", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    vit = next(e for e in entries if e["name"] == "ViT-B/16")
    assert vit["pretrained"] == "download" and "ViT" in vit["description"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import calibclip

    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert f"calibclip {calibclip.__version__}" in out and "torch" in out


def test_console_script_runs() -> None:
    exe = shutil.which("calibclip")
    cmd = [exe] if exe else [sys.executable, "-m", "calibclip.cli.main"]
    result = subprocess.run([*cmd, "models"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ViT-B/16" in result.stdout
    bad = subprocess.run([*cmd, "no-such-command"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
