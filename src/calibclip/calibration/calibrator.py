"""`Calibrator`: CalibCLIP (CVE + DCC + top-K re-ranking) over any `Encoder`'s token view."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from calibclip.calibration.config import CalibrationConfig
from calibclip.calibration.cve import CVEResult, enhance
from calibclip.calibration.dcc import WordSelection, combine, select_words
from calibclip.calibration.explain import ImageExplanation, TextExplanation, explain_images, explain_texts
from calibclip.calibration.rerank import fuse_scores
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens

#: Bumped whenever a formula changes, so cached calibrated features are recomputed.
FORMULA_VERSION = "calibclip-1"


class Calibrator:
    """Training-free calibration of an encoder's embeddings. Adds no parameters and keeps no
    state besides the config: every image and query is calibrated on its own.

    ``config``: a `CalibrationConfig` (default: ``CalibrationConfig.default_for(encoder.name)``).
    """

    def __init__(self, encoder: Encoder, config: CalibrationConfig | None = None):
        self.encoder = encoder
        self.config = config if config is not None else CalibrationConfig.default_for(encoder.name)

    def __repr__(self) -> str:
        return f"Calibrator({self.encoder.name}, {self.config})"

    def config_id(self, part: str = "features") -> str:
        """Stable id of (formula version, encoder fingerprint, settings) for cache keys.

        ``part``: ``features`` (visual + text settings; top_k/lam change only the ranking and are
        left out), ``image`` (visual settings only), ``text`` (text settings only) or ``all``.
        """
        cfg = self.config
        names = {
            "features": cfg.VISUAL_FIELDS + cfg.TEXT_FIELDS,
            "image": cfg.VISUAL_FIELDS,
            "text": cfg.TEXT_FIELDS,
            "all": tuple(cfg.field_names()),
        }
        if part not in names:
            raise ValueError(f"config_id part must be one of {sorted(names)}, got {part!r}")
        h = hashlib.sha256(f"{FORMULA_VERSION}|{part}|{self.encoder.fingerprint()}|{cfg.digest(names[part])}".encode())
        return f"calib-{part}-{h.hexdigest()[:16]}"

    # --- images ----------------------------------------------------------------------------
    @torch.inference_mode()
    def image_calibration(self, pixels: torch.Tensor) -> tuple[ImageTokens, CVEResult]:
        """One forward through ``encoder.image_tokens`` and the CVE (views and decisions)."""
        enc = self.encoder
        view = enc.image_tokens(pixels.to(enc.device, enc.dtype))
        return view, enhance(view, self.config)

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"raw": [B, D], "calibrated": [B, D]}`` (un-normalised, like ``encode_image``)."""
        view, result = self.image_calibration(pixels)
        return {"raw": view.pooled, "calibrated": result.calibrated}

    # --- texts -----------------------------------------------------------------------------
    def _batch(self, text: TextBatch | Sequence[str]) -> TextBatch:
        if isinstance(text, TextBatch):
            return text.to(self.encoder.device)
        if isinstance(text, str):
            text = [text]
        return self.encoder.tokenize(list(text)).to(self.encoder.device)

    @torch.inference_mode()
    def text_calibration(self, text: TextBatch | Sequence[str]) -> tuple[TextTokens, WordSelection, torch.Tensor]:
        """Token view, word selection and calibrated embeddings ``[B, D]``. Only queries with
        masked words are re-encoded (one batched forward of the masked queries)."""
        enc = self.encoder
        batch = self._batch(text)
        view = enc.text_tokens(batch)
        sel = select_words(view.attention, batch, self.config)
        calibrated = view.pooled.clone()
        rows = torch.nonzero(sel.masked.any(1), as_tuple=False).flatten()
        if rows.numel():
            masked_batch = batch.select(rows.cpu()).drop_tokens(
                sel.masked[rows].to(batch.input_ids.device), pad_id=enc.pad_id
            )
            masked = enc.encode_text(masked_batch)
            calibrated[rows] = combine(view.pooled[rows], masked, self.config)
        return view, sel, calibrated

    def text_features(self, text: TextBatch | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"raw": [B, D], "calibrated": [B, D]}`` for a `TextBatch` (or a list of strings)."""
        view, _, calibrated = self.text_calibration(text)
        return {"raw": view.pooled, "calibrated": calibrated}

    # --- ranking ---------------------------------------------------------------------------
    def fuse(self, sim_raw: torch.Tensor | np.ndarray, sim_cal: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Top-K re-ranking scores ``[Q, G]`` (see `calibclip.calibration.rerank.fuse_scores`)."""
        return fuse_scores(sim_raw, sim_cal, self.config.top_k, self.config.lam)

    def scores(self, queries: dict[str, torch.Tensor], gallery: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused scores from ``{"raw", "calibrated"}`` query and gallery features (cosine
        similarities of the L2-normalised raw and calibrated features, then `fuse`)."""

        def sim(name: str) -> torch.Tensor:
            q = F.normalize(torch.as_tensor(queries[name]).float(), dim=-1)
            g = F.normalize(torch.as_tensor(gallery[name]).float(), dim=-1)
            return q @ g.T

        return self.fuse(sim("raw"), sim("calibrated"))

    def rerank(
        self, queries: Mapping[str, torch.Tensor], gallery: Mapping[str, torch.Tensor], candidates: torch.Tensor
    ) -> torch.Tensor:
        """Fused scores ``[Q, K]`` of each query's candidate gallery rows ``candidates`` ``[Q, K]``
        (the `CalibrationMethod` protocol; equals `scores` restricted to the candidates when K <= top_k)."""
        idx = torch.as_tensor(candidates).long()

        def sim(name: str) -> torch.Tensor:
            q = F.normalize(torch.as_tensor(queries[name]).float(), dim=-1)
            g = F.normalize(torch.as_tensor(gallery[name]).float(), dim=-1)[idx]
            return torch.einsum("qd,qkd->qk", q, g)

        return self.fuse(sim("raw"), sim("calibrated"))

    # --- explanations ----------------------------------------------------------------------
    def explain_text(self, texts: str | Sequence[str]) -> list[TextExplanation]:
        """Per text: tokens, attention, shares, which words were dominant and which masked."""
        return explain_texts(self, [texts] if isinstance(texts, str) else list(texts))

    def explain_image(self, pixels: torch.Tensor) -> list[ImageExplanation]:
        """Per image: grid, attention map and per-token treatment (see `ImageExplanation`)."""
        return explain_images(self, pixels)
