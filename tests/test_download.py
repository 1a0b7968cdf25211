"""Downloads against a local HTTP server on 127.0.0.1 (no test touches the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import calibclip
from calibclip.models import download
from calibclip.models.clip import CLIP, CLIPConfig

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    log: list[tuple[str, str | None, int]] = []
    honour_range = True

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        data = self.files.get(self.path)
        rng = self.headers.get("Range")
        if data is None:
            self.log.append((self.path, rng, 404))
            self.send_error(404)
            return
        start = 0
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.log.append((self.path, rng, 416))
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.log.append((self.path, rng, 206 if start else 200))  # before the body: the client may be done first
        self.wfile.write(data[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_Handler]]]:
    _Handler.files, _Handler.log, _Handler.honour_range = {}, [], True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _publish(base: str, handler: type[_Handler], data: bytes, name: str = "ViT-T-16.pt") -> str:
    digest = hashlib.sha256(data).hexdigest()
    handler.files[f"/clip/{digest}/{name}"] = data
    return f"{base}/clip/{digest}/{name}"


def test_download_verifies_and_caches(server, tmp_path: Path) -> None:
    base, handler = server
    url = _publish(base, handler, PAYLOAD)
    target = download.download_url(url, tmp_path / "ViT-T-16.pt", progress=False)
    assert target.read_bytes() == PAYLOAD
    assert not (tmp_path / "ViT-T-16.pt.part").exists()
    assert download.download_url(url, target, progress=False) == target
    assert len(handler.log) == 1  # the second call found the verified file in the cache


def test_resume_from_partial_file(server, tmp_path: Path) -> None:
    base, handler = server
    url = _publish(base, handler, PAYLOAD)
    part = tmp_path / "ViT-T-16.pt.part"
    part.write_bytes(PAYLOAD[:300_000])
    target = download.download_url(url, tmp_path / "ViT-T-16.pt", progress=False)
    assert target.read_bytes() == PAYLOAD
    assert handler.log == [(url.split(base)[1], "bytes=300000-", 206)]


def test_complete_partial_file_is_verified_and_kept(server, tmp_path: Path) -> None:
    base, handler = server
    url = _publish(base, handler, PAYLOAD)
    (tmp_path / "ViT-T-16.pt.part").write_bytes(PAYLOAD)  # interrupted just before the rename
    target = download.download_url(url, tmp_path / "ViT-T-16.pt", progress=False)
    assert target.read_bytes() == PAYLOAD and handler.log[0][2] == 416


def test_server_without_range_support_restarts(server, tmp_path: Path) -> None:
    base, handler = server
    handler.honour_range = False
    url = _publish(base, handler, PAYLOAD)
    (tmp_path / "ViT-T-16.pt.part").write_bytes(b"garbage" * 1000)
    target = download.download_url(url, tmp_path / "ViT-T-16.pt", progress=False)
    assert target.read_bytes() == PAYLOAD and handler.log[0][2] == 200


def test_checksum_mismatch_is_refused(server, tmp_path: Path) -> None:
    base, handler = server
    wrong = hashlib.sha256(b"something else").hexdigest()
    handler.files[f"/clip/{wrong}/ViT-T-16.pt"] = PAYLOAD
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download.download_url(f"{base}/clip/{wrong}/ViT-T-16.pt", tmp_path / "ViT-T-16.pt", progress=False)
    assert not (tmp_path / "ViT-T-16.pt").exists() and not (tmp_path / "ViT-T-16.pt.part").exists()


def test_corrupted_cached_file_is_downloaded_again(server, tmp_path: Path) -> None:
    base, handler = server
    url = _publish(base, handler, PAYLOAD)
    target = download.download_url(url, tmp_path / "ViT-T-16.pt", progress=False)
    target.write_bytes(PAYLOAD[:-1] + b"\x00")  # same size, different content: the marker no longer matches
    (tmp_path / "ViT-T-16.pt.sha256").unlink()
    assert download.download_url(url, target, progress=False).read_bytes() == PAYLOAD
    assert len(handler.log) == 2


def test_offline_and_http_errors_are_clear(server, tmp_path: Path) -> None:
    base, handler = server
    url = _publish(base, handler, PAYLOAD)
    with pytest.raises(RuntimeError, match="HTTP 404"):
        download.download_url(url.replace("/clip/", "/nothing/"), tmp_path / "x.pt", progress=False)
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/clip/{'0' * 64}/ViT-T-16.pt"
    with pytest.raises(RuntimeError, match="Are you offline"):
        download.download_url(dead, tmp_path / "y.pt", progress=False, timeout=5)


def test_model_name_downloads_into_cache(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create_model("RN50") end to end: URL table -> cache (CALIBCLIP_CACHE) -> TorchScript-free state dict load."""
    base, handler = server
    torch.manual_seed(0)
    tiny = CLIP(
        CLIPConfig(
            embed_dim=32, vision_layers=(1, 1, 1, 1), vision_width=8, image_size=64, text_width=64, text_layers=1
        )
    ).eval()
    ckpt = tmp_path / "src.pt"
    torch.save(tiny.state_dict(), ckpt)
    url = _publish(base, handler, ckpt.read_bytes(), name="RN50.pt")
    monkeypatch.setitem(download.OPENAI_URLS, "RN50", url)
    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))
    model = calibclip.create_model("RN50", progress=False)
    assert (tmp_path / "cache" / "RN50.pt").exists()
    assert model.name == "RN50" and model.cfg.vision_width == 8
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.allclose(model.encode_image(pixels), tiny.requires_grad_(False).encode_image(pixels))
    calibclip.create_model("RN50", progress=False, cache_dir=tmp_path / "cache")
    assert len(handler.log) == 1


def test_official_table_carries_sha256() -> None:
    assert set(download.OPENAI_URLS) >= {"RN50", "ViT-B/16", "ViT-L/14@336px"}
    for url in download.OPENAI_URLS.values():
        assert url.startswith("https://") and len(download.expected_sha256(url)) == 64


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CALIBCLIP_CACHE", raising=False)
    assert download.default_cache_dir() == Path.home() / ".cache" / "calibclip"
    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path))
    assert download.default_cache_dir() == tmp_path
    with pytest.raises(ValueError, match="no official weights"):
        download.download_pretrained("ViT-H/14")
