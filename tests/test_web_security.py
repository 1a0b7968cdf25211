"""HTTP hardening of the web app (issue 15 items 5 and 6): request bodies capped per route and
refused before they are read, Host allow-list (DNS rebinding), same-origin rule for state-changing
requests (CSRF), Content-Security-Policy / frame-ancestors / nosniff headers."""

from __future__ import annotations

import io
import socket
import time
from urllib.parse import urlsplit

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from web_support import live_server, web_app, web_data  # noqa: E402,F401


@pytest.fixture(scope="module")
def client(web_app) -> TestClient:  # noqa: F811
    return TestClient(web_app, base_url="http://127.0.0.1:5000", raise_server_exceptions=False)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _read_response(s: socket.socket, first: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Read one HTTP response (headers and a Content-Length body) from ``s``."""
    data = first
    deadline = time.time() + wait_s
    while time.time() < deadline:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(body) >= length:
                return data
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _raw_request(base: str, head: str, body: bytes = b"", wait_s: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` (+ ``body``) on a raw socket; the status and what the server answered."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=wait_s) as s:
        s.sendall(head.encode("latin-1") + body)
        data = _read_response(s, wait_s=wait_s)
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split()[1]), data


# ---- body limits (item 5) ----------------------------------------------------------------------
def test_huge_declared_body_is_refused_before_it_is_sent(live_server: str) -> None:  # noqa: F811
    """300 MB announced, nothing sent: the server answers 413 at once instead of waiting to read it."""
    host = urlsplit(live_server).netloc
    head = (
        f"POST /api/search HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {300 * 1024 * 1024}\r\n\r\n"
    )
    status, data = _raw_request(live_server, head, wait_s=10)
    assert status == 413, data[:300]
    assert b"limit" in data


def test_chunked_body_over_the_cap_is_refused_while_streaming(live_server: str) -> None:  # noqa: F811
    """A chunked body (no Content-Length) is counted as it arrives: 413 long before it ends."""
    import select

    parts = urlsplit(live_server)
    head = (
        f"POST /api/search HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b'{"text": "' + b"a" * 8192
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent, answer = 0, b""
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(head.encode())
        deadline = time.time() + 30
        while sent < 2000 and time.time() < deadline:  # up to 16 MB; the cap of /api/search is 8 KiB
            if select.select([s], [], [], 0.02)[0]:
                answer = _read_response(s)
                break
            try:
                s.sendall(chunk)
            except OSError:  # the server answered and closed
                answer = _read_response(s)
                break
            sent += 1
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"limit" in answer
    assert sent < 2000  # refused while streaming, not after reading everything


def test_body_caps_are_per_route(client: TestClient) -> None:
    big_text = {"text": "x" * 400, "index": "y" * 90, "k": 5, "pad": "z" * 9000}  # > 8 KiB
    assert client.post("/api/search", json=big_text).status_code == 413
    ok = client.post("/api/search", json={"text": "a cat", "k": 3})
    assert ok.status_code == 200
    # explain takes up to 50 ids: its cap is larger than the search cap
    ids = [str(i) for i in range(50)]
    r = client.post("/api/explain", json={"ids": ids, "text": "a" * 500, "pad": "p" * 9000})
    assert r.status_code == 422  # read and validated (unknown field), not refused for its size
    # the upload route keeps its own (larger) limit
    up = client.post("/api/upload", files={"file": ("a.png", _png() + b"\x00" * 20_000, "image/png")})
    assert up.status_code in (201, 400), up.text


# ---- Host header (item 6) ----------------------------------------------------------------------
def test_foreign_host_header_is_refused(client: TestClient) -> None:
    item = client.get("/api/sample", params={"n": 1, "seed": 0}).json()["items"][0]
    for path in (item["url"], "/", "/api/health", "/docs"):
        r = client.get(path, headers={"host": "attacker.example"})
        assert r.status_code == 400, (path, r.status_code)
        assert "not allowed" in r.json()["detail"] and "--allowed-host" in r.json()["detail"]
    for host in ("localhost:5000", "127.0.0.1", "[::1]:5000", "LOCALHOST"):
        assert client.get(item["url"], headers={"host": host}).status_code == 200, host


def test_allowed_hosts_are_configurable(web_data, tmp_path) -> None:  # noqa: F811
    from calibclip.web.app import WebConfig, create_app
    from calibclip.web.service import ServedIndex

    shared = ServedIndex.open("photos", web_data["index"])
    app = create_app(
        WebConfig(
            index_dirs=[], upload_dir=str(tmp_path), host="0.0.0.0", allowed_hosts=["photos.lan", "*.example.org"]
        ),
        indexes=[shared],
    )
    c = TestClient(app, base_url="http://photos.lan", raise_server_exceptions=False)
    assert c.get("/api/health").status_code == 200
    assert c.get("/api/health", headers={"host": "a.example.org"}).status_code == 200
    assert c.get("/api/health", headers={"host": "example.org.evil.com"}).status_code == 400
    assert c.get("/api/health", headers={"host": "localhost"}).status_code == 400  # only what was given
    with pytest.raises(ValueError, match="without scheme or port"):
        create_app(WebConfig(index_dirs=[], allowed_hosts=["http://photos.lan:80"]), indexes=[shared])


def test_default_allowed_hosts() -> None:
    from calibclip.web.security import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("192.168.1.5")[0] == "192.168.1.5"
    assert "0.0.0.0" not in default_allowed_hosts("0.0.0.0")


def test_serve_cli_takes_allowed_host(tmp_path) -> None:
    import argparse

    from calibclip.cli import serve

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve.add_parser(sub)
    args = parser.parse_args(["serve", str(tmp_path), "--allowed-host", "a.lan", "--allowed-host", "b.lan"])
    assert args.allowed_host == ["a.lan", "b.lan"]


# ---- same origin for state-changing requests (item 6) ---------------------------------------------
@pytest.mark.parametrize(
    "headers,status",
    [
        ({"origin": "http://attacker.example"}, 403),
        ({"origin": "null"}, 403),
        ({"origin": "http://127.0.0.1:5001"}, 403),  # another port is another origin
        ({"referer": "http://attacker.example/page"}, 403),
        ({"origin": "http://127.0.0.1:5000"}, 201),
        ({"referer": "http://127.0.0.1:5000/search?mode=composed"}, 201),
        ({}, 201),  # no Origin / Referer: not a browser (curl, scripts)
    ],
)
def test_cross_origin_upload_is_refused(client: TestClient, headers: dict, status: int) -> None:
    r = client.post("/api/upload", files={"file": ("a.png", _png(), "image/png")}, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert "cross-origin" in r.json()["detail"]


def test_cross_origin_search_is_refused(client: TestClient) -> None:
    r = client.post("/api/search", json={"text": "a cat"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    assert client.get("/api/health", headers={"origin": "http://evil.example"}).status_code == 200  # reads are fine


# ---- headers (item 6) -------------------------------------------------------------------------------
def test_pages_carry_csp_and_frame_ancestors(client: TestClient) -> None:
    for path in ("/", "/search?mode=text", "/search?mode=composed", "/docs"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-eval" not in csp, path
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
    page_csp = client.get("/").headers["content-security-policy"]
    assert "unsafe-inline" not in page_csp and "default-src 'self'" in page_csp
    api = client.get("/api/health")
    assert api.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in api.headers["content-security-policy"]
