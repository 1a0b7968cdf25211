"""The trained cross-modal re-ranker (the CalibCLIP README's *Calibrated Vision Encoder*).

Not to be confused with the paper's training-free Contrastive Visual Enhancer (`cve.py`): this
module has weights. A query's token features attend to a candidate image's token features
(``num_layers`` blocks of self-attention over the query tokens, cross-attention to the image
tokens and an MLP), and a linear head on a learned summary token gives one match score per
(query, candidate). The final score of each of the dual encoder's top-K candidates is
``sim_dual + fusion_weight * match``; candidates below K keep their dual-encoder order, below all
of the top-K (as the training-free re-ranker does, `calibclip.calibration.rerank`).

What the re-ranker needs of each gallery image is the *projected* image tokens
(``project_image``: layer norm + linear to ``width``), which an index stores in fp16 so that no
image is decoded at query time. Scores depend only on the (query, candidate) pair: candidates are
scored independently in one batched forward.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Files of a re-ranker checkpoint directory.
WEIGHTS_FILE = "reranker.safetensors"
CONFIG_FILE = "reranker.json"
FORMAT = "calibclip-reranker-1"


@dataclass(frozen=True)
class RerankerConfig:
    """Architecture and ranking settings (the seed's ``model.cve`` block: ``num_layers``, ``num_heads``,
    ``dropout``; plus ``width``, the token dimension of the encoder, ``top_k`` and ``fusion_weight``).

    Args:
        token_dim: width of the encoder's token views (``ImageTokens.tokens`` / ``TextTokens.tokens``).
        width: internal width; the stored image tokens have this many fp16 values per token.
        num_layers: cross-modal blocks.
        num_heads: attention heads (``width`` must be divisible by it).
        dropout: dropout in attention and MLP (training only).
        mlp_ratio: MLP hidden width / ``width``.
        max_text_tokens: longest query (in the encoder's tokens) the position table covers; longer
            queries are cut to it.
        top_k: candidates re-scored per query.
        fusion_weight: weight of the match score added to the dual-encoder cosine similarity.
        encoder: fingerprint of the encoder whose token views it was trained on ("" = unknown).
        encoder_name: that encoder's name (for messages).
    """

    token_dim: int
    width: int = 256
    num_layers: int = 2
    num_heads: int = 8
    dropout: float = 0.1
    mlp_ratio: float = 4.0
    max_text_tokens: int = 77
    top_k: int = 20
    fusion_weight: float = 1.0
    encoder: str = ""
    encoder_name: str = ""

    def __post_init__(self) -> None:
        checks = {
            "token_dim": self.token_dim >= 1,
            "width": self.width >= 1,
            "num_layers": self.num_layers >= 1,
            "num_heads": self.num_heads >= 1 and self.width % max(self.num_heads, 1) == 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "mlp_ratio": self.mlp_ratio > 0,
            "max_text_tokens": self.max_text_tokens >= 2,
            "top_k": self.top_k >= 1,
            "fusion_weight": math.isfinite(self.fusion_weight),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid re-ranker settings {bad}: { ({k: getattr(self, k) for k in bad}) } "
                "(width must be divisible by num_heads; dropout in [0, 1); sizes >= 1)"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RerankerConfig:
        """Config from a mapping; unknown keys are a ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown re-ranker setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> RerankerConfig:
        return RerankerConfig.from_dict({**self.to_dict(), **changes})


class _Block(nn.Module):
    """Pre-LN block: self-attention over the query tokens, cross-attention to the image, MLP."""

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        w, h, p = cfg.width, cfg.num_heads, cfg.dropout
        self.ln_self = nn.LayerNorm(w)
        self.self_attn = nn.MultiheadAttention(w, h, dropout=p, batch_first=True)
        self.ln_cross = nn.LayerNorm(w)
        self.ln_image = nn.LayerNorm(w)
        self.cross_attn = nn.MultiheadAttention(w, h, dropout=p, batch_first=True)
        self.ln_mlp = nn.LayerNorm(w)
        hidden = int(round(w * cfg.mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(), nn.Dropout(p), nn.Linear(hidden, w))
        self.drop = nn.Dropout(p)

    def forward(
        self,
        x: torch.Tensor,
        pad: torch.Tensor,
        image: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.attend_image(self.attend_self(x, pad), image, need_weights)

    def attend_self(self, x: torch.Tensor, pad: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Self-attention over the query tokens (residual); ``first_only``: only the summary token's output
        ``[B, 1, width]`` (what the last block needs for the score)."""
        y = self.ln_self(x)
        q, x = (y[:, :1], x[:, :1]) if first_only else (y, x)
        return x + self.drop(self.self_attn(q, y, y, key_padding_mask=pad, need_weights=False)[0])

    def attend_image(
        self, x: torch.Tensor, image: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attention to the image tokens and the MLP (residuals)."""
        y = self.ln_cross(x)
        img = self.ln_image(image)
        out, weights = self.cross_attn(y, img, img, need_weights=need_weights, average_attn_weights=True)
        x = x + self.drop(out)
        x = x + self.drop(self.mlp(self.ln_mlp(x)))
        return x, weights

    def attend_image_absorbed(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`attend_image` at inference without projecting the image tokens to keys and values: per head,
        ``q . (W_k x_j + b_k) = (W_k^T q) . x_j + const`` and ``sum_j a_j (W_v x_j + b_v) = W_v (sum_j a_j x_j)
        + b_v``, so the query is projected back to the image tokens' width instead of the ``N`` image tokens
        forward (exact up to rounding; far less work when the queries are fewer than the image tokens)."""
        mha = self.cross_attn
        p, t, width = x.shape
        heads = mha.num_heads
        d = width // heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, _, b_v = mha.in_proj_bias.chunk(3)
        img = self.ln_image(image)  # [P, N, W]
        q = F.linear(self.ln_cross(x), w_q, b_q).view(p, t, heads, d) * d**-0.5
        u = torch.einsum("pthd,hdw->pthw", q, w_k.view(heads, d, width))
        att = torch.einsum("pthw,pnw->pthn", u, img).softmax(-1)
        z = torch.einsum("pthn,pnw->pthw", att, img)
        o = torch.einsum("pthw,hdw->pthd", z, w_v.view(heads, d, width)) + b_v.view(heads, d)
        x = x + mha.out_proj(o.reshape(p, t, width))
        return x + self.mlp(self.ln_mlp(x))


class CrossModalReranker(nn.Module):
    """Query-to-image cross-attention scorer over an encoder's token views (see module docstring)."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.image_norm = nn.LayerNorm(config.token_dim)
        self.image_proj = nn.Linear(config.token_dim, w)
        self.text_norm = nn.LayerNorm(config.token_dim)
        self.text_proj = nn.Linear(config.token_dim, w)
        self.text_pos = nn.Parameter(torch.zeros(config.max_text_tokens + 1, w))
        self.summary = nn.Parameter(torch.zeros(1, 1, w))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.ln_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)
        nn.init.normal_(self.text_pos, std=0.02)
        nn.init.normal_(self.summary, std=0.02)
        # A zero head makes the untrained re-ranker a no-op (fused == dual-encoder similarity).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # --- inputs ------------------------------------------------------------------------------
    def _check_dim(self, tokens: torch.Tensor, what: str) -> None:
        if tokens.shape[-1] != self.config.token_dim:
            name = self.config.encoder_name or "another encoder"
            raise ValueError(
                f"{what} have width {tokens.shape[-1]} but this re-ranker was trained on {name}'s tokens of width "
                f"{self.config.token_dim}: use a re-ranker trained for this encoder"
            )

    def project_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder image tokens ``[B, N, token_dim]`` -> stored re-ranker tokens ``[B, N, width]``."""
        self._check_dim(tokens, "image tokens")
        dtype = self.image_proj.weight.dtype
        return self.image_proj(self.image_norm(tokens.to(dtype)))

    def project_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder text tokens ``[Q, L, token_dim]`` and mask ``[Q, L]`` -> ``([Q, 1 + L', width], pad [Q, 1 + L'])``
        with the summary token first and at most ``max_text_tokens`` text tokens."""
        self._check_dim(tokens, "text tokens")
        dtype = self.text_proj.weight.dtype
        length = min(tokens.shape[1], self.config.max_text_tokens)
        tokens, mask = tokens[:, :length].to(dtype), mask[:, :length].bool()
        x = self.text_proj(self.text_norm(tokens)) + self.text_pos[1 : length + 1]
        summary = (self.summary + self.text_pos[:1]).expand(x.shape[0], 1, -1)
        x = torch.cat([summary, x], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
        return x, pad

    # --- scoring -----------------------------------------------------------------------------
    def match(
        self,
        text: torch.Tensor,
        pad: torch.Tensor,
        image: torch.Tensor,
        pairs: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Match scores of (query, image) pairs.

        Args:
            text: projected queries ``[Q, T, width]`` (from `project_text`).
            pad: their padding mask ``[Q, T]`` (True = padding).
            image: projected candidate tokens ``[P, N, width]`` (from `project_image`).
            pairs: query row of each candidate ``[P]`` (default: ``arange(P)``, one candidate per query).
            need_weights: also return the last block's cross-attention ``[P, T - 1, N]`` (text tokens
                to image tokens, mean over heads; the summary token's row is dropped).

        Returns:
            ``(scores [P], attention or None)``.
        """
        if not self.training and not need_weights and not torch.is_grad_enabled():
            return self._match_fast(text, pad, image.to(text.dtype), pairs), None
        if pairs is not None:
            text, pad = text[pairs], pad[pairs]
        image = image.to(text.dtype)
        x, weights = text, None
        for i, block in enumerate(self.blocks):
            x, w = block(x, pad, image, need_weights=need_weights and i == len(self.blocks) - 1)
            weights = w if w is not None else weights
        score = self.head(self.ln_out(x[:, 0])).squeeze(-1)
        if weights is not None:
            weights = weights[:, 1:]
        return score, weights

    def _match_fast(
        self, text: torch.Tensor, pad: torch.Tensor, image: torch.Tensor, pairs: torch.Tensor | None
    ) -> torch.Tensor:
        """`match` at inference (eval mode, no gradients, no attention maps), the same function with less work: the
        first block's self-attention is the same for all candidates of a query, so it runs once per
        query before the candidates are expanded; the last block computes only the summary token (the
        one the head reads) past its self-attention keys and values; cross-attention never projects the
        image tokens (`_Block.attend_image_absorbed`)."""
        x = text
        last = len(self.blocks) - 1
        blocks: list[_Block] = list(self.blocks)  # type: ignore[arg-type]
        for i, block in enumerate(blocks):
            x = block.attend_self(x, pad, first_only=i == last)
            if i == 0 and pairs is not None:
                x, pad = x[pairs], pad[pairs]
            x = block.attend_image_absorbed(x, image)
        return self.head(self.ln_out(x[:, 0])).squeeze(-1)

    def score_candidates(
        self,
        text: torch.Tensor,
        pad: torch.Tensor,
        image: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores ``[Q, K]`` of K candidates per query, ``image`` ``[Q, K, N, width]``, in one forward."""
        q, k = image.shape[:2]
        pairs = torch.arange(q, device=image.device).repeat_interleave(k)
        scores, weights = self.match(text, pad, image.flatten(0, 1), pairs, need_weights=need_weights)
        if weights is not None:
            weights = weights.reshape(q, k, *weights.shape[1:])
        return scores.reshape(q, k), weights

    def fuse(self, sim_dual: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
        """``sim_dual + fusion_weight * match`` (both ``[..., K]``)."""
        return sim_dual + self.config.fusion_weight * match

    # --- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
        """Write ``reranker.safetensors`` + ``reranker.json`` (config, format, optional card) atomically."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").float().contiguous() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / WEIGHTS_FILE)
        meta = {"format": FORMAT, "config": self.config.to_dict(), **({"card": card} if card else {})}
        tmp = out / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / CONFIG_FILE)
        return out


def load_reranker(path: str | os.PathLike, device: str | torch.device = "cpu") -> CrossModalReranker:
    """Load a re-ranker directory (or its ``reranker.json`` / ``reranker.safetensors``), in eval mode.

    Args:
        path: the directory written by `CrossModalReranker.save` or one of its two files.
        device: where to put it.

    Returns:
        The re-ranker, frozen and in eval mode.

    Raises:
        FileNotFoundError: no such directory or files.
        ValueError: not a re-ranker checkpoint, or weights that do not fit / are not finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    directory = p.parent if p.name in (WEIGHTS_FILE, CONFIG_FILE) else p
    cfg_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path}: not a re-ranker checkpoint (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_file}: unreadable re-ranker config ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{cfg_file}: not a calibclip re-ranker config (format {FORMAT!r} expected)")
    model = CrossModalReranker(RerankerConfig.from_dict(meta["config"]))
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_file}: unreadable re-ranker weights ({exc})") from None
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{weights_file}: weights do not fit the re-ranker config (e.g. {bad[:4]})")
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise ValueError(f"{weights_file}: re-ranker weights contain NaN or infinite values")
    model.load_state_dict(state)
    model.card = meta.get("card", {})  # type: ignore[attr-defined]
    return model.to(device).eval().requires_grad_(False)


def listwise_loss(fused: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax cross-entropy over each query's K candidates: ``fused [Q, K]`` scores, ``target [Q]``
    the column of the true image, scores divided by ``temperature``."""
    return F.cross_entropy(fused / float(temperature), target)


class Reranking:
    """An encoder with its trained re-ranker: projected image tokens for galleries, projected
    query tokens, and the top-K re-scoring that evaluation, `Index.search` and the web use.

    Args:
        encoder: the dual encoder (frozen); its token views feed the re-ranker.
        reranker: a `CrossModalReranker` trained on this encoder's token views.
        top_k: candidates re-scored per query (default: the re-ranker's ``top_k``).

    Raises:
        ValueError: the re-ranker was trained on another encoder (token width or fingerprint).
    """

    def __init__(self, encoder: Any, reranker: CrossModalReranker, top_k: int | None = None):
        cfg = reranker.config
        if cfg.token_dim != int(encoder.embed_dim):
            raise ValueError(
                f"this re-ranker was trained on {cfg.encoder_name or 'another encoder'}'s tokens of width "
                f"{cfg.token_dim}, but {encoder.name} has width {encoder.embed_dim}: use a re-ranker trained for it"
            )
        if cfg.encoder and cfg.encoder != encoder.fingerprint():
            raise ValueError(
                f"this re-ranker was trained on encoder {cfg.encoder} ({cfg.encoder_name}), not on "
                f"{encoder.fingerprint()}: its token features differ; train one for this encoder"
            )
        self.encoder = encoder
        self.reranker = reranker.to(encoder.device).eval()
        self.top_k = int(top_k if top_k is not None else cfg.top_k)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def config_id(self) -> str:
        """Stable id of (encoder, re-ranker weights) for cache keys and index metadata."""
        import hashlib

        h = hashlib.sha256(f"{FORMAT}|{self.encoder.fingerprint()}".encode())
        for key, t in sorted(self.reranker.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return f"rerank-{h.hexdigest()[:16]}"

    def projection_id(self) -> str:
        """Stable id of what the stored image tokens depend on: the encoder and the re-ranker's image
        projection (``image_norm`` + ``image_proj``). Re-rankers with the same id can share an index's
        stored tokens (e.g. one whose head was retrained with a frozen projection)."""
        import hashlib

        h = hashlib.sha256(f"{FORMAT}|projection|{self.encoder.fingerprint()}".encode())
        for key, t in sorted(self.reranker.state_dict().items()):
            if key.startswith(("image_norm.", "image_proj.")):
                h.update(key.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
        return f"rrproj-{h.hexdigest()[:16]}"

    @torch.inference_mode()
    def project_view(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder image tokens ``[B, N, D]`` (an `ImageTokens.tokens`) -> stored re-ranker tokens
        ``[B, N, width]`` (fp16), so that an index computes them from the forward that gives its vectors."""
        return self.reranker.project_image(tokens.float()).half()

    @torch.inference_mode()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``[B, 3, H, W]`` -> stored re-ranker tokens ``[B, N, width]`` (fp16)."""
        enc = self.encoder
        view = enc.image_tokens(pixels.to(enc.device, enc.dtype))
        return self.project_view(view.tokens)

    @torch.inference_mode()
    def text_inputs(self, texts: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (strings or a `TextBatch`) -> ``(pooled [Q, D], projected [Q, T, width], pad [Q, T])``."""
        enc = self.encoder
        batch = (
            texts if hasattr(texts, "input_ids") else enc.tokenize([texts] if isinstance(texts, str) else list(texts))
        )
        view = enc.text_tokens(batch.to(enc.device))
        x, pad = self.reranker.project_text(view.tokens.float(), view.batch.attention_mask.to(view.tokens.device))
        return view.pooled.float(), x, pad

    @torch.inference_mode()
    def rescore(
        self,
        sim_topk: torch.Tensor,
        text: torch.Tensor,
        pad: torch.Tensor,
        candidates: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused scores ``[Q, K]`` of K candidates per query (``sim_topk`` their cosine similarities,
        ``candidates`` their stored tokens ``[Q, K, N, width]``), in one batched forward."""
        dev = text.device
        match, weights = self.reranker.score_candidates(text, pad, candidates.to(dev).float(), need_weights)
        return self.reranker.fuse(sim_topk.to(dev).double(), match.double()), weights

    @torch.inference_mode()
    def rerank_matrix(
        self,
        sim: torch.Tensor,
        text: torch.Tensor,
        pad: torch.Tensor,
        gallery_tokens: torch.Tensor | Any,
        chunk: int = 64,
    ) -> torch.Tensor:
        """Full ``[Q, G]`` scores (float64): each row's ``top_k`` best by ``sim`` get the fused score and
        rank above the rest, which keep their order (`calibclip.calibration.rerank.place_topk`).

        ``gallery_tokens``: ``[G, N, width]`` (array or tensor; indexed per chunk of queries).
        """
        from calibclip.calibration.rerank import place_topk

        sim = torch.as_tensor(sim).float()
        k = min(self.top_k, sim.shape[1])
        out = []
        for s in range(0, sim.shape[0], chunk):
            rows = sim[s : s + chunk]
            top = torch.topk(rows, k, dim=1)
            cand = torch.as_tensor(gallery_tokens[top.indices.flatten().numpy()]).reshape(
                *top.indices.shape, -1, self.reranker.config.width
            )
            fused, _ = self.rescore(top.values, text[s : s + chunk], pad[s : s + chunk], cand)
            out.append(place_topk(rows.double(), top.indices, fused.cpu()))
        return torch.cat(out) if out else torch.zeros(0, sim.shape[1], dtype=torch.float64)

    @torch.inference_mode()
    def explain(self, text: str, pixels: torch.Tensor) -> MatchExplanation:
        """Which query words attended to which image regions, for one query and one image
        (``pixels`` ``[1, 3, H, W]``): the last block's cross-attention, mean over heads."""
        enc = self.encoder
        view = enc.image_tokens(pixels.to(enc.device, enc.dtype))
        image = self.reranker.project_image(view.tokens.float())
        return self.explain_stored(text, image[0], view.pooled[0], view.grid)

    @torch.inference_mode()
    def explain_stored(
        self, text: str, tokens: torch.Tensor, pooled: torch.Tensor, grid: tuple[int, int]
    ) -> MatchExplanation:
        """`explain` from what an index stores of the image: its projected re-ranker tokens
        ``[N, width]``, its embedding ``[D]`` and its token grid ``(h, w)`` (no image is decoded)."""
        from calibclip.calibration.explain import token_strings

        enc = self.encoder
        batch = enc.tokenize([text])
        query, x, pad = self.text_inputs(batch)
        dev = x.device
        image = torch.as_tensor(tokens).to(dev).float()[None]
        sim = F.cosine_similarity(query, torch.as_tensor(pooled).to(dev).float()[None]).double()
        match, weights = self.reranker.match(x, pad, image, need_weights=True)
        length = x.shape[1] - 1
        ids = batch.input_ids[0, :length].tolist()
        keep = (batch.attention_mask[0, :length].bool() & ~batch.special_mask[0, :length].bool()).tolist()
        words = token_strings(enc, ids)
        h, w = int(grid[0]), int(grid[1])
        maps = weights[0, :length].float().cpu().reshape(length, h, w)  # type: ignore[index]
        return MatchExplanation(
            text=text,
            tokens=[t for t, k in zip(words, keep) if k],
            maps=maps[torch.tensor(keep, dtype=torch.bool)],
            grid=(h, w),
            similarity=float(sim),
            match=float(match[0]),
            fused=float(self.reranker.fuse(sim, match.double())[0]),
        )


@dataclass
class MatchExplanation:
    """The re-ranker's view of one (query, image) pair: per word token, its attention over the image
    grid (``maps [T, h, w]``, rows summing to 1), and the cosine, match and fused scores."""

    text: str
    tokens: list[str]
    maps: torch.Tensor
    grid: tuple[int, int]
    similarity: float
    match: float
    fused: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "grid": list(self.grid),
            "attention": [[round(float(v), 5) for v in m.flatten()] for m in self.maps],
            "similarity": self.similarity,
            "match": self.match,
            "fused": self.fused,
        }


def render_match(
    image: Any, explanation: MatchExplanation, out: str | os.PathLike, max_words: int = 8, title: str = ""
) -> Path:
    """A PNG with one panel per query word (up to ``max_words``): the image under that word's
    cross-attention heatmap."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.asarray(image.convert("RGB"))
    height, width = arr.shape[:2]
    words = explanation.tokens[:max_words]
    n = max(len(words), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(words):
            continue
        ax.imshow(arr, extent=(0, width, height, 0))
        ax.imshow(
            explanation.maps[i].numpy(),
            cmap="inferno",
            alpha=0.6,
            extent=(0, width, height, 0),
            interpolation="nearest",
        )
        ax.set_title(words[i], fontsize=11)
    fig.suptitle(
        title
        or f"re-ranker cross-attention | cosine {explanation.similarity:.3f}, match "
        f"{explanation.match:+.3f}, fused {explanation.fused:.3f}",
        fontsize=10,
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


#: Folder of the re-rankers shipped inside the package: ``weights/<encoder name>-reranker/``.
PACKAGED_SUFFIX = "-reranker"


def packaged_reranker_path(encoder_name: str) -> Path | None:
    """The re-ranker shipped for ``encoder_name`` (e.g. ``starter``), or None."""
    from importlib import resources

    folder = Path(str(resources.files("calibclip"))) / "weights" / f"{encoder_name}{PACKAGED_SUFFIX}"
    return folder if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file() else None


def create_reranking(encoder: Any, source: str | os.PathLike | None = None, top_k: int | None = None) -> Reranking:
    """The re-ranking stage for ``encoder``: ``source`` a re-ranker folder, or None/"packaged" for the
    re-ranker shipped with the encoder.

    Raises:
        ValueError: no packaged re-ranker for this encoder, or one trained for another encoder.
        FileNotFoundError: ``source`` is not a re-ranker folder.
    """
    if source is None or str(source) == "packaged":
        path = packaged_reranker_path(encoder.name)
        if path is None:
            raise ValueError(
                f"no re-ranker ships with {encoder.name}; train one (calibclip train with "
                "training.target: reranker) and pass its folder"
            )
        source = path
    return Reranking(encoder, load_reranker(source, device=encoder.device), top_k=top_k)


def reranker_folder(path: str | os.PathLike) -> Path:
    """The folder of a re-ranker given as its folder or one of its two files."""
    p = Path(path)
    return p.parent if p.name in (WEIGHTS_FILE, CONFIG_FILE) else p


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a re-ranker's ``reranker.safetensors`` (``path``: its folder or one of its files)."""
    import hashlib

    h = hashlib.sha256()
    with open(reranker_folder(path) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
