"""Native PyTorch OpenAI CLIP: VisionTransformer and ModifiedResNet image towers, causal text transformer.

Parameter names follow OpenAI's ``clip/model.py`` exactly (``visual.conv1.weight``,
``transformer.resblocks.0.attn.in_proj_weight`` ...), so OpenAI state dicts load without renaming.
Attention uses `torch.nn.functional.scaled_dot_product_attention`; the token views compute the
last block's attention probabilities of the pooling token on the side, from the same inputs, so
``view.pooled`` is bit-identical to ``encode_*``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from calibclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from calibclip.models import tokenizer as clip_tokenizer
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens

#: Keys found in OpenAI / open_clip checkpoints that are not parameters of the model.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "logit_bias")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


@dataclass
class CLIPConfig:
    """Architecture of an OpenAI-style CLIP (data only; see `clip_configs.CLIP_CONFIGS`).

    ``vision_patch_size=None`` selects the ModifiedResNet tower, whose ``vision_layers`` is a
    4-tuple of bottleneck counts. ``image_size`` is the model's input ``(height, width)``.
    ``act`` is ``quick_gelu`` (OpenAI weights) or ``gelu`` (open_clip models without "-quickgelu").
    Heads default to ``width // 64`` (ViT, text) and ``width * 32 // 64`` (ResNet), as OpenAI (at least 1).
    ``vision_mlp_width`` / ``text_mlp_width``: hidden size of the transformer MLPs (None = 4 x width, as OpenAI;
    inferred from the weights, e.g. open_clip's ViT-bigG-14 uses 4.9231 x width).
    """

    embed_dim: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None = None
    image_size: tuple[int, int] = (224, 224)
    vision_heads: int | None = None
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int | None = None
    text_layers: int = 12
    act: str = "quick_gelu"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resize_mode: str | None = None
    name: str = "CLIP"
    extra: dict[str, Any] = field(default_factory=dict)
    vision_mlp_width: int | None = None
    text_mlp_width: int | None = None

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size)
        # the default (4 x width) is stored as None so that configs (and fingerprints) of 4x models do not change
        if self.vision_mlp_width is not None and int(self.vision_mlp_width) == 4 * self.vision_width:
            self.vision_mlp_width = None
        if self.text_mlp_width is not None and int(self.text_mlp_width) == 4 * self.text_width:
            self.text_mlp_width = None
        for key in ("vision_heads", "text_heads", "vision_mlp_width", "text_mlp_width"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ValueError(f"{key} must be a positive whole number, got {value!r}")
        if isinstance(self.vision_layers, (list, tuple)):
            layers = tuple(int(n) for n in self.vision_layers)
            self.vision_layers = layers  # type: ignore[assignment]
            if len(layers) != 4 or self.vision_patch_size is not None:
                raise ValueError("a ResNet tower needs vision_layers as 4 counts and vision_patch_size=None")
        elif self.vision_patch_size is None:
            raise ValueError("a ViT tower needs vision_patch_size (or give 4 vision_layers for a ResNet)")
        if self.vision_heads is None:
            self.vision_heads = max(1, self.vision_width // 64 if self.is_vit else self.vision_width * 32 // 64)
        if self.text_heads is None:
            self.text_heads = max(1, self.text_width // 64)
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if self.resize_mode is None:
            self.resize_mode = "clip" if self.image_size[0] == self.image_size[1] else "resize"
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]

    @property
    def is_vit(self) -> bool:
        return self.vision_patch_size is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["vision_layers"] = self.vision_layers if isinstance(self.vision_layers, int) else list(self.vision_layers)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d["tower"] = "vit" if self.is_vit else "resnet"
        for key in ("vision_mlp_width", "text_mlp_width"):
            if d[key] is None:
                del d[key]
        return d


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the parameter/input dtype (as OpenAI's subclass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(act: str) -> nn.Module:
    return QuickGELU() if act == "quick_gelu" else nn.GELU()


def _query_probs(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention probabilities ``[B, H, L]`` of one query row per sample (fp32)."""
    b, h, length, d = k.shape
    idx = query_index.view(b, 1, 1, 1).expand(b, h, 1, d)
    qi = q.gather(2, idx).squeeze(2).float()  # [B, H, d]
    scores = torch.einsum("bhd,bhld->bhl", qi, k.float()) / math.sqrt(d)
    if causal:
        future = torch.arange(length, device=k.device)[None, :] > query_index[:, None]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
    return scores.softmax(-1)


class Attention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, causal: bool, query_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, width))
        probs = _query_probs(q, k, query_index, causal) if query_index is not None else None
        return out, probs


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: str, mlp_width: int | None = None):
        super().__init__()
        hidden = int(mlp_width or width * 4)
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", _activation(act)),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(
        self, x: torch.Tensor, causal: bool, query_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, probs = self.attn(self.ln_1(x), causal, query_index)
        x = x + attn
        x = x + self.mlp(self.ln_2(x))
        return x, probs


