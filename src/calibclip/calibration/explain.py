"""Explanations of CalibCLIP decisions: which query words were dominant/masked, and which image
tokens were suppressed/decayed/retained; plus a one-PNG rendering (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from calibclip.calibration.cve import TREATMENTS

if TYPE_CHECKING:
    from PIL import Image

    from calibclip.calibration.calibrator import Calibrator
    from calibclip.models.base import Encoder

#: Colours of the treatments in the rendered map (context is left transparent).
TREATMENT_COLOURS = {"target": "#1f77b4", "retain": "#2ca02c", "decay": "#ff7f0e", "suppress": "#d62728"}


@dataclass
class TextExplanation:
    """DCC view of one query (lists run over its real tokens, padding removed)."""

    text: str
    tokens: list[str]
    attention: list[float]  # pooling-token attention
    share: list[float]  # n_words * normalised attention over words (0 for special tokens)
    special: list[bool]
    dominant: list[bool]
    masked: list[bool]
    masked_text: str  # the re-encoded query (masked words removed)

    @property
    def dominant_words(self) -> list[str]:
        return [t for t, d in zip(self.tokens, self.dominant) if d]

    @property
    def masked_words(self) -> list[str]:
        return [t for t, m in zip(self.tokens, self.masked) if m]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "attention": self.attention,
            "share": self.share,
            "special": self.special,
            "dominant": self.dominant,
            "masked": self.masked,
            "dominant_words": self.dominant_words,
            "masked_words": self.masked_words,
            "masked_text": self.masked_text,
        }


@dataclass
class ImageExplanation:
    """CVE view of one image; every array is ``[h, w]`` over the token grid."""

    grid: tuple[int, int]
    attention: np.ndarray  # a_i
    share: np.ndarray  # N a_i
    neighbour_mean: np.ndarray  # m_i
    contrast: np.ndarray  # s_i - m_i
    treatment: np.ndarray  # str labels: context | target | retain | decay | suppress
    factor: np.ndarray  # f_i
    weights: np.ndarray  # re-weighted pooling weights w'_i

    def counts(self) -> dict[str, int]:
        return {name: int((self.treatment == name).sum()) for name in TREATMENTS}

    def to_dict(self) -> dict[str, Any]:
        def r(x: np.ndarray) -> list:
            return np.round(x.astype(np.float64), 6).tolist()

        return {
            "grid": list(self.grid),
            "attention": r(self.attention),
            "share": r(self.share),
            "neighbour_mean": r(self.neighbour_mean),
            "contrast": r(self.contrast),
            "treatment": self.treatment.tolist(),
            "factor": r(self.factor),
            "weights": r(self.weights),
            "counts": self.counts(),
        }


def token_strings(encoder: Encoder, ids: Sequence[int]) -> list[str]:
    """Readable strings of token ids: the encoder's `Encoder.token_strings`."""
    return [str(t) for t in encoder.token_strings([int(i) for i in ids])]


def join_tokens(tokens: Sequence[str]) -> str:
    """Tokens back to text (WordPiece ``##`` pieces glued to the previous token)."""
    out = ""
    for t in tokens:
        if t.startswith("##"):
            out += t[2:]
        else:
            out += (" " if out else "") + t
    return out


def explain_texts(cal: Calibrator, texts: list[str]) -> list[TextExplanation]:
    view, sel, _ = cal.text_calibration(texts)
    batch = view.batch
    out = []
    for i, text in enumerate(texts):
        real = batch.attention_mask[i].bool().cpu()
        ids = batch.input_ids[i].cpu()[real].tolist()
        tokens = token_strings(cal.encoder, ids)
        row = {
            name: t[i].detach().cpu()[real]
            for name, t in (
                ("special", batch.special_mask),
                ("masked", sel.masked),
                ("attention", view.attention),
                ("share", sel.share),
                ("dominant", sel.dominant),
            )
        }
        special, masked = row["special"].bool(), row["masked"]
        out.append(
            TextExplanation(
                text=text,
                tokens=tokens,
                attention=row["attention"].float().tolist(),
                share=row["share"].float().tolist(),
                special=special.tolist(),
                dominant=row["dominant"].tolist(),
                masked=masked.tolist(),
                masked_text=join_tokens(
                    [t for t, s, m in zip(tokens, special.tolist(), masked.tolist()) if not s and not m]
                ),
            )
        )
    return out


