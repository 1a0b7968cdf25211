"""Parity of calibclip's CLIP against independent implementations (fp32, max |diff| < 1e-4).

ViT: a random small `transformers.CLIPModel`, saved (a) as a Hugging Face directory and (b) converted
(by code in this file) to OpenAI key names as a plain state dict, both loaded with
`calibclip.create_model(path)`. ResNet and ViT: OpenAI's own ``clip/model.py`` (package
``openai-clip``, loaded by file path so its torchvision-importing package ``__init__`` never runs).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import calibclip
from calibclip.models.clip import CLIP

torch.set_num_threads(1)
TOL = 1e-4
TEXTS = ["a photo of a cat", "two dogs playing in the snow!", "", "a man riding a horse on the beach at sunset"]


def _hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=49407,
            bos_token_id=49406,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            hidden_act="quick_gelu",
        ),
        projection_dim=64,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # move every weight off its structured init (LN = 1/0, biases = 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _features(out: object) -> torch.Tensor:
    """transformers < 5 returns a tensor, >= 5 an output object whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def hf_to_openai_reference(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent HF -> OpenAI key conversion (written here, not imported from calibclip)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        if "position_ids" in key:
            continue
        parts = key.split(".")
        if key.startswith(("vision_model.encoder.layers.", "text_model.encoder.layers.")):
            base = "visual.transformer" if key.startswith("vision") else "transformer"
            i, rest = parts[3], ".".join(parts[4:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if rest.split(".")[1] != "q_proj":
                    continue
                kind = rest.split(".")[-1]
                prefix = ".".join(parts[:4])
                fused = torch.cat([hf[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{base}.resblocks.{i}.attn.in_proj_{kind}"] = fused
                continue
            rest = (
                rest.replace("self_attn.out_proj", "attn.out_proj")
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
            )
            out[f"{base}.resblocks.{i}.{rest}"] = t
            continue
        mapping = {
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "logit_scale": "logit_scale",
        }
        if key in mapping:
            out[mapping[key]] = t
        elif key == "visual_projection.weight":
            out["visual.proj"] = t.t().contiguous()
        elif key == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
        else:
            raise AssertionError(f"unmapped HF key {key}")
    return out


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory: pytest.TempPathFactory):
    model = _hf_model()
    root = tmp_path_factory.mktemp("hfclip")
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    sd_path = root / "clip_openai_keys.pt"
    torch.save(hf_to_openai_reference(model.state_dict()), sd_path)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 64, 64)
    ids = calibclip.tokenize(TEXTS)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(input_ids=ids))
    return {"model": model, "hf_dir": hf_dir, "sd_path": sd_path, "pixels": pixels, "ids": ids, "img": img, "txt": txt}


@pytest.mark.parametrize("which", ["hf_dir", "sd_path"])
def test_vit_parity_with_transformers(hf_setup: dict, which: str) -> None:
    model = calibclip.create_model(hf_setup[which])
    assert isinstance(model, CLIP)
    assert model.cfg.act == "quick_gelu" and model.cfg.vision_heads == 2 and model.cfg.text_heads == 2
    img = model.encode_image(hf_setup["pixels"])
    txt = model.encode_text(hf_setup["ids"])
    assert (img - hf_setup["img"]).abs().max().item() < TOL
    assert (txt - hf_setup["txt"]).abs().max().item() < TOL
    batch = model.tokenize(TEXTS)  # TextBatch path equals the LongTensor path
    assert torch.equal(model.encode_text(batch), txt)
    assert torch.allclose(model.logit_scale, hf_setup["model"].logit_scale)


def test_hf_gelu_config_is_honoured(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=1,
            hidden_act="gelu",
            eos_token_id=49407,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=32,
            patch_size=16,
            hidden_act="gelu",
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = calibclip.create_model(tmp_path)
    assert model.cfg.act == "gelu"
    pixels, ids = torch.randn(2, 3, 32, 32), calibclip.tokenize(TEXTS[:2])
    with torch.no_grad():
        ref_i = _features(hf.get_image_features(pixel_values=pixels))
        ref_t = _features(hf.get_text_features(input_ids=ids))
    assert (model.encode_image(pixels) - ref_i).abs().max() < TOL
    assert (model.encode_text(ids) - ref_t).abs().max() < TOL


def test_non_square_input_matches_hf_interpolation(hf_setup: dict) -> None:
    """384x128 (person re-id) with patch 16: grid 24x8, positional embedding interpolated bicubically.
    Upsampling both axes, so it must equal HF's ``interpolate_pos_encoding=True``."""
    model = calibclip.create_model(hf_setup["sd_path"], image_size=(384, 128))
    assert model.visual.grid == (24, 8)
    assert model.visual.positional_embedding.shape == (24 * 8 + 1, 128)
    assert model.preprocess.size == (384, 128) and model.preprocess.mode == "resize"
    pixels = torch.randn(2, 3, 384, 128)
    ours = model.encode_image(pixels)
    assert ours.shape == (2, 64)
    with torch.no_grad():
        ref = _features(hf_setup["model"].get_image_features(pixel_values=pixels, interpolate_pos_encoding=True))
    assert (ours - ref).abs().max().item() < TOL
    view = model.image_tokens(pixels)
    assert view.grid == (24, 8) and view.tokens.shape == (2, 192, 64)
    # interpolation itself: class token kept, grid resized with bicubic interpolation
    src = torch.load(hf_setup["sd_path"], weights_only=True)["visual.positional_embedding"]
    grid = src[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    pos = model.visual.positional_embedding.detach()
    assert torch.equal(pos[0], src[0])
    assert torch.allclose(pos[1:], expected.reshape(192, -1), atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        model.encode_image(torch.randn(1, 3, 64, 64))


def test_bf16_close_to_fp32(hf_setup: dict) -> None:
    fp32 = calibclip.create_model(hf_setup["sd_path"])
    bf16 = calibclip.create_model(hf_setup["sd_path"], precision="bf16")
    assert bf16.dtype == torch.bfloat16
    for a, b in (
        (fp32.encode_image(hf_setup["pixels"]), bf16.encode_image(hf_setup["pixels"])),
        (fp32.encode_text(hf_setup["ids"]), bf16.encode_text(hf_setup["ids"])),
    ):
        assert b.dtype == torch.bfloat16
        assert F.cosine_similarity(a, b.float(), dim=-1).min().item() > 0.99
    view = bf16.text_tokens(bf16.tokenize(TEXTS))
    assert view.tokens.dtype == torch.bfloat16 and torch.equal(view.pooled, bf16.encode_text(bf16.tokenize(TEXTS)))


def test_text_trimming_is_exact(hf_setup: dict) -> None:
    model = calibclip.create_model(hf_setup["sd_path"])
    long_caption = " ".join(["word"] * 500)
    ids = calibclip.tokenize([TEXTS[0], long_caption])
    assert ids[1, -1].item() == 49407  # truncation keeps EOT last: this batch is not trimmed (77 tokens)
    untrimmed = model.encode_text(ids)
    trimmed = model.encode_text(ids[:1])  # alone, trimmed to 7 tokens
    assert model.tokenize(TEXTS[:1]).input_ids.shape[1] == 7
    # exact in exact arithmetic; the matmul blocking differs with the length, so compare at fp32 rounding level
    assert (untrimmed[0] - trimmed[0]).abs().max().item() < 1e-5


def test_token_views_pool_exactly(hf_setup: dict) -> None:
    model = calibclip.create_model(hf_setup["hf_dir"])
    view = model.image_tokens(hf_setup["pixels"])
    assert torch.equal(view.pooled, model.encode_image(hf_setup["pixels"]))
    assert view.tokens.shape == (3, 16, 64) and view.grid == (4, 4)
    assert torch.allclose(view.attention.sum(-1), torch.ones(3), atol=1e-5) and (view.attention >= 0).all()
    batch = model.tokenize(TEXTS)
    tview = model.text_tokens(batch)
    assert torch.equal(tview.pooled, model.encode_text(batch))
    assert tview.tokens.shape[:2] == batch.input_ids.shape == tview.attention.shape
    assert torch.allclose(tview.attention.sum(-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (tview.attention[batch.attention_mask == 0] == 0).all()
    eot = batch.input_ids.argmax(-1)
    assert torch.allclose(tview.tokens[torch.arange(len(TEXTS)), eot], tview.pooled, atol=1e-5)
    # the pooled image feature is the projected CLS token; tokens are the projected patches
    assert torch.equal(tview.batch.special_mask[:, 0], torch.ones(len(TEXTS), dtype=torch.bool))


def _openai_clip_module():
    """OpenAI's clip/model.py loaded by path (the package __init__ imports torchvision)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed (pip install -e '.[test]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
    if not path.exists():
        pytest.skip(f"{path} not found: the installed 'clip' package is not openai-clip")
    mod_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    sys.modules.setdefault("openai_clip_model", module)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize(
    "arch",
    [
        dict(image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16, vision_patch_size=None),
        dict(image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16),
    ],
    ids=["resnet", "vit"],
)
def test_parity_with_openai_reference(tmp_path: Path, arch: dict) -> None:
    ref_mod = _openai_clip_module()
    torch.manual_seed(0)
    ref = ref_mod.CLIP(
        embed_dim=64,
        context_length=77,
        vocab_size=49408,
        transformer_width=128,
        transformer_heads=2,
        transformer_layers=2,
        **arch,
    ).eval()
    _randomise(ref)
    path = tmp_path / "openai_ref.pt"
    torch.save(ref.state_dict(), path)
    model = calibclip.create_model(path)
    pixels = torch.randn(2, 3, 64, 64)
    ids = calibclip.tokenize(TEXTS)
    with torch.no_grad():
        ref_img, ref_txt = ref.encode_image(pixels), ref.encode_text(ids)
    assert (model.encode_image(pixels) - ref_img).abs().max().item() < TOL
    assert (model.encode_text(ids) - ref_txt).abs().max().item() < TOL
    view = model.image_tokens(pixels)
    assert torch.equal(view.pooled, model.encode_image(pixels))
    assert torch.allclose(view.attention.sum(-1), torch.ones(2), atol=1e-5)
    assert view.tokens.shape == (2, view.grid[0] * view.grid[1], 64)


def test_openai_to_hf_inverts_hf_to_openai(hf_setup: dict) -> None:
    from calibclip.models.checkpoints import hf_to_openai, openai_to_hf

    hf_sd = {k: v for k, v in hf_setup["model"].state_dict().items() if "position_ids" not in k}
    ours = hf_to_openai(hf_sd)
    assert set(ours) == set(hf_to_openai_reference(hf_sd))
    for k, v in hf_to_openai_reference(hf_sd).items():
        assert torch.equal(ours[k], v), k
    back = openai_to_hf(ours)
    assert set(back) == set(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_encoder_encode_convenience(hf_setup: dict, tmp_path: Path) -> None:
    """`Encoder.encode` (paths / PIL in, float32 numpy out) agrees with the tensor API."""
    from PIL import Image

    model = calibclip.create_model(hf_setup["hf_dir"])
    texts = ["a dog", "a photo of a cat on a sofa", ""]
    feats = model.encode(texts=texts, batch_size=2)
    assert feats.shape == (3, 64) and feats.dtype.name == "float32"
    assert torch.allclose(torch.from_numpy(feats), model.encode_text(calibclip.tokenize(texts)), atol=1e-5)
    paths = []
    for i, colour in enumerate(((255, 0, 0), (0, 128, 255))):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (80, 60), colour).save(paths[-1])
    img = model.encode(images=paths, normalize=True)
    ref = model.encode_image(torch.stack([model.preprocess(p) for p in paths]))
    assert torch.allclose(torch.from_numpy(img), F.normalize(ref, dim=-1), atol=1e-5)


def test_hf_dir_with_pytorch_model_bin(hf_setup: dict, tmp_path: Path) -> None:
    import shutil

    shutil.copy(hf_setup["hf_dir"] / "config.json", tmp_path / "config.json")
    torch.save(hf_setup["model"].state_dict(), tmp_path / "pytorch_model.bin")
    model = calibclip.create_model(tmp_path)
    assert model.checkpoint_format == "hf"
    assert (model.encode_image(hf_setup["pixels"]) - hf_setup["img"]).abs().max().item() < TOL