class Transformer(nn.Module):
    """Stack of residual attention blocks on ``[B, L, width]`` (batch first).

    ``grad_checkpointing = True`` recomputes the blocks in the backward pass (training memory)."""

    grad_checkpointing: bool = False

    def __init__(self, width: int, layers: int, heads: int, act: str, mlp_width: int | None = None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act, mlp_width) for _ in range(layers)])

    def forward(
        self, x: torch.Tensor, causal: bool, query_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the output and, when ``query_index`` is given, the last block's attention
        probabilities ``[B, heads, L]`` from that position."""
        probs = None
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and i != last:
                from torch.utils.checkpoint import checkpoint

                x, probs = checkpoint(block, x, causal, None, use_reentrant=False)
            else:
                x, probs = block(x, causal, query_index if i == last else None)
        return x, probs


@dataclass
class _VisualOut:
    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: tuple[int, int],
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        act: str,
        mlp_width: int | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid[0] * self.grid[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act, mlp_width)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, pixels: torch.Tensor, need_tokens: bool = False) -> _VisualOut:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        b, c, gh, gw = x.shape
        if (gh, gw) != self.grid:
            raise ValueError(
                f"input {tuple(pixels.shape[-2:])} gives a {gh}x{gw} patch grid but the model expects "
                f"{self.grid[0]}x{self.grid[1]}; create the model with image_size=(H, W) matching the input"
            )
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(b, 1, c), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        query = torch.zeros(b, dtype=torch.long, device=x.device) if need_tokens else None
        x, probs = self.transformer(x, causal=False, query_index=query)
        pooled = self.ln_post(x[:, 0]) @ self.proj
        if not need_tokens:
            return _VisualOut(pooled)
        tokens = self.ln_post(x[:, 1:]) @ self.proj
        attn = probs.mean(1)[:, 1:]  # type: ignore[union-attr]
        attn = attn / attn.sum(-1, keepdim=True)
        return _VisualOut(pooled, tokens, attn, (gh, gw))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling with the spatial mean as the query token (OpenAI's ModifiedResNet head)."""

    def __init__(self, grid: tuple[int, int], embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.grid = grid
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(grid[0] * grid[1] + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, feats: torch.Tensor, need_tokens: bool = False) -> _VisualOut:
        b, c, gh, gw = feats.shape
        if (gh, gw) != self.grid:
            raise ValueError(
                f"feature map {gh}x{gw} does not match the attention-pool grid {self.grid[0]}x{self.grid[1]}; "
                "create the model with image_size=(H, W) matching the input (multiples of 32)"
            )
        x = feats.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        h, d = self.num_heads, c // self.num_heads
        q = self.q_proj(x[:, :1]).view(b, 1, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, h, d).transpose(1, 2)
        v_flat = self.v_proj(x)
        v = v_flat.view(b, -1, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, d]
        pooled = self.c_proj(out.transpose(1, 2).reshape(b, c))
        if not need_tokens:
            return _VisualOut(pooled)
        query = torch.zeros(b, dtype=torch.long, device=x.device)
        attn = _query_probs(q, k, query, causal=False).mean(1)[:, 1:]
        attn = attn / attn.sum(-1, keepdim=True)
        tokens = self.c_proj(v_flat[:, 1:])
        return _VisualOut(pooled, tokens, attn, (gh, gw))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with avg-pool, anti-aliased strided bottlenecks, attention pooling."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        output_dim: int,
        heads: int,
        image_size: tuple[int, int],
        width: int = 64,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d((image_size[0] // 32, image_size[1] // 32), embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor, need_tokens: bool = False) -> _VisualOut:
        x = pixels.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x, need_tokens)


# ----------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------
class CLIP(Encoder):
    """OpenAI CLIP as an `Encoder` (``encode_image``/``encode_text``/token views/``tokenize``).

    Public inference methods run under `torch.inference_mode` and return inference tensors
    (``.clone()`` them before using them in autograd). Token-view attention weights are float32
    whatever the model precision; features are in the model's dtype. ``forward(image, text)`` is the plain
    differentiable path (also used for TorchScript tracing).
    """

    checkpoint_format: str | None = None  # set by `load_checkpoint` (the detected file format)

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.name = cfg.name
        self.embed_dim = cfg.embed_dim
        self.context_length = cfg.context_length
        vision_heads = int(cast(int, cfg.vision_heads))  # heads are set by CLIPConfig.__post_init__
        if cfg.is_vit:
            self.visual: nn.Module = VisionTransformer(
                cfg.image_size,
                int(cast(int, cfg.vision_patch_size)),
                cfg.vision_width,
                int(cast(int, cfg.vision_layers)),
                vision_heads,
                cfg.embed_dim,
                cfg.act,
                cfg.vision_mlp_width,
            )
        else:
            self.visual = ModifiedResNet(
                cast(tuple[int, int, int, int], cfg.vision_layers),
                cfg.embed_dim,
                vision_heads,
                cfg.image_size,
                cfg.vision_width,
            )
        self.transformer = Transformer(
            cfg.text_width,
            cfg.text_layers,
            int(cast(int, cfg.text_heads)),
            cfg.act,
            cfg.text_mlp_width,
        )
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.preprocess = ImageTransform(
            size=cfg.image_size, mode=str(cfg.resize_mode), mean=cfg.image_mean, std=cfg.image_std, resample="bicubic"
        )
        self._initialize_parameters()

    def _initialize_parameters(self) -> None:
        """OpenAI's initialisation (random-init models, benchmarks and tests)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for block in stage:
                    nn.init.zeros_(cast(Bottleneck, block).bn3.weight)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for module in self.transformer.resblocks:
            block = cast(ResidualAttentionBlock, module)
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            mlp = cast(Any, block.mlp)  # nn.Sequential with named c_fc / gelu / c_proj
            nn.init.normal_(mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    # --- text ---------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> TextBatch:
        """Texts -> `TextBatch` trimmed to the longest text (SOT/EOT marked in ``special_mask``).
        Long texts are truncated keeping the end-of-text token last; empty texts give [SOT, EOT]."""
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        ids = clip_tokenizer.tokenize(texts, context_length=self.context_length)
        return self.batch_from_ids(ids, texts)

    def batch_from_ids(self, ids: torch.Tensor, texts: Sequence[str] = ()) -> TextBatch:
        """OpenAI-style ids ``[B, L]`` (pad 0, EOT = largest id) -> trimmed `TextBatch`."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0:
            empty = ids[:, :0]
            return TextBatch(empty, empty.clone(), empty.bool(), list(texts))
        eot = ids.argmax(-1)
        length = int(eot.max()) + 1
        pos = torch.arange(length, device=ids.device)[None, :]
        attention_mask = (pos <= eot[:, None]).long()
        special = (pos == 0) | (pos == eot[:, None])
        return TextBatch(ids[:, :length].contiguous(), attention_mask, special, list(texts))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Readable BPE strings of token ids (``<start_of_text>`` ... ``<end_of_text>``)."""
        return clip_tokenizer.token_strings(ids)

    def _text_ids(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        ids = text.input_ids if isinstance(text, TextBatch) else torch.as_tensor(text)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[-1] > self.context_length:
            raise ValueError(f"text has {ids.shape[-1]} tokens, above the context length {self.context_length}")
        return ids.to(self.positional_embedding.device, torch.long)

    def _text_forward(
        self, ids: torch.Tensor, need_tokens: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Trim to the longest sequence (exact under the causal mask), run the tower, pool at EOT."""
        dtype = self.text_projection.dtype
        if ids.shape[0] == 0:
            empty = torch.zeros(0, self.embed_dim, dtype=dtype, device=ids.device)
            return empty, (empty[:, None] if need_tokens else None), (empty[:, :0] if need_tokens else None)
        eot = ids.argmax(-1)
        length = int(eot.max()) + 1
        ids = ids[:, :length]
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding[:length].to(dtype)
        x, probs = self.transformer(x, causal=True, query_index=eot if need_tokens else None)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = self.ln_final(x[rows, eot]) @ self.text_projection
        if not need_tokens:
            return pooled, None, None
        tokens = self.ln_final(x) @ self.text_projection
        return pooled, tokens, probs.mean(1)  # type: ignore[union-attr]

    @torch.inference_mode()
    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        """OpenAI ids ``LongTensor[B, L]`` or a `TextBatch` -> raw text embeddings ``[B, D]``."""
        return self._text_forward(self._text_ids(text), need_tokens=False)[0]

    @torch.inference_mode()
    def text_tokens(self, text: TextBatch | torch.Tensor) -> TextTokens:
        """Token features ``[B, L, D]`` (after ln_final and text_projection) and the last block's
        EOT->token attention (mean over heads, 0 on padding); ``batch`` is trimmed to ``L``."""
        batch = text if isinstance(text, TextBatch) else self.batch_from_ids(torch.as_tensor(text))
        ids = self._text_ids(batch)
        pooled, tokens, attn = self._text_forward(ids, need_tokens=True)
        length = tokens.shape[1]  # type: ignore[union-attr]
        if batch.input_ids.shape[1] != length:
            batch = TextBatch(
                batch.input_ids[:, :length],
                batch.attention_mask[:, :length],
                batch.special_mask[:, :length],
                batch.texts,
            )
        attn = attn * batch.attention_mask.to(attn.device, attn.dtype)  # type: ignore[union-attr,operator]
        return TextTokens(pooled, tokens, attn, batch.to(pooled.device))  # type: ignore[arg-type]

    # --- images -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``[B, 3, H, W]`` -> raw image embeddings ``[B, D]``."""
        return self.visual(pixels.to(self.positional_embedding.device)).pooled

    @torch.inference_mode()
    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        """Patch/cell tokens in the joint space and their attention weight in the pooled feature."""
        out = self.visual(pixels.to(self.positional_embedding.device), need_tokens=True)
        return ImageTokens(out.pooled, out.tokens, out.attention, out.grid)  # type: ignore[arg-type]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable ``(image_features, text_features)`` (no inference mode)."""
        return self.visual(image).pooled, self._text_forward(text, need_tokens=False)[0]

    # --- description --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"arch": "CLIP", **self.cfg.to_dict(), "preprocess": self.preprocess.describe()}

    # --- weights ------------------------------------------------------------------------
    def load_openai_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load OpenAI-named weights, interpolating positional embeddings to this model's grid.

        Raises ValueError listing missing/unexpected keys or mismatched shapes.
        """
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in IGNORED_KEYS}
        own = self.state_dict()
        for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
            if key in state and key in own and state[key].shape != own[key].shape:
                visual = cast(Any, self.visual)
                grid = visual.grid if key == "visual.positional_embedding" else visual.attnpool.grid
                state[key] = resize_pos_embed(state[key], grid, source=source)
        missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - set(own))
        bad = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or bad:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {missing[:5]})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:5]})")
            if bad:
                parts.append(f"shape mismatches: {bad[:5]}")
            raise ValueError(f"{source}: weights do not fit {self.name} ({'; '.join(parts)})")
        with torch.no_grad():
            for k, t in own.items():
                if k in state:
                    t.copy_(state[k].to(t.dtype))


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], source: str = "checkpoint") -> torch.Tensor:
    """Bicubic interpolation of a ``[1 + h*w, C]`` positional embedding (class/query token first)
    from the checkpoint's square grid to ``grid`` (``align_corners=False``, no antialiasing: the
    same as Hugging Face's ``interpolate_pos_encoding``)."""
    n = pos.shape[0] - 1
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(
            f"{source}: positional embedding has {n} grid positions, not a square grid; cannot interpolate to "
            f"{grid[0]}x{grid[1]} (load it with the image_size it was trained with)"
        )
    first, rest = pos[:1], pos[1:]
    dtype = pos.dtype
    rest = rest.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    rest = F.interpolate(rest, size=grid, mode="bicubic", align_corners=False)
    rest = rest.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(dtype)
    return torch.cat([first, rest], dim=0)


def config_from_state_dict(state: Mapping[str, torch.Tensor], **overrides: Any) -> CLIPConfig:
    """Infer the architecture from OpenAI-named weights (as OpenAI's ``build_model``).

    ``overrides`` (e.g. ``image_size``, ``act``, ``vision_heads``, ``name``) replace inferred values.
    """
    vit = "visual.proj" in state
    if vit:
        conv = state["visual.conv1.weight"]
        vision_width, patch = int(conv.shape[0]), int(conv.shape[-1])
        vision_layers: Any = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        grid = math.isqrt(int(state["visual.positional_embedding"].shape[0]) - 1)
        native = patch * grid
    else:
        vision_layers = tuple(
            len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
        )
        vision_width = int(state["visual.layer1.0.conv1.weight"].shape[0])
        patch = None
        native = math.isqrt(int(state["visual.attnpool.positional_embedding"].shape[0]) - 1) * 32
    text_width = int(state["ln_final.weight"].shape[0])
    mlp: dict[str, Any] = {}
    for key, prefix in (
        ("vision_mlp_width", "visual.transformer.resblocks.0."),
        ("text_mlp_width", "transformer.resblocks.0."),
    ):
        if f"{prefix}mlp.c_fc.weight" in state:  # the MLP hidden size, like every other dimension, from the weights
            mlp[key] = int(state[f"{prefix}mlp.c_fc.weight"].shape[0])
    cfg: dict[str, Any] = dict(
        embed_dim=int(state["text_projection"].shape[1]),
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=patch,
        image_size=(native, native),
        context_length=int(state["positional_embedding"].shape[0]),
        vocab_size=int(state["token_embedding.weight"].shape[0]),
        text_width=text_width,
        text_layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        **mlp,
    )
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return CLIPConfig(**cfg)
