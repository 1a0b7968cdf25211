"""Checkpoint formats round-trip (save random weights, load, equal outputs); unsafe and wrong files refused."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import calibclip
from calibclip.models.checkpoints import CheckpointError, detect_format, load_checkpoint, read_torchscript_weights
from calibclip.models.clip import CLIP, CLIPConfig

torch.set_num_threads(1)

VIT = dict(
    embed_dim=32, vision_layers=2, vision_width=64, vision_patch_size=16, image_size=32, text_width=64, text_layers=2
)
RESNET = dict(embed_dim=32, vision_layers=(1, 1, 1, 1), vision_width=8, image_size=64, text_width=64, text_layers=1)


def _tiny(arch: dict, act: str = "quick_gelu", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(CLIPConfig(**arch, act=act)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.requires_grad_(False)  # as create_model returns it (CPU conv kernels differ with grad)


def _outputs(model: CLIP, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    return model.encode_image(pixels), model.encode_text(calibclip.tokenize(["a red car", "a dog on a sofa"]))


def _assert_same(a: CLIP, b: CLIP, size: int = 32) -> None:
    for x, y in zip(_outputs(a, size), _outputs(b, size)):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def vit() -> CLIP:
    return _tiny(VIT)


def test_plain_state_dict_roundtrip_and_inference(tmp_path: Path, vit: CLIP) -> None:
    path = tmp_path / "clip.pt"
    torch.save(vit.state_dict(), path)
    assert detect_format(path) == "state_dict"
    loaded = calibclip.create_model(path)
    _assert_same(vit, loaded)
    cfg = loaded.cfg
    assert (cfg.vision_layers, cfg.vision_width, cfg.vision_patch_size, cfg.image_size) == (2, 64, 16, (32, 32))
    assert (cfg.text_layers, cfg.text_width, cfg.text_heads, cfg.vision_heads, cfg.embed_dim) == (2, 64, 1, 1, 32)
    assert cfg.act == "quick_gelu" and cfg.context_length == 77 and cfg.vocab_size == 49408


def test_resnet_architecture_inferred(tmp_path: Path) -> None:
    model = _tiny(RESNET)
    path = tmp_path / "rn.pth"
    torch.save(model.state_dict(), path)
    loaded = calibclip.create_model(path)
    assert loaded.cfg.vision_layers == (1, 1, 1, 1) and loaded.cfg.vision_width == 8
    assert loaded.cfg.vision_heads == 4 and loaded.cfg.image_size == (64, 64) and not loaded.cfg.is_vit
    _assert_same(model, loaded, size=64)
    bf16 = calibclip.create_model(path, precision="bf16")
    pixels = torch.randn(2, 3, 64, 64)
    sim = torch.nn.functional.cosine_similarity(bf16.encode_image(pixels).float(), loaded.encode_image(pixels))
    assert sim.min() > 0.99
    view = bf16.image_tokens(pixels)
    assert view.tokens.dtype == torch.bfloat16 and view.attention.dtype == torch.float32
    assert view.grid == (2, 2) and torch.allclose(view.attention.sum(-1), torch.ones(2))


def test_resnet_attnpool_positions_interpolated_for_non_square_input(tmp_path: Path) -> None:
    model = _tiny(RESNET)
    path = tmp_path / "rn.pt"
    torch.save(model.state_dict(), path)
    tall = calibclip.create_model(path, image_size=(96, 64))
    assert tall.visual.attnpool.grid == (3, 2)
    pos = tall.visual.attnpool.positional_embedding.detach()
    src = model.visual.attnpool.positional_embedding.detach()
    assert pos.shape == (3 * 2 + 1, src.shape[1]) and torch.equal(pos[0], src[0])
    grid = src[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(3, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(pos[1:], expected.permute(0, 2, 3, 1).reshape(6, -1), atol=1e-6)
    view = tall.image_tokens(torch.randn(1, 3, 96, 64))
    assert view.grid == (3, 2) and view.tokens.shape == (1, 6, 32)
    with pytest.raises(ValueError, match="image_size"):
        tall.encode_image(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {
            "model": {**{f"base_model.{k}": v for k, v in sd.items()}, "classifier.weight": torch.ones(3, 2)},
            "epoch": 7,
        },
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"lr": 0.1}},
        lambda sd: {"model_state_dict": {f"module.clip.{k}": v for k, v in sd.items()}},
    ],
    ids=["irra", "state_dict+module", "nested"],
)
def test_wrapped_state_dicts(tmp_path: Path, vit: CLIP, wrap) -> None:
    path = tmp_path / "finetuned.pth"
    torch.save(wrap(vit.state_dict()), path)
    _assert_same(vit, calibclip.create_model(path))


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_files_with_config(tmp_path: Path, filename: str) -> None:
    for quick in (True, False):
        model = _tiny(VIT, act="quick_gelu" if quick else "gelu")
        folder = tmp_path / str(quick)
        folder.mkdir()
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        (save_file(sd, folder / filename) if filename.endswith(".safetensors") else torch.save(sd, folder / filename))
        (folder / "open_clip_config.json").write_text(
            json.dumps(
                {
                    "model_cfg": {"quick_gelu": quick},
                    "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3},
                }
            )
        )
        for target in (folder / filename, folder):  # the file or its directory
            loaded = calibclip.create_model(target)
            assert loaded.checkpoint_format == "open_clip"
            assert loaded.cfg.act == ("quick_gelu" if quick else "gelu")
            assert loaded.preprocess.mean == (0.5, 0.5, 0.5) and loaded.preprocess.std == (0.25, 0.25, 0.25)
            _assert_same(model, loaded)


def test_open_clip_without_config_defaults_to_gelu_with_warning(tmp_path: Path) -> None:
    model = _tiny(VIT, act="quick_gelu")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with pytest.warns(UserWarning, match="assuming GELU"):
        guessed = calibclip.create_model(path)
    assert guessed.cfg.act == "gelu"
    assert not torch.allclose(_outputs(guessed)[0], _outputs(model)[0])  # the wrong activation changes outputs
    explicit = calibclip.create_model(path, quick_gelu=True)
    assert explicit.cfg.act == "quick_gelu"
    _assert_same(model, explicit)


def test_safetensors_with_openai_keys(tmp_path: Path, vit: CLIP) -> None:
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    _assert_same(vit, calibclip.create_model(path))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("arch", [VIT, RESNET], ids=["vit", "resnet"])
def test_torchscript_archive_roundtrip(tmp_path: Path, arch: dict) -> None:
    model = _tiny(arch)
    size = arch["image_size"]
    example = (torch.randn(1, 3, size, size), calibclip.tokenize(["a photo"]))
    traced = torch.jit.trace(model, example, check_trace=False)
    path = tmp_path / "ViT-T-16.pt"
    torch.jit.save(traced, path)
    assert detect_format(path) == "torchscript"
    loaded = calibclip.create_model(path)
    assert loaded.checkpoint_format == "torchscript" and loaded.cfg.act == "quick_gelu"
    _assert_same(model, loaded, size=size)


class _Scripted(torch.nn.Module):
    """A scripted module with typed list/dict attributes (pickled with torch.jit._pickle markers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.sizes = [1, 2, 3]  # typed List[int] / Dict[str, float] attributes
        self.names = {"a": 1.0}

    def forward(self, x: torch.Tensor, q: torch.Tensor):  # noqa: ANN201 (TorchScript infers the tuple)
        return self.conv(x), self.attn(q, q, q)[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_scripted_archive_weights_are_read(tmp_path: Path) -> None:
    module = _Scripted()
    torch.jit.save(torch.jit.script(module), tmp_path / "scripted.pt")
    weights = read_torchscript_weights(tmp_path / "scripted.pt")
    expected = module.state_dict()
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_fp16_weights_are_read(tmp_path: Path) -> None:
    """OpenAI's archives store fp16 weights; they load into an fp32 model."""
    model = _tiny(VIT)
    half = _tiny(VIT).half()
    traced = torch.jit.trace(half.visual.conv1, torch.randn(1, 3, 32, 32, dtype=torch.float16))
    torch.jit.save(traced, tmp_path / "conv.pt")
    weights = read_torchscript_weights(tmp_path / "conv.pt")
    assert weights["weight"].dtype == torch.float16
    assert torch.equal(weights["weight"], half.visual.conv1.weight)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "half.pt")
    loaded = calibclip.create_model(tmp_path / "half.pt")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight.half().float())


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickles_are_refused(tmp_path: Path, vit: CLIP) -> None:
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw_pickle.pt"
    raw.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    zipped = tmp_path / "zipped.pth"
    torch.save({"state_dict": vit.state_dict(), "hook": _Evil(marker)}, zipped)
    script = tmp_path / "script.pt"  # looks like a TorchScript archive, data.pkl runs os.system
    with zipfile.ZipFile(script, "w") as z:
        z.writestr("script/code/__torch__.py", "")
        z.writestr("script/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
    for path in (raw, zipped, script):
        with pytest.raises(CheckpointError, match="refused"):
            calibclip.create_model(path)
        assert not marker.exists(), f"{path.name} executed code"


def test_wrong_files_get_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    other = tmp_path / "resnet18.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), other)
    with pytest.raises(CheckpointError, match=r"no CLIP weights recognised. Found: 0.weight \(8, 3, 3, 3\).*expected"):
        load_checkpoint(other)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face"):
        load_checkpoint(empty_dir)
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(bad_st)
    with pytest.raises(ValueError, match="unknown model"):
        calibclip.create_model(tmp_path / "missing.pt")


def test_incomplete_or_mismatched_weights(tmp_path: Path, vit: CLIP) -> None:
    sd = vit.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("visual.transformer.resblocks.1.")}
    partial["visual.transformer.resblocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in partial.items() if k != "ln_final.weight"}, path)
    with pytest.raises(CheckpointError, match="ln_final.weight"):
        load_checkpoint(path)
    torch.save(partial, path)
    with pytest.raises(ValueError, match="unexpected 1 keys"):
        load_checkpoint(path)


def test_registered_names_and_aliases_build_random_models() -> None:
    names = {e.name for e in calibclip.list_models()}
    for name in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"):
        assert name in names
    from calibclip.models.registry import canonical_name

    assert canonical_name("ViT-B-16") == "ViT-B/16" and canonical_name("ViT-L-14-336px") == "ViT-L/14@336px"
    model = calibclip.create_model("ViT-B-32", pretrained=False, image_size=(384, 128))
    assert model.visual.grid == (12, 4) and model.config()["tower"] == "vit"
    assert model.encode_image(torch.randn(1, 3, 384, 128)).shape == (1, 512)
    assert model.config()["preprocess"]["size"] == [384, 128]
