"""The CLIP4Cir Combiner (Baldrati et al., CVPR 2022 workshops / CVPR 2022) and its checkpoints.

Over frozen, raw encoder features of the reference image and the modification text:

    t' = Dropout(ReLU(W_t t)),  i' = Dropout(ReLU(W_i i))           (projection_dim each)
    c  = [t'; i']
    mlp    = W_o Dropout(ReLU(W_c c))                                 (hidden_dim -> feature_dim)
    lambda = Sigmoid(W_2 Dropout(ReLU(W_1 c)))                        (a scalar per query)
    query  = normalize(mlp + lambda * t + (1 - lambda) * i)

``normalize_inputs=True`` (a calibclip option) L2-normalises ``i`` and ``t`` first and starts the
MLP branch at zero, so an untrained Combiner is the normalised sum and training refines it; it
matters for encoders whose towers have very different feature norms (starter: image ~25, text ~12).

Training uses a batch-based contrastive loss with CLIP4Cir's *fixed* logit scale of 100.

Checkpoints hold no pickled code: ``.pt`` files are plain dicts of tensors/strings/numbers
(``torch.load(weights_only=True)``), ``.safetensors`` files keep the config in their metadata.
Both record the fingerprint of the encoder whose features the Combiner was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: CLIP4Cir's fixed logit scale for the contrastive loss.
LOGIT_SCALE = 100.0
CHECKPOINT_FORMAT = "calibclip-combiner/1"


class Combiner(nn.Module):
    """Fuses reference-image and text features into an L2-normalised query feature."""

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int,
        hidden_dim: int,
        dropout: float = 0.5,
        logit_scale: float = LOGIT_SCALE,
        normalize_inputs: bool = False,
    ):
        super().__init__()
        self.normalize_inputs = bool(normalize_inputs)
        self.feature_dim, self.projection_dim, self.hidden_dim = feature_dim, projection_dim, hidden_dim
        self.dropout_p, self.logit_scale = dropout, logit_scale
        self.text_projection = nn.Linear(feature_dim, projection_dim)
        self.image_projection = nn.Linear(feature_dim, projection_dim)
        self.dropout_text = nn.Dropout(dropout)
        self.dropout_image = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.dropout_hidden = nn.Dropout(dropout)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )
        if self.normalize_inputs:  # start at the normalised sum: the MLP branch adds nothing yet
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)

    @classmethod
    def for_features(cls, feature_dim: int, proj_mult: float = 4, hidden_mult: float = 8, **kwargs: Any) -> Combiner:
        """CLIP4Cir sizing: projection = ``proj_mult`` x and hidden = ``hidden_mult`` x the feature size."""
        return cls(feature_dim, int(round(feature_dim * proj_mult)), int(round(feature_dim * hidden_mult)), **kwargs)

    def config(self) -> dict[str, Any]:
        return {
            "feature_dim": self.feature_dim,
            "projection_dim": self.projection_dim,
            "hidden_dim": self.hidden_dim,
            "dropout": self.dropout_p,
            "logit_scale": self.logit_scale,
            "normalize_inputs": self.normalize_inputs,
        }

    def mix(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised combined feature and the text weight lambda ``[B, 1]``."""
        if self.normalize_inputs:
            image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        t = self.dropout_text(F.relu(self.text_projection(text)))
        i = self.dropout_image(F.relu(self.image_projection(image)))
        joint = torch.cat([t, i], dim=-1)
        mlp = self.output_layer(self.dropout_hidden(F.relu(self.combiner_layer(joint))))
        lam = self.dynamic_scalar(joint)
        return mlp + lam * text + (1 - lam) * image, lam

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Raw image and text features ``[B, D]`` -> L2-normalised query features ``[B, D]``."""
        return F.normalize(self.mix(image, text)[0], dim=-1)

    def loss(
        self, image: torch.Tensor, text: torch.Tensor, target: torch.Tensor, target_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Batch-based contrastive loss: each query against every target of the batch.
        ``target_ids`` (gallery index of each target): another query's target that is the same
        image as this query's is not counted as a negative."""
        logits = self.logit_scale * self(image, text) @ F.normalize(target, dim=-1).T
        if target_ids is not None:
            same = target_ids[:, None] == target_ids[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def combiner_record(combiner: Combiner, encoder_fingerprint: str, **extra: Any) -> dict[str, Any]:
    """The plain dict saved as a ``.pt`` checkpoint (loadable with ``weights_only=True``)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": combiner.config(),
        "encoder_fingerprint": encoder_fingerprint,
        "state_dict": {k: v.detach().cpu().clone() for k, v in combiner.state_dict().items()},
        **extra,
    }


def save_combiner(path: str | Path, combiner: Combiner, encoder_fingerprint: str, **extra: Any) -> Path:
    """Write a checkpoint: ``.safetensors`` (config in the metadata) or anything else as a plain
    ``torch.save`` dict. ``extra`` must be JSON-able (for safetensors) / plain data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(combiner.config()),
            "encoder_fingerprint": encoder_fingerprint,
            "extra": json.dumps(extra, default=str),
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in combiner.state_dict().items()}, str(tmp), metadata=meta)
    else:
        torch.save(combiner_record(combiner, encoder_fingerprint, **extra), tmp)
    tmp.replace(path)
    return path


