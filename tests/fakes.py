"""The test suite's shared fakes: small deterministic `Encoder`s with exactly known token views,
tiny generated datasets in the official layouts, and `register_fake_model` to put a fake into
the model table for the CLI. Imported as ``fakes`` (pytest ``pythonpath = ["tests"]``).

- `TokenEncoder` (name ``fake``): constructed attention maps and a fixed vocabulary (calibration).
- `HashEncoder` (name ``fake``): 8x8 pixel projection and hashed words (composed retrieval).
- `ColorEncoder` (name ``color-test``): image = (upper, lower) colour, caption = colour words (evaluation).
- `PhotoEncoder` (name ``fake-test``): 4x4 colour grid of real photos; optional per-batch delay (indexing).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from calibclip.data.transforms import ImageTransform
from calibclip.models import registry
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens


def register_fake_model(
    monkeypatch: pytest.MonkeyPatch, name: str, factory: Callable[..., Encoder], pretrained: str = "random"
) -> str:
    """Register ``factory`` as model ``name`` for one test (undone afterwards); returns ``name``."""
    registry.list_models()  # load the table first so the test's entry is added to a complete table
    monkeypatch.setitem(registry._REGISTRY, name, registry.ModelEntry(name, factory, "test-only fake", pretrained))
    return name


# --- calibration: TokenEncoder ------------------------------------------------------------------
SOT, EOT, PAD = 1, 2, 0
VOCAB = ["a", "man", "woman", "with", "red", "blue", "backpack", "dog", "runs", "on", "the", "grass", "hat", "in"]
#: pooling-token attention mass of each word (the EOT->token attention is proportional to it)
SALIENCE = {"man": 8.0, "woman": 8.0, "dog": 8.0, "a": 0.5, "the": 0.5, "with": 0.6, "on": 0.6, "in": 0.6}


class TokenEncoder(Encoder):
    """Images: ``[B, 3, 4h, 4w]`` pixels are average-pooled 4x4 into an ``h x w`` token grid; channel 0
    (clamped at 0, plus 1e-3) is each token's attention mass, tokens are ``cell @ proj`` and
    ``pooled = sum_i a_i token_i`` (attention pooling). Texts: a fixed vocabulary; attention from
    EOT proportional to `SALIENCE` (SOT gets a large mass on purpose: special tokens must never
    be masked); ``pooled = sum_j a_j emb_j`` over real tokens only (padding-exact)."""

    name = "fake"
    pad_id = PAD

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = dim
        self.proj = nn.Parameter(torch.randn(3, dim, generator=g), requires_grad=False)
        self.emb = nn.Parameter(torch.randn(len(VOCAB) + 3, dim, generator=g), requires_grad=False)
        sal = torch.ones(len(VOCAB) + 3)
        sal[SOT] = 20.0
        sal[EOT] = 1.0
        for w, s in SALIENCE.items():
            sal[VOCAB.index(w) + 3] = s
        self.register_buffer("salience", sal)
        self.preprocess = ImageTransform(size=(24, 24), mode="resize", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        rows = [[SOT] + [VOCAB.index(w) + 3 for w in t.lower().split()] + [EOT] for t in texts]
        length = max((len(r) for r in rows), default=2)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        mask = (ids != PAD).long()
        return TextBatch(ids, mask, (ids == SOT) | (ids == EOT), list(texts))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Optional hook used by explanations."""
        names = {SOT: "<sot>", EOT: "<eot>", PAD: ""}
        return [names.get(int(i)) or VOCAB[int(i) - 3] for i in ids]

    def text_tokens(self, text: TextBatch) -> TextTokens:
        mask = text.attention_mask.bool()
        mass = torch.where(mask, self.salience[text.input_ids], torch.zeros(()))
        att = mass / mass.sum(1, keepdim=True)
        tokens = self.emb[text.input_ids] * mask[..., None]
        pooled = torch.einsum("bl,bld->bd", att, tokens)
        return TextTokens(pooled=pooled, tokens=tokens, attention=att, batch=text)

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).pooled  # type: ignore[arg-type]

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        cells = F.avg_pool2d(pixels.float(), 4)
        h, w = cells.shape[-2:]
        flat = cells.flatten(2).transpose(1, 2)  # [B, N, 3]
        mass = flat[..., 0].clamp(min=0) + 1e-3
        att = mass / mass.sum(1, keepdim=True)
        tokens = flat @ self.proj
        return ImageTokens(pooled=torch.einsum("bn,bnd->bd", att, tokens), tokens=tokens, attention=att, grid=(h, w))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(pixels).pooled

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.embed_dim, "vision_layers": 1, "text_layers": 1}


def pixels_from_mass(mass: np.ndarray, features: np.ndarray | None = None) -> torch.Tensor:
    """Pixels whose fake token grid has attention mass ``mass [h, w]`` (channel 0) and the given
    other channels ``features [2, h, w]`` (default: a fixed pattern)."""
    h, w = mass.shape
    if features is None:
        features = np.stack([np.arange(h * w).reshape(h, w) % 5, np.arange(h * w).reshape(h, w) % 3]).astype(float)
    cells = np.concatenate([mass[None], features], 0)
    return torch.as_tensor(np.kron(cells, np.ones((4, 4))), dtype=torch.float32)


