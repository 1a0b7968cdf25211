"""The built-in `starter` encoder: offline loading, API shapes, token views, exactness."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import torch

from calibclip.models import starter as starter_mod
from calibclip.models.starter import Starter, area_matrix, default_weights_path

torch.set_num_threads(1)

CAPTIONS = ["A black dog runs through the tall grass .", "two children", "A man in a red jacket climbs a rock wall ."]


def _no_network(*args, **kwargs):
    raise OSError("network access attempted while loading the starter model")


@pytest.fixture(scope="module")
def loaded() -> tuple[Starter, float]:
    """The registry's `starter`, created with sockets disabled in-process; returns (model, seconds)."""
    from calibclip.models.registry import create_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "socket", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        t0 = time.perf_counter()
        model = create_model("starter")
        seconds = time.perf_counter() - t0
    return model, seconds


@pytest.fixture(scope="module")
def model(loaded) -> Starter:
    return loaded[0]


@pytest.fixture(scope="module")
def pixels(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, model.image_size, model.image_size, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def image_embeddings(model, pixels) -> torch.Tensor:
    return model.encode_image(pixels)


def test_create_model_offline(loaded):
    # Load time is measured by bench/bench_cold_start.py, not asserted here (no timed assertions in tests).
    model, _seconds = loaded
    assert isinstance(model, Starter)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    cfg = model.config()
    json.dumps(cfg)
    assert cfg["backbones"] == list(model.backbones) and cfg["embed_dim"] == model.embed_dim


def test_registry_lists_starter_as_builtin():
    from calibclip.models.registry import list_models

    entry = {e.name: e for e in list_models()}["starter"]
    assert entry.pretrained == "built-in"


def test_committed_weights_have_model_card_numbers():
    tensors, meta = starter_mod.read_heads(default_weights_path())
    dev = json.loads(meta["dev_metrics"])
    assert dev["t2i_r1"] >= 27.0
    card = (default_weights_path().parent / "STARTER_MODEL_CARD.md").read_text()
    assert f"{dev['t2i_r1']:.1f}" in card and meta["command"] in card


def test_encode_shapes_and_determinism(model, pixels, image_embeddings):
    img = image_embeddings
    txt = model.encode_text(model.tokenize(CAPTIONS))
    assert img.shape == (2, model.embed_dim) and txt.shape == (3, model.embed_dim)
    assert img.dtype == torch.float32 and torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert torch.equal(img, model.encode_image(pixels))
    assert torch.equal(txt, model.encode_text(model.tokenize(CAPTIONS)))


def test_batch_independence(model, pixels, image_embeddings):
    batch = image_embeddings
    alone = model.encode_image(pixels[1:])
    torch.testing.assert_close(alone, batch[1:], atol=1e-5, rtol=1e-5)
    tb = model.tokenize(CAPTIONS)  # padded to the longest caption
    single = torch.cat([model.encode_text(model.tokenize([c])) for c in CAPTIONS])
    torch.testing.assert_close(single, model.encode_text(tb), atol=1e-5, rtol=1e-5)


def test_image_token_view_reproduces_pooled(model, pixels, image_embeddings):
    view = model.image_tokens(pixels)
    assert view.grid == (7, 7) and view.tokens.shape == (2, 49, model.embed_dim)
    assert torch.equal(view.pooled, image_embeddings)
    assert (view.attention >= 0).all()
    torch.testing.assert_close(view.attention.sum(1), torch.ones(2), atol=1e-5, rtol=0)
    weighted = (view.attention[..., None] * view.tokens).sum(1)
    torch.testing.assert_close(weighted, view.pooled, atol=1e-4, rtol=1e-4)
    assert view.attention.std(1).min() > 0  # not uniform: cells differ in activation mass


def test_text_token_view(model):
    tb = model.tokenize(CAPTIONS)
    view = model.text_tokens(tb)
    assert torch.equal(view.pooled, model.encode_text(tb))
    mask = tb.attention_mask.bool()
    assert view.tokens.shape == (*tb.input_ids.shape, model.embed_dim)
    assert (view.attention[~mask] == 0).all() and (view.tokens[~mask] == 0).all()
    torch.testing.assert_close(view.attention.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    # the head is affine and MiniLM mean-pools: the mean of the real tokens is the pooled embedding
    mean = view.tokens.sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(mean, view.pooled, atol=1e-4, rtol=1e-4)


def test_tokenize_special_tokens_and_truncation(model):
    tb = model.tokenize(["a dog", "word " * 400])
    assert tb.input_ids.shape == (2, starter_mod.TEXT_MAX_LENGTH)
    assert tb.input_ids[0, 0] == 101 and tb.input_ids[0, 3] == 102 and tb.attention_mask[0].sum() == 4
    assert tb.special_mask[0].tolist()[:4] == [True, False, False, True] and not tb.special_mask[0, 4:].any()
    assert tb.input_ids[1, -1] == 102 and tb.special_mask[1, -1]


def test_batch_from_ids_matches_tokenize(model):
    """The declared `Encoder.batch_from_ids` hook: bare WordPiece ids give the tokenizer's masks, and
    `CalibCLIP` accepts them (it used to mark CLIP's start/end ids as special for every encoder)."""
    from calibclip.calibration import CalibCLIP

    tb = model.tokenize(CAPTIONS)
    batch = model.batch_from_ids(tb.input_ids)
    assert torch.equal(batch.attention_mask, tb.attention_mask) and torch.equal(batch.special_mask, tb.special_mask)
    wrapped = CalibCLIP(model)
    assert torch.equal(wrapped.text_features(tb.input_ids)["calibrated"], wrapped.text_features(tb)["calibrated"])


def test_minilm_matches_transformers():
    """The MiniLM implementation equals transformers' BertModel on the package's weights (the v1 starter
    keeps them frozen; v2 fine-tunes its top layers, so it is compared on v1)."""
    from calibclip.models.registry import create_model

    transformers = pytest.importorskip("transformers")
    model = create_model("starter-v1")
    ref = transformers.BertModel.from_pretrained(
        str(starter_mod.minilm_dir()), local_files_only=True, attn_implementation="eager"
    ).eval()
    tb = model.tokenize(CAPTIONS)
    with torch.inference_mode():
        out = ref(input_ids=tb.input_ids, attention_mask=tb.attention_mask, output_attentions=True)
        hidden, probs = model.text_tower(tb.input_ids, tb.attention_mask)
    mask = tb.attention_mask.bool()
    torch.testing.assert_close(hidden[mask], out.last_hidden_state[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(probs, out.attentions[-1], atol=1e-5, rtol=1e-4)


def test_folded_channels_last_tower_matches_plain_backbone(pixels):
    from calibclip.models.registry import create_model

    model = create_model("starter-v1")  # frozen towers (v2 fine-tunes the last block)
    plain = starter_mod.StarterImageTower(model.backbones, fold=False, channels_last=False)
    with torch.inference_mode():
        torch.testing.assert_close(model.image_tower(pixels), plain(pixels), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("n_in", [7, 9, 5])
def test_area_matrix_preserves_mean(n_in):
    a = area_matrix(n_in, 7)
    x = torch.rand(4, n_in, n_in, dtype=torch.float32)
    y = torch.einsum("ih,bhw,jw->bij", a, x, a)
    torch.testing.assert_close(y.mean((1, 2)), x.mean((1, 2)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.sum(1), torch.ones(7))
    if n_in == 7:
        torch.testing.assert_close(a, torch.eye(7))


def test_missing_weights_file_is_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-starter"):
        Starter(weights=tmp_path / "nope.safetensors")


def test_encode_convenience_on_pil_images(model):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (120, 90 + 40 * i, 3), dtype=np.uint8)) for i in range(2)]
    feats = model.encode(images=images, batch_size=2, normalize=True)
    assert feats.shape == (2, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_committed_heads_reproduce_dev_numbers(model, flickr8k_root):
    """Re-encode the Flickr8k dev split with the full model: the model card's numbers hold."""
    from calibclip.data.captions import load_flickr8k
    from calibclip.models.starter_train import recall_at_k

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_flickr8k(flickr8k_root, "dev")
    img = torch.from_numpy(model.encode(images=ds.images, batch_size=16, normalize=True))
    txt = torch.from_numpy(model.encode(texts=ds.captions, batch_size=128, normalize=True))
    metrics = recall_at_k(txt @ img.t(), torch.as_tensor(ds.caption_image))
    expected = json.loads(model.meta["dev_metrics"])
    for key in ("t2i_r1", "t2i_r5", "i2t_r1"):
        assert abs(metrics[key] - expected[key]) < 0.5, (key, metrics[key], expected[key])


def test_starter_v1_stays_loadable_by_name():
    """v2 is the default; ``starter-v1`` loads the heads-only v1 file with its old fingerprint, so the
    Combiner trained on v1 still applies to it and not to v2 (which falls back to the sum)."""
    from calibclip.composed.baselines import packaged_combiner_for
    from calibclip.models.registry import create_model, list_models

    entries = {e.name: e for e in list_models()}
    assert entries["starter-v1"].pretrained == "built-in"
    v1, v2 = create_model("starter-v1"), create_model("starter")
    _, meta1 = starter_mod.read_heads(v1.weights_path)
    _, meta2 = starter_mod.read_heads(v2.weights_path)
    assert meta1["format"] == starter_mod.HEADS_FORMAT and meta2["format"] == starter_mod.TOWER_FORMAT
    assert v1.fingerprint() == "starter-a8aa77b9e3bbf1cf" != v2.fingerprint()
    assert json.loads(meta2["dev_metrics"])["t2i_r1"] > json.loads(meta1["dev_metrics"])["t2i_r1"]
    assert packaged_combiner_for(v1) is not None and packaged_combiner_for(v2) is None
