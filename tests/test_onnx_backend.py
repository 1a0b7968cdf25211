"""ONNX Runtime backend: correctness gates against the torch encoders (cosine per embedding), token views,
dynamic axes, the export cache and the registry/CLI plumbing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from calibclip.models import onnx_backend
from calibclip.models.clip import CLIP, CLIPConfig
from calibclip.models.onnx_backend import OnnxEncoder

TEXTS = ["a dog runs on the grass", "hello", "two men playing guitars on a stage at night under red lights", ""]

TINY = {
    "vit": dict(
        embed_dim=48,
        image_size=64,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=16,
        text_width=64,
        text_layers=2,
        text_heads=2,
        vision_heads=2,
    ),
    "resnet": dict(
        embed_dim=48,
        image_size=64,
        vision_layers=(1, 1, 1, 1),
        vision_width=32,
        text_width=64,
        text_layers=2,
        text_heads=2,
        vision_heads=2,
    ),
}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_clip(request: pytest.FixtureRequest) -> CLIP:
    torch.manual_seed(0)
    return CLIP(CLIPConfig(**TINY[request.param])).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def test_tiny_clip_fp32_matches_torch(tiny_clip: CLIP, cache_dir: Path) -> None:
    model = OnnxEncoder(tiny_clip, cache_dir=cache_dir)
    for batch in (1, 5):  # exported at batch 2: the batch axis is dynamic
        px = torch.randn(batch, 3, 64, 64)
        assert model.encode_image(px).shape == (batch, 48)
        assert cosine(model.encode_image(px), tiny_clip.encode_image(px)).min() >= 0.9999
        got, want = model.image_tokens(px), tiny_clip.image_tokens(px)
        assert got.grid == want.grid and got.tokens.shape == want.tokens.shape
        assert cosine(got.pooled, want.pooled).min() >= 0.9999
        assert cosine(got.tokens, want.tokens).min() >= 0.9999
        torch.testing.assert_close(got.attention, want.attention, atol=1e-5, rtol=1e-4)
    for texts in (TEXTS, TEXTS[:1], ["a b"]):  # other batch sizes and sequence lengths than the export's
        tb = model.tokenize(texts)
        assert cosine(model.encode_text(tb), tiny_clip.encode_text(tb)).min() >= 0.9999
        assert cosine(model.encode_text(tb.input_ids), tiny_clip.encode_text(tb.input_ids)).min() >= 0.9999
        got_t, want_t = model.text_tokens(tb), tiny_clip.text_tokens(tb)
        assert got_t.tokens.shape == want_t.tokens.shape
        torch.testing.assert_close(got_t.tokens, want_t.tokens, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_t.attention, want_t.attention, atol=1e-5, rtol=1e-4)
        assert torch.equal(got_t.batch.attention_mask, want_t.batch.attention_mask)
    assert model.fingerprint() == tiny_clip.fingerprint()
    assert model.config()["backend"] == "onnx"
    assert model.encode_image(torch.zeros(0, 3, 64, 64)).shape == (0, 48)


def test_tiny_clip_int8_cosine(tiny_clip: CLIP, cache_dir: Path) -> None:
    model = OnnxEncoder(tiny_clip, precision="int8", cache_dir=cache_dir)
    px = torch.randn(4, 3, 64, 64)
    tb = model.tokenize(TEXTS)
    assert cosine(model.encode_image(px), tiny_clip.encode_image(px)).min() >= 0.995
    assert cosine(model.encode_text(tb), tiny_clip.encode_text(tb)).min() >= 0.995
    assert model.graph_path("text").name == "text-int8.onnx"
    assert model.graph_path("text").stat().st_size < model.graph_path("text", "fp32").stat().st_size


def test_export_is_cached_and_reused(tiny_clip: CLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = OnnxEncoder(tiny_clip, cache_dir=tmp_path)
    tb = first.tokenize(TEXTS)
    want = first.encode_text(tb)
    path = first.graph_path("text")
    assert path.parent == tmp_path / tiny_clip.fingerprint().replace("/", "-") / f"v{onnx_backend.EXPORT_FORMAT}"

    def no_export(*_: object) -> None:
        raise AssertionError("exported again although the cache holds the graph")

    monkeypatch.setattr(onnx_backend, "export_graph", no_export)
    second = OnnxEncoder(tiny_clip, cache_dir=tmp_path)
    assert torch.equal(second.encode_text(tb), want)


def test_env_cache_dir_and_bad_arguments(tiny_clip: CLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path))
    assert OnnxEncoder(tiny_clip).export_dir.is_relative_to(tmp_path / "onnx")
    with pytest.raises(ValueError, match="precision"):
        OnnxEncoder(tiny_clip, precision="bf16")
    with pytest.raises(ValueError, match="CLIP"):
        OnnxEncoder(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
            OnnxEncoder(tiny_clip, device="cuda")


def test_resize_matrix_equals_antialiased_interpolate() -> None:
    x = torch.randn(2, 3, 260, 260)
    want = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    r = onnx_backend.resize_matrix(260, 224)
    torch.testing.assert_close(torch.einsum("ih,bchw,jw->bcij", r, x, r), want, atol=1e-4, rtol=1e-4)


def test_registry_backend_and_int8_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from calibclip.models import registry

    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="backend"):
        registry.create_model("starter", backend="tensorrt")
    with pytest.raises(ValueError, match="int8"):
        registry.create_model("starter", precision="int8")
    model = registry.create_model("starter", backend="onnx")
    assert isinstance(model, OnnxEncoder) and model.name == "starter" and model.precision == "fp32"
    torch_model = model.torch_model
    tb = model.tokenize(TEXTS)
    assert cosine(model.encode_text(tb), torch_model.encode_text(tb)).min() >= 0.9999
    got, want = model.text_tokens(tb), torch_model.text_tokens(tb)
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.attention, want.attention, atol=1e-5, rtol=1e-4)
    int8 = OnnxEncoder(torch_model, precision="int8")
    assert cosine(int8.encode_text(tb), torch_model.encode_text(tb)).min() >= 0.995
    registry.set_default_backend("onnx", "int8")
    try:
        default = registry.create_model("starter")
        assert isinstance(default, OnnxEncoder) and default.onnx_precision == "int8"
    finally:
        registry.set_default_backend(None)
    assert not isinstance(registry.create_model("starter"), OnnxEncoder)


@pytest.mark.slow
def test_starter_images_fp32_and_int8(tmp_path: Path) -> None:
    from calibclip.models.starter import Starter

    torch_model = Starter().eval()
    px = torch.randn(3, 3, torch_model.image_size, torch_model.image_size)
    want = torch_model.image_tokens(px)
    fp32 = OnnxEncoder(torch_model, cache_dir=tmp_path)
    assert cosine(fp32.encode_image(px), want.pooled).min() >= 0.9999
    got = fp32.image_tokens(px)
    assert got.grid == want.grid and cosine(got.tokens, want.tokens).min() >= 0.9999
    torch.testing.assert_close(got.attention, want.attention, atol=1e-5, rtol=1e-4)
    int8 = OnnxEncoder(torch_model, precision="int8", cache_dir=tmp_path)
    assert cosine(int8.encode_image(px), want.pooled).min() >= 0.995


@pytest.mark.slow
@pytest.mark.shared_data
def test_starter_int8_flickr8k_dev_recall(flickr8k_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 starter Flickr8k dev t2i R@1 within 0.3 (points) of the torch fp32 model."""
    from calibclip.evaluation.runner import run_evaluation
    from calibclip.models.registry import create_model

    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path))
    config = {"model": {}, "evaluation": {"cache": False}}
    fp32 = run_evaluation(
        "flickr8k", flickr8k_root, config, split="dev", encoder=create_model("starter"), progress=False
    )["metrics"]
    int8 = run_evaluation(
        "flickr8k",
        flickr8k_root,
        config,
        split="dev",
        progress=False,
        encoder=create_model("starter", backend="onnx", precision="int8"),
    )["metrics"]
    assert abs(int8["t2i_R@1"] - fp32["t2i_R@1"]) <= 0.3, (int8, fp32)


