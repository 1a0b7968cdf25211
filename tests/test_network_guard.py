"""Nothing calibclip does sends traffic anywhere but 127.0.0.1 (issue 15, "Beyond the fixes"): with outward
connections and name look-ups refused in-process (tests/netguard.py, on for the whole suite), the CLI commands
the tests run make no attempt; an explicit model-name download says it is about to download, is the only
outward attempt, and ``CALIBCLIP_OFFLINE=1`` stops it before any connection."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from calibclip.cli.main import main
from calibclip.models import registry

sys.path.insert(0, str(Path(__file__).parent))
from fakes import ColorEncoder, make_person_dataset  # noqa: E402
from netguard import NetGuard  # noqa: E402
from test_index_helpers import FakeEncoder, make_photo_folder  # noqa: E402


def test_guard_refuses_outward_and_allows_loopback(_no_outward_network: NetGuard) -> None:
    with socket.socket() as s, pytest.raises(OSError, match="outside 127.0.0.1"):
        s.connect(("192.0.2.1", 80))  # TEST-NET-1
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 443), timeout=1)
    assert len(_no_outward_network.attempts) == 2
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert len(_no_outward_network.attempts) == 2


@pytest.fixture()
def toy_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")
    registry.register_model("color-test", lambda **kw: ColorEncoder(), pretrained="random")
    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))


def test_cli_commands_make_no_outward_connection(tmp_path: Path, toy_models: None, capsys, _no_outward_network):
    images = tmp_path / "img"
    make_photo_folder(images)
    ix = str(tmp_path / "ix")
    person = make_person_dataset(tmp_path / "cuhk", "cuhkpedes")
    photo = tmp_path / "q.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(photo)
    commands = [
        ["version"],
        ["models"],
        ["index", str(images), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet", "--json"],
        ["index", str(images), "--out", ix, "--workers", "0", "--quiet"],
        ["info", ix, "--json", "--skipped"],
        ["search", ix, "--text", "a cat", "--json"],
        ["search", ix, "--image", "chelsea.png", "--text", "darker", "--json"],
        ["search", ix, "--image", str(photo), "--json"],
        ["search", ix, "--text", "a cat", "--ann", "hnsw", "--json"],
        ["evaluate", "--dataset", "cuhkpedes", "--data-root", str(person), "--model", "color-test", "--json"],
        ["evaluate", "--dataset", "cuhkpedes", "--data-root", str(person), "--model", "color-test", "--calibrate"],
    ]
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    capsys.readouterr()
    from fastapi.testclient import TestClient

    from calibclip.web.app import WebConfig, create_app

    app = create_app(WebConfig(index_dirs=[ix], upload_dir=str(tmp_path / "uploads")))
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/").status_code == 200
        assert client.post("/api/search", json={"text": "a cat", "k": 3}).status_code == 200
    assert _no_outward_network.attempts == []


def test_explicit_download_announced_and_only_outward_attempt(
    tmp_path: Path, monkeypatch, capsys, _no_outward_network: NetGuard
) -> None:
    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))  # nothing cached
    monkeypatch.delenv("CALIBCLIP_OFFLINE", raising=False)
    photo = tmp_path / "q.png"
    Image.new("RGB", (32, 32)).save(photo)
    assert main(["explain", "--image", str(photo), "--model", "ViT-B/32"]) == 2
    err = capsys.readouterr().err
    assert "downloading the ViT-B/32 weights from https://openaipublic.azureedge.net/" in err
    assert "CALIBCLIP_OFFLINE=1" in err and "Are you offline" in err and "Traceback" not in err
    assert _no_outward_network.attempts and all("openaipublic.azureedge.net" in a for a in _no_outward_network.attempts)


def test_offline_refuses_download_before_connecting(
    tmp_path: Path, monkeypatch, capsys, _no_outward_network: NetGuard
) -> None:
    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CALIBCLIP_OFFLINE", "1")
    photo = tmp_path / "q.png"
    Image.new("RGB", (32, 32)).save(photo)
    assert main(["explain", "--image", str(photo), "--model", "ViT-B/32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CALIBCLIP_OFFLINE=1 forbids downloading" in err[0]
    assert _no_outward_network.attempts == []


def test_model_mismatch_refused_before_any_download(
    tmp_path: Path, monkeypatch, capsys, _no_outward_network: NetGuard
) -> None:
    """`search --model ViT-B/32` on an index of another model: the mismatch error, with no download attempt."""
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")
    try:
        images = tmp_path / "img"
        make_photo_folder(images)
        ix = str(tmp_path / "ix")
        assert main(["index", str(images), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
        capsys.readouterr()
        monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))
        for argv in (
            ["search", ix, "--text", "a dog", "--model", "ViT-B/32"],
            ["index", str(images), "--out", ix, "--model", "ViT-B/32", "--quiet"],
        ):
            assert main(argv) == 2
            captured = capsys.readouterr()
            err = captured.err.strip().splitlines()
            assert len(err) == 1 and "was built with model 'fake-test'" in err[0] and "Omit --model" in err[0], err
            assert "downloading" not in captured.err
        assert _no_outward_network.attempts == []
        assert not (tmp_path / "cache").exists()
    finally:
        registry._REGISTRY.pop("fake-test", None)


def test_info_json_of_guarded_run_is_plain(tmp_path: Path, toy_models: None, capsys) -> None:
    """`info --json` works under the guard (no hidden look-ups, e.g. of the host name)."""
    make_photo_folder(tmp_path / "img")
    ix = str(tmp_path / "ix")
    assert main(["index", str(tmp_path / "img"), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", ix, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "fake-test"
