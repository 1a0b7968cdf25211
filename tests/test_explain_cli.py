"""`calibclip explain` end to end on the fake encoder (registered for the test)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from calibclip.cli.main import main
from calibclip.models.registry import register_model
from fakes import TokenEncoder as FakeEncoder

torch.set_num_threads(1)
register_model("fake-explain", lambda **kw: FakeEncoder(**kw), "test-only fake encoder", pretrained="random")


def make_image(path) -> None:
    """24x24 image: bright 4x4 block in the corner (dominant background token) on a dim field."""
    arr = np.full((24, 24, 3), 20, dtype=np.uint8)
    arr[:4, :4, 0] = 255
    arr[8:20, 8:20, 0] = 60
    Image.fromarray(arr).save(path)


def test_explain_writes_png_and_json(tmp_path, capsys) -> None:
    img, out = tmp_path / "img.png", tmp_path / "x.png"
    make_image(img)
    rc = main(
        [
            "explain",
            "--model",
            "fake-explain",
            "--image",
            str(img),
            "--text",
            "a man with a red backpack",
            "--out",
            str(out),
            "--json",
            "--set",
            "decay_factor=0.25",
        ]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["decay_factor"] == 0.25
    assert data["text_explanation"]["masked_words"] == ["man"]
    assert data["image_explanation"]["treatment"][0][0] == "suppress"
    assert set(data["similarity"]) == {"raw", "calibrated"}
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_explain_text_summary_and_errors(tmp_path, capsys) -> None:
    img = tmp_path / "img.png"
    make_image(img)
    assert main(["explain", "--model", "fake-explain", "--image", str(img), "--text", "a dog runs on the grass"]) == 0
    out = capsys.readouterr().out
    assert "masked: ['dog']" in out and "suppress 1" in out
    assert main(["explain", "--model", "fake-explain", "--image", str(tmp_path / "none.jpg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", "--model", "fake-explain", "--image", str(img), "--set", "lam"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