def explain_images(cal: Calibrator, pixels: torch.Tensor) -> list[ImageExplanation]:
    view, res = cal.image_calibration(pixels)
    h, w = res.grid

    def grid(t: torch.Tensor, i: int) -> np.ndarray:
        return t[i].detach().float().cpu().numpy().reshape(h, w)

    labels = np.asarray(TREATMENTS)
    return [
        ImageExplanation(
            grid=(h, w),
            attention=grid(view.attention, i),
            share=grid(res.share, i),
            neighbour_mean=grid(res.neighbour_mean, i),
            contrast=grid(res.contrast, i),
            treatment=labels[res.treatment[i].cpu().numpy().reshape(h, w)],
            factor=grid(res.factor, i),
            weights=grid(res.weights, i),
        )
        for i in range(view.pooled.shape[0])
    ]


def render(
    image: Image.Image,
    text: TextExplanation | None,
    explanation: ImageExplanation,
    out: str | Path,
    title: str = "",
) -> Path:
    """One PNG: the image, its attention heatmap, the treatment map, and the query with its
    dominant words highlighted (masked ones struck out in red)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    arr = np.asarray(image.convert("RGB"))
    height, width = arr.shape[:2]
    extent = (0, width, height, 0)
    fig = plt.figure(figsize=(12, 5.2 if text is not None else 4.4), dpi=110)
    top = fig.add_gridspec(2, 3, height_ratios=[4, 1 if text is not None else 0.05], hspace=0.15, wspace=0.05)
    panels = [fig.add_subplot(top[0, j]) for j in range(3)]
    panels[0].imshow(arr, extent=extent)
    panels[0].set_title("image")
    panels[1].imshow(arr, extent=extent)
    heat = panels[1].imshow(explanation.share, cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
    panels[1].set_title("attention share (N·a)")
    fig.colorbar(heat, ax=panels[1], fraction=0.046, pad=0.02)
    panels[2].imshow(arr, extent=extent)
    codes = np.vectorize(list(TREATMENTS).index)(explanation.treatment).astype(float)
    codes[codes == 0] = np.nan
    cmap = ListedColormap(["#ffffff"] + [TREATMENT_COLOURS[t] for t in TREATMENTS[1:]])
    panels[2].imshow(
        codes, cmap=cmap, vmin=-0.5, vmax=len(TREATMENTS) - 0.5, alpha=0.55, extent=extent, interpolation="nearest"
    )
    counts = explanation.counts()
    panels[2].legend(
        handles=[Patch(color=TREATMENT_COLOURS[t], label=f"{t} ({counts[t]})") for t in TREATMENTS[1:]],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=4,
        fontsize=7,
        frameon=False,
        handlelength=1.0,
    )
    panels[2].set_title("CVE treatment")
    for ax in panels:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    if text is not None:
        ax = fig.add_subplot(top[1, :])
        ax.axis("off")
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg canvas
        x, y = 0.0, 0.75
        words = [(t, d, m) for t, s, d, m in zip(text.tokens, text.special, text.dominant, text.masked) if not s]
        for i, (tok, dom, masked) in enumerate(words):
            glue = tok.startswith("##")
            label = tok[2:] if glue else tok
            if i and not glue:
                x += 0.008
            style: dict[str, Any] = {"fontsize": 12, "family": "DejaVu Sans"}
            if masked:
                style.update(color="white", bbox={"facecolor": "#d62728", "edgecolor": "none", "pad": 1.5})
            elif dom:
                style.update(bbox={"facecolor": "#ffbf00", "edgecolor": "none", "pad": 1.5})
            artist = ax.text(x, y, label, transform=ax.transAxes, va="center", **style)
            box = artist.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            x += box.width
            if x > 0.97:
                x, y = 0.0, y - 0.45
        ax.text(
            0.0,
            -0.05,
            "red: masked (dropped before re-encoding)   amber: dominant, kept",
            transform=ax.transAxes,
            fontsize=8,
            color="#555555",
        )
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
