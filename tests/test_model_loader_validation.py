"""Model loader on malformed configs and weights (issue 15 item 9, item 4's checkpoint part, issue 16's
"not a checkpoint (looks like text)"): each is refused with a one-line `CheckpointError`, and a ViT whose MLP is
not 4x its width loads and matches transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import calibclip
from calibclip.cli.main import main
from calibclip.models.checkpoints import CheckpointError, load_checkpoint
from calibclip.models.clip import CLIP

torch.set_num_threads(1)
TOL = 1e-4
TEXTS = ["a photo of a cat", "two dogs playing in the snow!", ""]


def _hf_clip(tmp_path: Path, mlp_mult: int = 4, vocab_size: int = 49408, width: int = 64):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=width,
            intermediate_size=mlp_mult * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=49407,
            bos_token_id=49406,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=mlp_mult * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / f"hf_mlp{mlp_mult}_v{vocab_size}"
    model.save_pretrained(out)
    return model, out


def _features(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hf_clip(tmp_path_factory.mktemp("hf"))[1]


def _copy_with_config(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda c: c["vision_config"].update(num_attention_heads=0), r"vision_config.num_attention_heads is 0"),
        (lambda c: c["text_config"].update(num_attention_heads=0), r"text_config.num_attention_heads is 0"),
        (lambda c: c["text_config"].update(num_attention_heads=-2), r"num_attention_heads is -2"),
        (lambda c: c["vision_config"].update(num_attention_heads=3), r"not divisible by 3 heads"),
        (lambda c: c.update(vision_config=[1, 2]), r"vision_config is a list"),  # was AttributeError
        (lambda c: c.update(vision_config="ViT-B/32"), r"vision_config is a str"),  # was AttributeError
    ],
)
def test_hf_config_errors(hf_dir: Path, tmp_path: Path, edit, expect: str) -> None:
    bad = _copy_with_config(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=expect):
        load_checkpoint(bad)


def test_hf_config_not_json(hf_dir: Path, tmp_path: Path) -> None:
    bad = _copy_with_config(hf_dir, tmp_path / "bad", lambda c: None)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_checkpoint(bad)


def test_vocabulary_smaller_than_tokenizer_refused_at_load(tmp_path: Path) -> None:
    _, path = _hf_clip(tmp_path, vocab_size=1000)  # loaded before, then every text query raised IndexError
    with pytest.raises(CheckpointError, match=r"vocabulary has 1000 tokens.*49407"):
        calibclip.create_model(path)


def test_mlp_not_4x_width_loads_with_parity(tmp_path: Path) -> None:
    """intermediate_size = 2 * hidden_size (was refused: "weights do not fit"): the MLP width comes from the
    weights, and features match transformers (HF directory and OpenAI-named state dict)."""
    hf, path = _hf_clip(tmp_path, mlp_mult=2, width=128)  # 128 // 64 = the 2 heads a state dict implies
    from calibclip.models.checkpoints import hf_to_openai

    sd_path = tmp_path / "openai_keys.pt"
    torch.save(hf_to_openai(hf.state_dict()), sd_path)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    ids = calibclip.tokenize(TEXTS)
    with torch.no_grad():
        ref_img = _features(hf.get_image_features(pixel_values=pixels))
        ref_txt = _features(hf.get_text_features(input_ids=ids))
    for source in (path, sd_path):
        model = calibclip.create_model(source)
        assert isinstance(model, CLIP)
        assert model.cfg.vision_mlp_width == 256 and model.cfg.text_mlp_width == 256
        assert model.visual.transformer.resblocks[0].mlp.c_fc.out_features == 256
        assert (model.encode_image(pixels) - ref_img).abs().max().item() < TOL
        assert (model.encode_text(ids) - ref_txt).abs().max().item() < TOL


def test_mlp_4x_config_unchanged(hf_dir: Path) -> None:
    """The 4x default keeps its config (and so its fingerprint): no new keys for standard CLIPs."""
    model = calibclip.create_model(hf_dir)
    assert "vision_mlp_width" not in model.config() and "text_mlp_width" not in model.config()


def test_mlp_ratio_4_9231_like_bigg(tmp_path: Path) -> None:
    """open_clip's ViT-bigG-14 uses mlp_ratio 4.9231 (width 1664 -> 8192): a non-integer ratio works too."""
    width = 64
    hidden = int(width * 4.9231)  # 315
    from calibclip.models.clip import CLIPConfig

    src = CLIP(
        CLIPConfig(
            embed_dim=32,
            vision_layers=1,
            vision_width=width,
            vision_patch_size=16,
            image_size=(32, 32),
            text_width=width,
            text_layers=1,
            vision_mlp_width=hidden,
            text_mlp_width=hidden,
        )
    )
    path = tmp_path / "bigg_like.pt"
    torch.save(src.state_dict(), path)
    model = calibclip.create_model(path)
    assert model.cfg.vision_mlp_width == hidden == model.cfg.text_mlp_width
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model.encode_image(pixels), src.encode_image(pixels), atol=1e-6)
    assert math.isclose(hidden / width, 4.92, abs_tol=0.01)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_clip_weights_refused(hf_dir: Path, tmp_path: Path, value: float) -> None:
    model = calibclip.create_model(hf_dir)
    state = model.state_dict()
    state["visual.proj"][0, :3] = value
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"NaN or infinite.*visual.proj"):
        calibclip.create_model(path)


def test_non_finite_starter_heads_refused(tmp_path: Path) -> None:
    from calibclip.models.starter import default_weights_path, read_heads, save_heads

    tensors, meta = read_heads(default_weights_path())
    tensors = {k: v.clone() for k, v in tensors.items()}
    key = next(k for k in tensors if k.startswith("image_head.") and tensors[k].is_floating_point())
    tensors[key].view(-1)[0] = float("nan")
    path = tmp_path / "starter.safetensors"
    save_heads(path, tensors, meta)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        read_heads(path)


def test_non_finite_combiner_refused(tmp_path: Path) -> None:
    from calibclip.composed.combiner import Combiner, load_combiner, save_combiner

    comb = Combiner(8, 16, 32)
    with torch.no_grad():
        next(comb.parameters()).view(-1)[0] = float("nan")
    for name in ("c.pt", "c.safetensors"):
        path = save_combiner(tmp_path / name, comb, "fp")
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            load_combiner(path)


@pytest.mark.parametrize("name", ["notes.pt", "notes.safetensors", "README.md"])
def test_text_file_as_checkpoint(tmp_path: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / name
    text.write_text("# My model\nDownload the weights from the project page.\n")
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(looks like text: '# My model'\)"):
        calibclip.create_model(text)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["explain", "--image", str(image), "--model", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint (looks like text" in err[0] and "pickle" not in err[0]
