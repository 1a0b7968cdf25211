"""Fixtures shared by the web tests: a tiny real index of scikit-image's bundled photos (built
with the default model, with calibrated vectors), CIRR-style annotations beside it, the app, and
a live uvicorn server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Real photos bundled with scikit-image (no download).
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "horse.png",
    "camera.png",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "grass.png",
    "brick.png",
)
#: Annotated modifications (CIRR/CSS style) between those photos.
ANNOTATIONS = [
    {"pairid": 0, "reference": "chelsea", "target_hard": "coffee", "caption": "a cup of coffee instead of the cat"},
    {"pairid": 1, "reference": "chelsea", "target_hard": "horse", "caption": "a horse instead"},
    {"pairid": 2, "reference": "astronaut", "target_hard": "rocket", "caption": "show the rocket launching"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def web_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the index once per test session: images/, index/ and captions.json under a tmp dir."""
    import skimage.data
    import torch

    from calibclip.index import Index

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("web")
    images = root / "images"
    images.mkdir()
    src = Path(os.path.dirname(skimage.data.__file__))
    for name in PHOTOS:
        shutil.copy(src / name, images / name)
    Index.build(images, root / "index", model="starter", calibrate=True, workers=0, progress=False)
    captions = root / "captions" / "cap.rc2.val.json"  # CIRR layout beside the images: found automatically
    captions.parent.mkdir()
    captions.write_text(json.dumps(ANNOTATIONS))
    return {"root": root, "images": images, "index": root / "index", "captions": captions}


@pytest.fixture(scope="session")
def web_app(web_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from calibclip.web.app import WebConfig, create_app

    config = WebConfig(
        index_dirs=[str(web_data["index"])],
        upload_dir=str(tmp_path_factory.mktemp("uploads")),
        max_upload_bytes=2 * 1024 * 1024,
    )
    return create_app(config)


@pytest.fixture(scope="session")
def live_server(web_app) -> Iterator[str]:
    """The app served by uvicorn in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(web_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
