"""First-use details of the web app (issue 16, Web) checked over HTTP: a running server sees a
re-index, the favicon exists, the "API" link opens the (locally served) OpenAPI docs page.
The browser-side points are in test_web_e2e.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from web_support import web_app, web_data  # noqa: E402,F401


@pytest.fixture(scope="module")
def client(web_app) -> TestClient:  # noqa: F811
    return TestClient(web_app, base_url="http://localhost", raise_server_exceptions=False)


def test_running_server_sees_a_reindex(web_app, tmp_path: Path) -> None:  # noqa: F811
    """Index 3 photos, serve them, index a 4th with `Index.build` (as `calibclip index` would, from
    another process): the next requests see 4 images and find the new one."""
    import skimage.data

    from calibclip.index import Index
    from calibclip.web.app import WebConfig, create_app
    from calibclip.web.service import ServedIndex

    src = Path(os.path.dirname(skimage.data.__file__))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.png", "camera.png", "grass.png"):
        shutil.copy(src / name, images / name)
    encoder = next(iter(web_app.state.indexes.values())).index.encoder  # the model already loaded
    Index.build(images, tmp_path / "index", model=encoder, workers=0, progress=False).close()
    served = ServedIndex("photos", Index.open(tmp_path / "index", model=encoder), refresh_s=0.0)
    app = create_app(WebConfig(index_dirs=[], upload_dir=str(tmp_path / "up")), indexes=[served])
    c = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    assert c.get("/api/indexes").json()["indexes"][0]["count"] == 3
    before = c.post("/api/search", json={"text": "a cup of coffee", "k": 10}).json()["results"]
    assert "coffee.png" not in [r["path"] for r in before]

    shutil.copy(src / "coffee.png", images / "coffee.png")
    Index.build(images, tmp_path / "index", model=encoder, workers=0, progress=False).close()

    assert c.get("/api/indexes").json()["indexes"][0]["count"] == 4
    after = c.post("/api/search", json={"text": "a cup of coffee", "k": 10}).json()["results"]
    new = [r for r in after if r["path"] == "coffee.png"]
    assert len(after) == 4 and len(new) == 1
    assert c.get(new[0]["thumb_url"]).status_code == 200
    assert "4 images" in c.get("/").text

    (images / "camera.png").unlink()  # a removal is seen too
    Index.build(images, tmp_path / "index", model=encoder, workers=0, progress=False).close()
    assert c.get("/api/indexes").json()["indexes"][0]["count"] == 3


def test_refresh_interval_limits_the_checks(web_data) -> None:  # noqa: F811
    from calibclip.index import Index
    from calibclip.web.service import ServedIndex

    served = ServedIndex("x", Index.open(web_data["index"]), refresh_s=3600.0)
    assert served.refresh() is False  # not due yet (and nothing changed)
    assert served.refresh(force=True) is False  # checked: nothing changed
    never = ServedIndex("y", Index.open(web_data["index"]), refresh_s=None)
    assert never.refresh() is False


def test_index_reports_staleness(web_data, tmp_path: Path) -> None:  # noqa: F811
    import skimage.data

    from calibclip.index import Index

    base = next(iter(Index.open(web_data["index"]).paths()))[1]
    images = tmp_path / "i"
    images.mkdir()
    shutil.copy(base, images / base.name)
    encoder = Index.open(web_data["index"]).encoder
    Index.build(images, tmp_path / "idx", model=encoder, workers=0, progress=False).close()
    opened = Index.open(tmp_path / "idx", model=encoder)
    assert opened.is_stale() is False
    shutil.copy(Path(os.path.dirname(skimage.data.__file__)) / "horse.png", images / "horse.png")
    Index.build(images, tmp_path / "idx", model=encoder, workers=0, progress=False).close()
    assert opened.is_stale() is True and len(opened) == 1  # the opened snapshot is unchanged
    assert len(Index.open(tmp_path / "idx")) == 2


def test_favicon(client: TestClient) -> None:
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # ICO header
    assert 'rel="icon"' in client.get("/").text


def test_api_link_opens_the_docs_page_served_locally(client: TestClient) -> None:
    home = client.get("/").text
    assert 'class="api-link" href="/docs"' in home
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text  # works offline
    for asset in ("/static/swagger-ui/swagger-ui-bundle.js", "/static/swagger-ui/swagger-ui.css", "/static/docs.js"):
        assert client.get(asset).status_code == 200, asset
    assert "/openapi.json" in client.get("/static/docs.js").text
    assert len(client.get("/openapi.json").json()["paths"]) >= 9
