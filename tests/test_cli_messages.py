"""Issue 16's CLI messages: a missing split lists the splits that exist, evaluation names its default model,
`serve` on a busy port, index summary wording, seed scripts outside calibclip's environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from calibclip.cli.main import main
from calibclip.models import registry
from fakes import make_flickr8k, make_person_dataset

sys.path.insert(0, str(Path(__file__).parent))
from test_index_helpers import FakeEncoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_missing_split_lists_splits_and_suggests_dev(tmp_path: Path, monkeypatch, capsys) -> None:
    """`evaluate --config configs/flickr8k.yaml` (split: test) on a Flickr8k without the test list: the error
    lists the splits present and says `--split dev`, before any model is loaded."""
    root = make_flickr8k(tmp_path / "f8k", n_images=3)
    (root / "Flickr8k_text" / "Flickr_8k.testImages.txt").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(registry, "create_model", no_model)
    assert main(["evaluate", "--config", str(REPO / "configs" / "flickr8k.yaml"), "--data-root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no test split" in err and "splits present: ['train', 'dev']" in err and "--split dev" in err


def test_default_model_is_named(tmp_path: Path, color_model: str, capsys) -> None:  # noqa: F811
    root = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset: cuhkpedes\nmodel:\n  name: {color_model}\n")
    assert main(["evaluate", "--config", str(cfg), "--data-root", str(root), "--json"]) == 0
    err = capsys.readouterr().err
    assert f"no --checkpoint given, using model '{color_model}' (the model: of {cfg})" in err
    assert (
        main(["evaluate", "--config", str(cfg), "--data-root", str(root), "--checkpoint", color_model, "--json"]) == 0
    )
    assert "no --checkpoint given" not in capsys.readouterr().err


def test_serve_busy_port_one_line_before_loading(tmp_path: Path, monkeypatch, capsys) -> None:
    ix = tmp_path / "ix"
    ix.mkdir()
    import calibclip.web.app as web_app

    def no_app(*args, **kwargs):
        raise AssertionError("the app (model, indexes) was loaded before the port was checked")

    monkeypatch.setattr(web_app, "create_app", no_app)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(ix), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port} on 127.0.0.1 is not available" in err[0] and "--port" in err[0]


@pytest.fixture()
def fake_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")


def test_index_summary_singular(tmp_path: Path, fake_model: None, capsys) -> None:
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img / "one.png")
    (img / "broken.jpg").write_bytes(b"not a jpeg")
    ix = str(tmp_path / "ix")
    assert main(["index", str(img), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 image indexed" in out and "; 1 file skipped" in out and "1 files" not in out


def _without(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which importing ``module`` fails as if it were not installed."""
    fake = tmp_path / "blocked" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    return {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO / 'src'}", "CALIBCLIP_VENV": str(tmp_path)}


@pytest.mark.parametrize(
    "script, args",
    [
        ("evaluate.py", ["--config", "configs/cuhkpedes.yaml", "--data_root", "/data/CUHK PEDES"]),
        ("batch_evaluate.py", ["--datasets", "cuhkpedes", "--data_roots", "/data/cuhk"]),
        ("demo.py", ["--image_dir", "photos", "--query", "a red dress"]),
    ],
)
@pytest.mark.parametrize("module", ["torch", "numpy"])
def test_seed_scripts_outside_environment_one_line(tmp_path: Path, script: str, args: list[str], module: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=REPO,
        env=_without(tmp_path, module),
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert f"No module named '{module}'" in err[0] and "Traceback" not in proc.stderr
    # the exact next command: set up / activate the environment, then this script with the same arguments
    shown = " ".join(a if " " not in a else f"'{a}'" for a in args)
    assert f"run: . scripts/venv.sh && cd {REPO} && python scripts/{script} {shown}   (" in err[0]


def test_demo_missing_checkpoint_and_folder_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import runpy

    for argv, expect in (
        (["--checkpoint", str(tmp_path / "nope.pt"), "--image_dir", str(tmp_path), "--query", "x"], "not found"),
        (["--image_dir", str(tmp_path / "missing"), "--query", "x"], "is not a folder"),
    ):
        monkeypatch.setattr(sys, "argv", [str(REPO / "scripts" / "demo.py"), *argv])
        monkeypatch.syspath_prepend(str(REPO / "scripts"))
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / "scripts" / "demo.py"), run_name="__main__")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