# --- composed retrieval: HashEncoder -------------------------------------------------------------
HASH_VOCAB = 1024


class HashEncoder(Encoder):
    """8x8 pixels -> fixed random projection; texts -> mean of hashed word embeddings."""

    name = "fake"

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        self.embed_dim = dim
        self.preprocess = ImageTransform(size=(8, 8), mode="resize", mean=(0.5,) * 3, std=(0.5,) * 3)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("image_proj", torch.randn(3 * 64, dim, generator=g) / 8.0)
        self.register_buffer("word_emb", torch.randn(HASH_VOCAB, dim, generator=g))

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        ids = [[zlib.crc32(w.encode()) % (HASH_VOCAB - 1) + 1 for w in t.lower().split()] or [1] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
        mask = (input_ids > 0).long()
        return TextBatch(input_ids, mask, torch.zeros_like(mask, dtype=torch.bool), list(texts))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1).float() @ self.image_proj

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        batch = text if isinstance(text, TextBatch) else TextBatch(text, (text > 0).long(), (text < 0), [])
        emb = self.word_emb[batch.input_ids] * batch.attention_mask[..., None]
        return emb.sum(1) / batch.attention_mask.sum(1, keepdim=True).clamp(min=1)

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        pooled = self.encode_image(pixels)
        return ImageTokens(pooled, pooled[:, None], torch.ones(len(pooled), 1), (1, 1))

    def text_tokens(self, text: TextBatch) -> TextTokens:
        emb = self.word_emb[text.input_ids] * text.attention_mask[..., None]
        att = text.attention_mask.float() / text.attention_mask.sum(1, keepdim=True).clamp(min=1)
        return TextTokens(self.encode_text(text), emb, att, text)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.embed_dim, "preprocess": self.preprocess.describe()}


# --- evaluation: ColorEncoder and tiny datasets ---------------------------------------------------
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
NAMES = list(COLORS)
START, END, WORD = 11, 12, 10


