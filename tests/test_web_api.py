"""JSON API of the web demo: every endpoint, bad input, traversal attempts, concurrency."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from web_support import PHOTOS, live_server, web_app, web_data  # noqa: E402,F401


@pytest.fixture(scope="module")
def client(web_app) -> TestClient:  # noqa: F811
    return TestClient(web_app, base_url="http://localhost", raise_server_exceptions=False)


def _ids_by_name(client: TestClient) -> dict[str, str]:
    """Indexed id of every photo, found through the API itself (sample of the whole gallery)."""
    items = client.get("/api/sample", params={"n": 100, "seed": 0}).json()["items"]
    return {Path(it["path"]).stem: it["id"] for it in items}


def _png_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- metadata --------------------------------------------------------------------------------
def test_health_and_indexes(client: TestClient) -> None:
    h = client.get("/api/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["indexes"] == 1
    info = client.get("/api/indexes").json()["indexes"]
    assert len(info) == 1
    assert info[0]["count"] == len(PHOTOS)
    assert info[0]["suggestions"] is True
    assert info[0]["combining"] in ("sum", "combiner")


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = set(doc["paths"])
    for p in (
        "/api/health",
        "/api/indexes",
        "/api/search",
        "/api/upload",
        "/api/images/{image_id}",
        "/api/explain",
        "/api/sample",
        "/api/suggestions",
        "/api/heatmap/{image_id}",
    ):
        assert p in paths, p


def test_pages_render(client: TestClient) -> None:
    home = client.get("/")
    assert home.status_code == 200 and "text/html" in home.headers["content-type"]
    name = client.get("/api/indexes").json()["indexes"][0]["name"]
    assert name in home.text
    page = client.get("/search", params={"index": name, "mode": "composed"})
    assert page.status_code == 200 and 'id="composed-form"' in page.text
    assert client.get("/search", params={"index": "nope"}, follow_redirects=False).status_code == 303
    assert client.get("/static/app.js").status_code == 200


# ---- search ----------------------------------------------------------------------------------
def test_text_search_matches_the_index_api(client: TestClient, web_app, web_data) -> None:  # noqa: F811
    from calibclip.index import Index

    r = client.post("/api/search", json={"text": "a cup of coffee", "k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4, 5]
    scores = [x["score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    expected = Index.open(web_data["index"]).search(text="a cup of coffee", k=5)
    assert [x["id"] for x in results] == [str(h.id) for h in expected]
    np.testing.assert_allclose(scores, [h.score for h in expected], rtol=1e-5, atol=1e-6)
    # every result is fetchable by its URL and thumbnail URL
    for x in results[:2]:
        full = client.get(x["url"])
        thumb = client.get(x["thumb_url"])
        assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256


def test_image_search_and_result_ids_round_trip(client: TestClient) -> None:
    ids = _ids_by_name(client)
    r = client.post("/api/search", json={"reference": ids["chelsea"], "k": 3})
    assert r.status_code == 200
    top = r.json()["results"]
    assert top[0]["id"] == ids["chelsea"]  # an image is its own nearest neighbour
    # a result id goes straight back as the reference of a composed query (click-to-refine)
    r2 = client.post("/api/search", json={"reference": top[1]["id"], "text": "in black and white", "k": 4})
    assert r2.status_code == 200 and len(r2.json()["results"]) == 4


def test_composed_search_marks_annotated_target(client: TestClient) -> None:
    ids = _ids_by_name(client)
    r = client.post(
        "/api/search",
        json={"reference": ids["chelsea"], "text": "A cup of coffee instead of the cat", "k": len(PHOTOS)},
    )
    body = r.json()
    assert body["target"] == ids["coffee"]
    marked = [x["id"] for x in body["results"] if x["is_target"]]
    assert marked == [ids["coffee"]]
    plain = client.post("/api/search", json={"reference": ids["chelsea"], "text": "something else", "k": 3}).json()
    assert plain["target"] is None and not any(x["is_target"] for x in plain["results"])


def test_calibrated_search_matches_the_index_api(client: TestClient, web_data) -> None:  # noqa: F811
    from calibclip.index import Index

    ids = _ids_by_name(client)
    index = Index.open(web_data["index"])
    for query in ({"text": "a cat on a sofa"}, {"reference": ids["chelsea"], "text": "a horse instead"}):
        r = client.post("/api/search", json={**query, "calibrate": True, "k": 5})
        assert r.status_code == 200, r.text
        expected = index.search(
            text=query["text"], image=int(query["reference"]) if "reference" in query else None, k=5, calibrate=True
        )
        assert [x["id"] for x in r.json()["results"]] == [str(h.id) for h in expected]
    up = client.post("/api/upload", files={"file": ("c.png", (web_data["images"] / "chelsea.png").read_bytes())})
    r = client.post("/api/search", json={"reference": up.json()["id"], "text": "at night", "calibrate": True, "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


@pytest.mark.parametrize(
    "body,status",
    [
        ({}, 400),
        ({"text": "   "}, 400),
        ({"text": "x", "k": 0}, 422),
        ({"text": "x", "k": 10_000}, 422),
        ({"text": "x", "index": "no-such-index"}, 404),
        ({"text": "x", "index": "../../etc"}, 404),
        ({"reference": "999999"}, 404),
        ({"reference": "../../etc/passwd"}, 404),
        ({"reference": "/etc/passwd"}, 404),
        ({"reference": "u-" + "0" * 32}, 404),
        ({"text": "x", "unknown_field": 1}, 422),
        ({"text": 12}, 422),
    ],
)
def test_search_bad_input(client: TestClient, body: dict, status: int) -> None:
    r = client.post("/api/search", json=body)
    assert r.status_code == status, r.text
    assert "detail" in r.json() and "Traceback" not in r.text


def test_search_rejects_non_json(client: TestClient) -> None:
    r = client.post("/api/search", content=b"\xff\x00 not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "Traceback" not in r.text


# ---- uploads ---------------------------------------------------------------------------------
def test_upload_then_search_by_upload(client: TestClient, web_data) -> None:  # noqa: F811
    data = (web_data["images"] / "coffee.png").read_bytes()
    r = client.post("/api/upload", files={"file": ("coffee.png", data, "image/png")})
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["id"].startswith("u-") and (up["width"], up["height"]) == (600, 400)
    img = client.get(up["url"])
    assert img.status_code == 200 and Image.open(io.BytesIO(img.content)).format == "JPEG"
    ids = _ids_by_name(client)
    hits = client.post("/api/search", json={"reference": up["id"], "k": 1}).json()["results"]
    assert hits[0]["id"] == ids["coffee"]
    composed = client.post("/api/search", json={"reference": up["id"], "text": "with milk", "k": 2})
    assert composed.status_code == 200 and composed.json()["target"] is None
    # stored outside the served tree, re-encoded (not the uploaded bytes)
    stored = _upload_file(client, up["id"])
    assert stored.read_bytes() != data and stored.read_bytes()[:2] == b"\xff\xd8"


def _upload_file(client: TestClient, upload_id: str) -> Path:
    store = client.app.state.uploads
    path = store.path(upload_id)
    assert path is not None and Path(__file__).resolve().parents[1] not in path.resolve().parents
    return path


@pytest.mark.parametrize(
    "name,payload,status,needle",
    [
        ("notes.png", b"this is plain text, not an image", 400, "not_an_image"),
        ("empty.jpg", b"", 400, "empty"),
        ("bomb.png", _png_bomb(), 413, "too_large"),
        ("truncated.png", _png_bytes()[:60], 400, ""),
        ("big.png", b"\x89PNG" + b"\x00" * (3 * 1024 * 1024), 413, "limit"),
    ],
)
def test_upload_rejects_bad_files(client: TestClient, name: str, payload: bytes, status: int, needle: str) -> None:
    r = client.post("/api/upload", files={"file": (name, payload, "image/png")})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"] and "Traceback" not in r.text


def test_upload_without_file_or_length(client: TestClient) -> None:
    assert client.post("/api/upload").status_code == 422
    assert client.post("/api/upload", data={"other": "x"}).status_code == 422

    def chunks():  # chunked transfer: no Content-Length, so the size cannot be checked up front
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        yield _png_bytes()
        yield b"\r\n--x--\r\n"

    r = client.post("/api/upload", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 411 and "Content-Length" in r.json()["detail"]


def test_uploads_expire(tmp_path: Path) -> None:
    from calibclip.web.uploads import UploadStore

    store = UploadStore(tmp_path / "u", ttl_s=0.0)
    upload_id = store.add(_png_bytes())
    assert store.path(upload_id) is None  # expired immediately
    assert list((tmp_path / "u").glob("u-*.jpg")) == []


# ---- images, traversal -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/images/..",
        "/api/images/1%2F..%2F..%2Fcaptions.json",
        "/api/images/astronaut.png",
        "/api/images/999999999",
        "/api/images/-1",
        "/api/images/u-../../etc/passwd",
        "/api/images/1?index=..%2F..%2F",
        "/api/images/1?index=%2Fetc",
        "/api/heatmap/..%2F..%2Fetc%2Fpasswd",
        "/api/suggestions?reference=..%2F..%2Fetc%2Fpasswd",
    ],
)
def test_traversal_attempts_are_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code, r.text[:200])
    assert "root:" not in r.text and "Traceback" not in r.text


def test_bad_image_size_parameter(client: TestClient) -> None:
    some_id = _ids_by_name(client)["horse"]
    assert client.get(f"/api/images/{some_id}", params={"size": "huge"}).status_code == 422
    full = client.get(f"/api/images/{some_id}", params={"size": "full"})
    assert Image.open(io.BytesIO(full.content)).size == (400, 328)


# ---- sample, suggestions ---------------------------------------------------------------------
def test_sample(client: TestClient) -> None:
    a = client.get("/api/sample", params={"n": 4, "seed": 7}).json()["items"]
    b = client.get("/api/sample", params={"n": 4, "seed": 7}).json()["items"]
    assert [x["id"] for x in a] == [x["id"] for x in b]
    assert len({x["id"] for x in a}) == 4
    everything = client.get("/api/sample", params={"n": 100}).json()["items"]
    assert sorted(Path(x["path"]).name for x in everything) == sorted(PHOTOS)
    annotated = client.get("/api/sample", params={"n": 10, "annotated": True}).json()["items"]
    assert sorted(Path(x["path"]).stem for x in annotated) == ["astronaut", "chelsea"]
    assert client.get("/api/sample", params={"n": 0}).status_code == 422


def test_read_annotations_formats_and_errors(tmp_path: Path) -> None:
    from calibclip.web.captions import Annotation, Suggestions, read_annotations

    fiq = tmp_path / "cap.dress.val.json"
    fiq.write_text('[{"candidate": "B001", "target": "B002", "captions": ["is red", "has no sleeves"]}]')
    assert read_annotations(fiq) == [Annotation("B001", "is red and has no sleeves", "B002")]
    s = Suggestions(read_annotations(fiq), {7: "dress/B001.jpg", 9: "dress/B002.jpg"})
    assert s.for_reference(7) == [("is red and has no sleeves", 9)] and s.target(7, "Is  red and has no sleeves") == 9
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x"}]')
    with pytest.raises(ValueError, match="expected reference/caption/target_hard"):
        read_annotations(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        read_annotations(bad)
    with pytest.raises(FileNotFoundError):
        read_annotations(tmp_path / "missing.json")


def test_suggestions(client: TestClient) -> None:
    ids = _ids_by_name(client)
    s = client.get("/api/suggestions", params={"reference": ids["chelsea"]}).json()["suggestions"]
    assert {x["text"]: x["target"] for x in s} == {
        "a cup of coffee instead of the cat": ids["coffee"],
        "a horse instead": ids["horse"],
    }
    none = client.get("/api/suggestions", params={"reference": ids["brick"]}).json()
    assert none["suggestions"] == []


# ---- explanations ----------------------------------------------------------------------------
def test_explain_words_and_heatmaps(client: TestClient) -> None:
    ids = _ids_by_name(client)
    r = client.post(
        "/api/explain", json={"text": "a photo of a cat on a table", "ids": [ids["chelsea"], ids["coffee"]]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    words = [t["token"] for t in body["tokens"]]
    assert "cat" in words
    assert set(body["dominant_words"]) <= set(words)
    assert all(t["weight"] >= 0 for t in body["tokens"])
    for im in body["images"]:
        h, w = im["grid"]
        assert len(im["attention"]) == h * w == len(im["treatment"])
        assert abs(sum(im["attention"]) - 1.0) < 1e-3
        assert set(im["treatment"]) <= {"context", "target", "retain", "decay", "suppress"}
        png = client.get(im["heatmap_url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.post("/api/explain", json={}).status_code == 400
    assert client.post("/api/explain", json={"ids": ["../x"]}).status_code == 404


# ---- robustness ------------------------------------------------------------------------------
def test_internal_errors_hide_details(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    ix = next(iter(client.app.state.indexes.values()))

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail /home/user/.ssh")

    monkeypatch.setattr(ix, "search", boom)
    r = client.post("/api/search", json={"text": "x"})
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text and r.json()["detail"]


def test_twenty_parallel_requests_all_succeed(live_server: str) -> None:  # noqa: F811
    import httpx

    queries = ["a cat", "a rocket", "coffee", "a horse", "an astronaut"] * 4

    def one(q: str) -> tuple[int, list]:
        r = httpx.post(f"{live_server}/api/search", json={"text": q, "k": 3}, timeout=60)
        return r.status_code, r.json()["results"]

    with ThreadPoolExecutor(20) as pool:
        out = list(pool.map(one, queries))
    assert all(status == 200 for status, _ in out)
    # same query -> same answer whatever the interleaving
    for i in range(5):
        assert all(out[i][1] == out[i + 5 * j][1] for j in range(4))


def test_several_indexes(client: TestClient, tmp_path: Path) -> None:
    from calibclip.web.app import WebConfig, _names, create_app
    from calibclip.web.service import ServedIndex

    assert _names(["/a/photos", "/b/photos", "/c/my photos!"]) == ["photos", "photos-2", "my-photos"]
    shared = next(iter(client.app.state.indexes.values())).index  # one opened index, served twice
    app = create_app(
        WebConfig(index_dirs=[], upload_dir=str(tmp_path)),
        indexes=[ServedIndex("first", shared), ServedIndex("second", shared)],
    )
    c = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    assert [i["name"] for i in c.get("/api/indexes").json()["indexes"]] == ["first", "second"]
    home = c.get("/").text
    assert "/search?index=first" in home and "/search?index=second" in home
    r = c.post("/api/search", json={"index": "second", "text": "a horse", "k": 2}).json()
    assert r["index"] == "second" and all("index=second" in x["url"] for x in r["results"])
    assert c.get(r["results"][0]["thumb_url"]).status_code == 200
    page = c.get("/search", params={"index": "second"}).text
    assert 'data-index="second"' in page and '<option value="first"' in page


def test_serve_cli_validates_arguments(tmp_path: Path) -> None:
    from calibclip.cli.main import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(tmp_path), "--workers", "0"]) == 2
    assert main(["serve", str(tmp_path), "--batch-size", "0"]) == 2
    assert main(["serve", str(tmp_path), "--queue-size", "0"]) == 2
    assert main(["serve", str(tmp_path), "--refresh-interval", "-1"]) == 2


def test_serve_command_runs_uvicorn(web_data, tmp_path: Path) -> None:  # noqa: F811
    """`calibclip serve` end to end: a real server process answering the API and the pages."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from web_support import free_port

    port = free_port()
    tmp = tmp_path / "tmp"  # the server's temporary folder: its upload store goes there
    tmp.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "calibclip.cli.main",
            "serve",
            str(web_data["index"]),
            "--port",
            str(port),
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up in 120 s"
            time.sleep(0.3)
        r = httpx.post(base + "/api/search", json={"text": "a rocket", "k": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert "server" not in {k.lower() for k in r.headers}  # no server banner
        assert httpx.get(base + "/", timeout=10).status_code == 200
        up = httpx.post(base + "/api/upload", files={"file": ("a.png", _png_bytes(), "image/png")}, timeout=30)
        assert up.status_code == 201 and len(list(tmp.glob("calibclip-uploads-*/u-*.jpg"))) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert list(tmp.iterdir()) == []  # uploads removed on shutdown