def test_cli_backend_onnx_search_matches_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import sys

    from calibclip.cli.main import main
    from calibclip.models import registry

    sys.path.insert(0, str(Path(__file__).parent))
    from test_index_helpers import make_photo_folder

    def tiny(**_: object) -> CLIP:
        torch.manual_seed(0)
        return CLIP(CLIPConfig(**TINY["vit"]))

    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CALIBCLIP_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_DEFAULT_BACKEND", {"backend": None, "precision": None})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the test model stays local
    registry.register_model("tiny-onnx-test", tiny, pretrained="random")
    make_photo_folder(tmp_path / "img")
    ix = str(tmp_path / "ix")
    assert (
        main(["index", str(tmp_path / "img"), "--out", ix, "--model", "tiny-onnx-test", "--workers", "0", "--quiet"])
        == 0
    )
    capsys.readouterr()
    results = {}
    for backend in ("torch", "onnx"):
        assert main(["search", ix, "--text", "a red square", "--top-k", "3", "--json", "--backend", backend]) == 0
        results[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
        monkeypatch.setattr(registry, "_DEFAULT_BACKEND", {"backend": None, "precision": None})
        monkeypatch.delenv("CALIBCLIP_BACKEND", raising=False)
    assert [r["path"] for r in results["onnx"]] == [r["path"] for r in results["torch"]]
    for a, b in zip(results["onnx"], results["torch"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    assert list((tmp_path / "cache" / "onnx").glob("*/v*/text-fp32.onnx"))
    assert main(["search", ix, "--text", "x", "--precision", "int8"]) == 2  # int8 needs --backend onnx
    assert "needs --backend onnx" in capsys.readouterr().err