class ColorEncoder(Encoder):
    """Tiny deterministic encoder: an image is (upper colour, lower colour), a caption is its
    first and second colour words. Token views are exact (pooled = attention-weighted tokens)."""

    name = "color-test"
    embed_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(6))
        self.register_buffer("table", torch.tensor([COLORS[n] for n in NAMES], dtype=torch.float32) / 127.5 - 1)
        self.preprocess = ImageTransform(size=(16, 8), mode="resize", mean=(0.5,) * 3, std=(0.5,) * 3)
        self.calls = {"image": 0, "text": 0}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        rows = [[START, *[NAMES.index(w) + 1 if w in COLORS else WORD for w in t.lower().split()], END] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = (ids != 0).long()
        return TextBatch(ids, mask, (ids == START) | (ids == END), list(texts))

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        self.calls["image"] += len(pixels)
        h = pixels.shape[2] // 2
        top, bottom = pixels[:, :, :h].mean((2, 3)), pixels[:, :, h:].mean((2, 3))
        zeros = torch.zeros_like(top)
        tokens = self.proj(torch.stack([torch.cat([top, zeros], 1), torch.cat([zeros, bottom], 1)], 1)) * 2
        attention = torch.full(tokens.shape[:2], 0.5, dtype=tokens.dtype, device=tokens.device)
        return ImageTokens((attention[..., None] * tokens).sum(1), tokens, attention, (2, 1))

    def text_tokens(self, text: TextBatch) -> TextTokens:
        self.calls["text"] += len(text)
        ids = text.input_ids
        is_colour = (ids >= 1) & (ids <= len(NAMES))
        slot = torch.cumsum(is_colour.long(), 1)
        rgb = self.table[(ids - 1).clamp(0, len(NAMES) - 1)] * is_colour[..., None]
        vec = torch.cat([rgb * (slot == 1)[..., None], rgb * (slot == 2)[..., None]], -1)
        tokens = self.proj(vec)
        weight = (is_colour & (slot <= 2)).float() + 0.01 * text.attention_mask.float()
        attention = weight / weight.sum(1, keepdim=True)
        pooled = (tokens * (is_colour & (slot <= 2))[..., None]).sum(1) + 1e-3 * attention.sum(1, keepdim=True)
        return TextTokens(pooled, tokens, attention, text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(pixels).pooled

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).pooled  # type: ignore[arg-type]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "preprocess": self.preprocess.describe()}


def save_person_image(path: Path, top: str, bottom: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (16, 32), COLORS[top])
    img.paste(Image.new("RGB", (16, 16), COLORS[bottom]), (0, 16))
    img.save(path)


#: person id -> (upper, lower) colours; ids 5 and 6 look the same (hard negatives).
PEOPLE = {
    1: ("red", "blue"),
    2: ("green", "black"),
    3: ("yellow", "white"),
    4: ("cyan", "red"),
    5: ("magenta", "green"),
    6: ("magenta", "green"),
    7: ("blue", "yellow"),
}


def make_person_dataset(root: Path, fmt: str, images_per_id: int = 2, test_only: bool = False) -> Path:
    """A tiny dataset in the official format of ``fmt`` (cuhkpedes | icfgpedes | rstpreid)."""
    ann_name, path_key = {
        "cuhkpedes": ("reid_raw.json", "file_path"),
        "icfgpedes": ("ICFG-PEDES.json", "file_path"),
        "rstpreid": ("data_captions.json", "img_path"),
    }[fmt]
    entries = []
    for pid, (top, bottom) in PEOPLE.items():
        for k in range(images_per_id):
            split = "test" if test_only or pid > 2 else "train"
            rel = f"cam{k}/{pid:04d}_{k}.png" if fmt != "rstpreid" else f"{pid:04d}_c{k}.png"
            save_person_image(root / "imgs" / rel, top, bottom)
            caps = [f"a person with a {top} shirt and {bottom} trousers", f"{top} jacket over {bottom} pants"]
            entries.append({"id": pid, "split": split, "captions": caps, path_key: rel})
    (root / ann_name).write_text(json.dumps(entries))
    return root


def make_flickr8k(root: Path, n_images: int = 6) -> Path:
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k_text").mkdir()
    tokens, names = [], []
    for i in range(n_images):
        top, bottom = NAMES[i % 8], NAMES[(i * 3 + 1) % 8]
        name = f"{1000 + i}_abc.jpg"
        names.append(name)
        save_person_image(root / "Flicker8k_Dataset" / name, top, bottom)
        tokens += [f"{name}#0\tA {top} thing above a {bottom} thing .", f"{name}#1\t{top} and {bottom}"]
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    for split in ("train", "dev", "test"):
        (root / "Flickr8k_text" / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    return root


# --- indexing: PhotoEncoder ---------------------------------------------------------------------
class PhotoEncoder(Encoder):
    """Deterministic toy dual encoder: image tokens are the 4x4 grid of mean colours of a 32x32
    preprocessed image projected to ``dim``; text tokens are hashed word embeddings. ``delay``
    (seconds per image batch) makes indexing slow enough to be killed mid-run."""

    name = "fake-test"

    def __init__(self, dim: int = 16, seed: int = 0, delay: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = dim
        self.seed = seed
        self.delay = delay
        self.colour = nn.Parameter(torch.randn(3, dim, generator=g), requires_grad=False)
        self.position = nn.Parameter(torch.randn(16, dim, generator=g) * 0.3, requires_grad=False)
        self.words = nn.Parameter(torch.randn(1000, dim, generator=g), requires_grad=False)
        self.preprocess = ImageTransform(size=(32, 32))

    def config(self) -> dict[str, Any]:
        return {"dim": self.embed_dim, "seed": self.seed, "preprocess": self.preprocess.describe()}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        ids = [[1] + [3 + zlib.crc32(w.lower().encode()) % 997 for w in t.split()] + [2] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (length - len(x)) for x in ids])
        mask = (input_ids > 0).long()
        special = (input_ids == 1) | (input_ids == 2)
        return TextBatch(input_ids, mask, special, list(texts))

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        if self.delay:
            time.sleep(self.delay)
        cells = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).flatten(2).transpose(1, 2)  # [B, 16, 3]
        tokens = cells @ self.colour + self.position
        attention = torch.softmax(tokens.norm(dim=-1), dim=1)
        pooled = (attention[..., None] * tokens).sum(1)
        return ImageTokens(pooled, tokens, attention, (4, 4))

    def text_tokens(self, text: TextBatch) -> TextTokens:
        tokens = self.words[text.input_ids]
        weight = (text.attention_mask.bool() & ~text.special_mask.bool()).float() + 1e-6 * text.attention_mask
        attention = weight / weight.sum(1, keepdim=True)
        pooled = (attention[..., None] * tokens).sum(1)
        return TextTokens(pooled, tokens, attention, text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(pixels).pooled

    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).pooled  # type: ignore[arg-type]


class DeleteAfterDecoding:
    """An encoder ``preprocess`` that deletes ``victim`` right after decoding it (the file vanishes
    between decoding and hashing, in whichever process or Ray task decodes); otherwise ``inner``."""

    def __init__(self, inner: Callable[..., torch.Tensor], victim: str | Path):
        self.inner = inner
        self.victim = str(victim)

    def __call__(self, source: Any) -> torch.Tensor:
        out = self.inner(source)
        if str(source) == self.victim and Path(self.victim).exists():
            Path(self.victim).unlink()
        return out

    def __getattr__(self, name: str) -> Any:  # describe(), size, ... of the wrapped transform
        if name in ("inner", "victim"):
            raise AttributeError(name)
        return getattr(self.inner, name)
