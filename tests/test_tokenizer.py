"""CLIP tokenizer: OpenAI-compatible ids, truncation keeping EOT, empty captions, and `CLIP.tokenize`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import calibclip
from calibclip.models.clip import CLIP, CLIPConfig
from calibclip.models.tokenizer import EOT_TOKEN, SOT_TOKEN, decode, token_strings, tokenize

CAPTIONS = [
    "a photo of a cat",
    "Two dogs, playing in the snow!!",
    "A man's red-and-white bicycle (vintage) leaning on a wall.",
    "café naïve résumé 東京 🙂",
    "   extra   spaces\tand\nnewlines  ",
]


def test_shape_padding_and_special_tokens() -> None:
    ids = tokenize(CAPTIONS)
    assert ids.dtype == torch.long and ids.shape == (len(CAPTIONS), 77)
    assert (ids[:, 0] == SOT_TOKEN).all()
    eot = ids.argmax(-1)
    assert (ids[torch.arange(len(CAPTIONS)), eot] == EOT_TOKEN).all()
    for row, e in zip(ids, eot.tolist()):
        assert (row[e + 1 :] == 0).all()
    assert tokenize("a photo of a cat").shape == (1, 77)
    assert torch.equal(calibclip.tokenize(CAPTIONS), ids)
    assert tokenize([]).shape == (0, 77)
    assert tokenize(["x"], context_length=16).shape == (1, 16)


def test_long_caption_keeps_eot_last_and_strict_mode_raises() -> None:
    caption = " ".join(f"word{i % 50}" for i in range(500))
    ids = tokenize(caption)
    assert ids.shape == (1, 77) and ids[0, 0] == SOT_TOKEN and ids[0, -1] == EOT_TOKEN
    assert (ids[0, 1:-1] != 0).all() and (ids[0, 1:-1] != EOT_TOKEN).all()
    with pytest.raises(ValueError, match="too long"):
        tokenize(caption, truncate=False)


def test_empty_caption() -> None:
    ids = tokenize("")
    assert ids[0, :2].tolist() == [SOT_TOKEN, EOT_TOKEN] and (ids[0, 2:] == 0).all()


def test_decode_and_token_strings() -> None:
    assert decode(tokenize("a photo of a cat")[0].tolist()).strip() == "a photo of a cat"
    strings = token_strings(tokenize("a dog")[0, :4].tolist())
    assert strings == ["<sot>", "a", "dog", "<eot>"]


def _openai_simple_tokenizer():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    mod_spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    sys.modules.setdefault("openai_clip_simple_tokenizer", module)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.SimpleTokenizer()


def test_matches_openai_reference_tokenizer() -> None:
    ref = _openai_simple_tokenizer()
    ids = tokenize(CAPTIONS)
    for caption, row in zip(CAPTIONS, ids):
        expected = [SOT_TOKEN, *ref.encode(caption), EOT_TOKEN]
        assert row[: len(expected)].tolist() == expected, caption


def test_clip_tokenize_gives_trimmed_text_batch() -> None:
    model = CLIP(
        CLIPConfig(
            embed_dim=16,
            vision_layers=1,
            vision_width=64,
            vision_patch_size=16,
            image_size=32,
            text_width=64,
            text_layers=1,
        )
    )
    batch = model.tokenize(["a photo of a cat", "", "dog"])
    assert batch.input_ids.shape == (3, 7)  # SOT + 5 words + EOT
    assert batch.attention_mask.tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
    assert batch.special_mask[:, 0].all()
    assert batch.special_mask.sum().item() == 6  # SOT and EOT of each row
    assert batch.special_mask[1, 1] and batch.special_mask[2, 2] and batch.special_mask[0, 6]
    assert batch.texts == ["a photo of a cat", "", "dog"]
    long = model.tokenize(["word " * 500])
    assert long.input_ids.shape == (1, 77) and long.input_ids[0, -1] == EOT_TOKEN
    # dropping a word keeps SOT/EOT and the result stays encodable
    drop = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    drop[:, 1] = True
    dropped = batch.drop_tokens(drop)
    assert dropped.input_ids[0].tolist()[:1] == [SOT_TOKEN] and dropped.input_ids.shape[1] == 6
    assert model.encode_text(dropped).shape == (3, 16)