def read_combiner_checkpoint(path: str | Path) -> dict[str, Any]:
    """``{"config", "state_dict", "encoder_fingerprint", ...}`` from a checkpoint file (or a run
    directory, which means its ``best.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"Combiner checkpoint {path} not found; pass RUN_DIR/best.pt written by "
            "`calibclip train-combiner` (or a .safetensors Combiner file)"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if "config" not in meta:
            raise ValueError(f"{path} has no Combiner config in its metadata; it was not written by save_combiner")
        return {
            "config": json.loads(meta["config"]),
            "state_dict": state,
            "encoder_fingerprint": meta.get("encoder_fingerprint", ""),
            **json.loads(meta.get("extra", "{}")),
        }
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, ...
        raise ValueError(f"cannot read Combiner checkpoint {path}: {exc}") from exc
    if not isinstance(record, dict) or "config" not in record or "state_dict" not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path} is not a Combiner checkpoint (found {keys}; expected config and state_dict)")
    return record


def load_combiner(path: str | Path, encoder: Any = None, device: str | torch.device = "cpu") -> Combiner:
    """Load a Combiner in eval mode. ``encoder`` (an `Encoder` or a fingerprint string): refuse a
    checkpoint trained on another encoder's features."""
    record = read_combiner_checkpoint(path)
    if encoder is not None:
        want = encoder if isinstance(encoder, str) else encoder.fingerprint()
        have = record.get("encoder_fingerprint", "")
        if have and have != want:
            raise ValueError(
                f"Combiner {path} was trained on features of encoder {have}, but the encoder in use is "
                f"{want}; use the same --model as for training or train a Combiner for this encoder"
            )
    from calibclip.models.checkpoints import check_finite

    check_finite({k: v for k, v in record["state_dict"].items() if isinstance(v, torch.Tensor)}, f"Combiner {path}")
    cfg = record["config"]
    combiner = Combiner(
        int(cfg["feature_dim"]),
        int(cfg["projection_dim"]),
        int(cfg["hidden_dim"]),
        float(cfg.get("dropout", 0.5)),
        float(cfg.get("logit_scale", LOGIT_SCALE)),
        bool(cfg.get("normalize_inputs", False)),
    )
    combiner.load_state_dict(record["state_dict"])
    combiner.encoder_fingerprint = record.get("encoder_fingerprint", "")
    return combiner.to(device).eval()


def export_combiner(src: str | Path, dst: str | Path, half: bool = True, **extra: Any) -> Path:
    """Write checkpoint ``src`` (``.pt`` or a run directory) as a ``.safetensors`` Combiner file, in
    float16 by default (half the size; loading casts back to float32). ``extra``: JSON-able notes
    stored in the metadata (e.g. the training command)."""
    record = read_combiner_checkpoint(src)
    cfg = record["config"]
    combiner = Combiner(
        int(cfg["feature_dim"]),
        int(cfg["projection_dim"]),
        int(cfg["hidden_dim"]),
        float(cfg.get("dropout", 0.5)),
        float(cfg.get("logit_scale", LOGIT_SCALE)),
        bool(cfg.get("normalize_inputs", False)),
    )
    combiner.load_state_dict(record["state_dict"])
    if half:
        combiner = combiner.half()
    keep = {k: record[k] for k in ("epoch", "metrics", "dataset", "encoder_name", "train_config") if k in record}
    return save_combiner(
        Path(dst).with_suffix(".safetensors"), combiner, record.get("encoder_fingerprint", ""), **keep, **extra
    )
