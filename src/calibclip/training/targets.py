"""Training targets: *what* trains (module, loss, batches). The trainer (`calibclip.training.trainer`) owns
the loop, optimiser, schedule, checkpoints, validation and logs, and talks to a target only through
`Target`'s methods, so a second target (the re-ranker of issue 12) plugs in as another subclass.

- `CLIPTarget`: a `CLIP` encoder trained end to end on decoded images (heads / top N blocks / all).
- `StarterTarget`: the starter's upper blocks/layers and heads trained on cached lower activations.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclip.data.images import load_image
from calibclip.data.records import DatasetError, RetrievalDataset
from calibclip.evaluation.evaluator import cosine_similarity, dataset_metrics
from calibclip.models.base import Encoder
from calibclip.training.config import TrainSettings
from calibclip.training.objectives import DualEncoderObjective

CHECKPOINT_FORMAT = 1


@dataclass
class TrainData:
    """A training split as items: image ``i`` with its captions ``captions_of[i]``.

    ``identities``: person id (person datasets) or the image index (caption datasets);
    ``labels``: identities renumbered 0..C-1 (ID loss)."""

    dataset: RetrievalDataset
    captions_of: list[list[int]]
    identities: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @property
    def size(self) -> int:
        return len(self.dataset.images)


def check_dataset(ds: RetrievalDataset) -> None:
    """Clear errors for data a trainer cannot use (empty captions, images without captions)."""
    empty = [i for i, c in enumerate(ds.captions) if not str(c).strip()]
    if empty:
        raise DatasetError(
            f"{ds.name}/{ds.split}: {len(empty)} empty caption(s), e.g. caption {empty[0]} of image "
            f"{ds.images[int(ds.caption_image[empty[0]])]}; fix or remove them in the annotation file"
        )
    if len(ds.images) == 0:
        raise DatasetError(f"{ds.name}/{ds.split} has no images")
    counts = np.bincount(ds.caption_image, minlength=len(ds.images))
    if (counts == 0).any():
        first = int(np.flatnonzero(counts == 0)[0])
        raise DatasetError(
            f"{ds.name}/{ds.split}: {int((counts == 0).sum())} image(s) without a caption, e.g. "
            f"{ds.images[first]}; every training image needs at least one caption"
        )


def train_data(ds: RetrievalDataset) -> TrainData:
    check_dataset(ds)
    captions_of: list[list[int]] = [[] for _ in ds.images]
    for c, i in enumerate(ds.caption_image.tolist()):
        captions_of[i].append(c)
    person = ds.info.get("task") == "person"
    ids = torch.as_tensor(ds.image_ids if person else np.arange(len(ds.images)), dtype=torch.long)
    uniq, labels = torch.unique(ids, return_inverse=True)
    return TrainData(ds, captions_of, ids, labels, len(uniq))


class Target(ABC):
    """What a training run optimises. Item indices are images of the training split; ``captions`` are
    caption indices (one per item) and ``flips`` horizontal-flip flags chosen by the sampler."""

    name = "target"

    @abstractmethod
    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(pretrained parameters, new-module parameters)`` that train (new ones get the lr multiplier)."""

    @abstractmethod
    def loss(
        self, items: torch.Tensor, captions: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and its parts (floats)."""

    @abstractmethod
    def item_embeddings(self, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [N, D], text [N, D])`` embeddings of every training item (curriculum neighbour tables)."""

    @abstractmethod
    def validate(self, dataset: RetrievalDataset) -> dict[str, float]:
        """Metrics (percent) on a held-out split (`dataset_metrics` keys)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor that changes while training (resume state)."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state` (raises ValueError on a mismatch)."""

    @abstractmethod
    def export(self, folder: Path, info: dict[str, Any]) -> None:
        """Write a loadable checkpoint folder (``create_model(folder)``)."""

    def train(self, mode: bool = True) -> None:  # noqa: B027  (optional hook)
        """Switch dropout etc. (default: nothing)."""


def _write_folder(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Atomically (re)place ``folder`` with ``model.safetensors`` + ``config.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(tmp / "model.safetensors"),
        metadata=metadata,
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    for f in (tmp / "model.safetensors", tmp / "config.json"):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


class DualEncoderTarget(Target):
    """Shared part of dual-encoder targets: the objective, validation by cosine similarity, and the
    resume state (``self.encoder``'s parameters named in ``self.train_names`` + the objective)."""

    name = "dual_encoder"
    encoder: Any
    train_names: list[str]

    def __init__(self, settings: TrainSettings, data: TrainData, embed_dim: int):
        self.settings = settings
        self.data = data
        person = data.dataset.info.get("task") == "person"
        weights = dict(settings.losses)
        if not person and weights.get("id"):
            raise ValueError("training.losses.id needs identity labels: only person-retrieval datasets have them")
        self.objective = DualEncoderObjective(
            weights,
            settings.temperature,
            settings.sdm_temperature,
            embed_dim,
            data.num_classes,
            settings.learn_temperature,
        )

    def objective_loss(
        self, img: torch.Tensor, txt: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self.objective.to(img.device)
        return self.objective(
            img, txt, self.data.identities[items].to(img.device), self.data.labels[items].to(img.device)
        )

    def new_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.objective.parameters() if p.requires_grad]

    def metrics_from(self, txt: torch.Tensor, img: torch.Tensor, dataset: RetrievalDataset) -> dict[str, float]:
        return {k: float(v) for k, v in dataset_metrics(cosine_similarity(txt, img), dataset).items()}

    def state(self) -> dict[str, torch.Tensor]:
        params = dict(self.encoder.named_parameters())
        out = {f"encoder.{n}": params[n].detach().clone() for n in self.train_names}
        out.update({f"objective.{k}": v.detach().clone() for k, v in self.objective.state_dict().items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.encoder.named_parameters())
        expected = {f"encoder.{n}" for n in self.train_names} | {f"objective.{k}" for k in self.objective.state_dict()}
        if set(tensors) != expected:
            raise ValueError(
                f"training state does not fit this model: {len(set(expected) - set(tensors))} missing, "
                f"{len(set(tensors) - expected)} unexpected tensors (e.g. "
                f"{sorted(set(expected) ^ set(tensors))[:3]})"
            )
        with torch.no_grad():
            for n in self.train_names:
                if params[n].shape != tensors[f"encoder.{n}"].shape:
                    raise ValueError(
                        f"training state: {n} has shape {tuple(tensors[f'encoder.{n}'].shape)}, "
                        f"model {tuple(params[n].shape)}"
                    )
                params[n].copy_(tensors[f"encoder.{n}"])
        self.objective.load_state_dict(
            {k[len("objective.") :]: v for k, v in tensors.items() if k.startswith("objective.")}
        )


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------
def clip_trainable(model: Any, trainable: str, top_blocks: int) -> list[str]:
    """Names of the CLIP parameters that train: ``heads`` (projections and final norms), ``top``
    (heads + the last ``top_blocks`` blocks of each tower) or ``all``."""
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        return [n for n in names if n != "logit_scale"]
    vit = hasattr(model.visual, "transformer")
    heads = {"text_projection", "ln_final.weight", "ln_final.bias"}
    heads |= (
        {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}
        if vit
        else {n for n in names if n.startswith("visual.attnpool.")}
    )
    prefixes: list[str] = []
    if trainable == "top":
        if top_blocks < 1:
            raise ValueError("training.trainable: top needs training.top_blocks >= 1")
        n_text = len(model.transformer.resblocks)
        prefixes += [f"transformer.resblocks.{i}." for i in range(max(0, n_text - top_blocks), n_text)]
        if vit:
            n_vis = len(model.visual.transformer.resblocks)
            prefixes += [f"visual.transformer.resblocks.{i}." for i in range(max(0, n_vis - top_blocks), n_vis)]
        else:
            blocks = [
                f"visual.layer{s}.{b}." for s in (1, 2, 3, 4) for b in range(len(getattr(model.visual, f"layer{s}")))
            ]
            prefixes += blocks[-top_blocks:]
    return [n for n in names if n in heads or any(n.startswith(p) for p in prefixes)]


class CLIPTarget(DualEncoderTarget):
    """A `CLIP` trained end to end on decoded images (BatchNorm statistics stay frozen: eval mode)."""

    def __init__(self, encoder: Encoder, settings: TrainSettings, data: TrainData):
        from calibclip.models.clip import CLIP

        if not isinstance(encoder, CLIP):
            raise TypeError(f"CLIPTarget trains CLIP models, got {type(encoder).__name__}")
        super().__init__(settings, data, encoder.embed_dim)
        self.encoder = encoder.float()
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.objective.to(self.encoder.device)
        self.train_names = clip_trainable(encoder, settings.trainable, settings.top_blocks)
        params = dict(encoder.named_parameters())
        for n in self.train_names:
            params[n].requires_grad_(True)
        if settings.grad_checkpointing:
            self.encoder.transformer.grad_checkpointing = True
            if hasattr(self.encoder.visual, "transformer"):
                self.encoder.visual.transformer.grad_checkpointing = True

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        params = dict(self.encoder.named_parameters())
        return [params[n] for n in self.train_names], self.new_parameters()

    def _pixels(self, items: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        images = self.data.dataset.images
        pixels = torch.stack([self.encoder.preprocess(load_image(images[int(i)])) for i in items])
        pixels = torch.where(flips[:, None, None, None], pixels.flip(-1), pixels)
        return pixels.to(self.encoder.positional_embedding.device)

    def loss(
        self, items: torch.Tensor, captions: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        texts = [self.data.dataset.captions[int(c)] for c in captions]
        ids = self.encoder.tokenize(texts).input_ids.to(self.encoder.positional_embedding.device)
        img, txt = self.encoder(self._pixels(items, flips), ids)
        return self.objective_loss(img, txt, items)

    def _encode(self, images: list[Path], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.settings.eval_batch_size
        img = torch.as_tensor(self.encoder.encode(images=images, batch_size=bs))
        txt = torch.as_tensor(self.encoder.encode(texts=captions, batch_size=bs))
        return img, txt

    def item_embeddings(self, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode(list(self.data.dataset.images), [self.data.dataset.captions[int(c)] for c in captions])

    def validate(self, dataset: RetrievalDataset) -> dict[str, float]:
        img, txt = self._encode(list(dataset.images), list(dataset.captions))
        return self.metrics_from(txt, img, dataset)

    def export(self, folder: Path, info: dict[str, Any]) -> None:
        save_clip(self.encoder, folder, info, logit_scale=self.objective.logit_scale.detach().reshape(()))


def save_clip(
    encoder: Any, folder: str | Path, info: dict[str, Any] | None = None, logit_scale: torch.Tensor | None = None
) -> None:
    """Write a `CLIP` as a checkpoint folder (``model.safetensors`` with OpenAI names + ``config.json`` with
    its activation, heads, input geometry and preprocessing) that ``create_model(folder)`` loads back."""
    cfg = encoder.cfg
    state = {k: v.detach().float() for k, v in encoder.state_dict().items()}
    if logit_scale is not None:
        state["logit_scale"] = logit_scale.detach().clone().float()
    config = {
        "architecture": "CLIP",
        "format": CHECKPOINT_FORMAT,
        "vision_config": {"hidden_act": cfg.act, "num_attention_heads": cfg.vision_heads},
        "text_config": {"hidden_act": cfg.act, "num_attention_heads": cfg.text_heads},
        "calibclip": {
            "image_size": list(cfg.image_size),
            "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std),
            "resize_mode": cfg.resize_mode,
            "model": cfg.to_dict(),
        },
        "training": info or {},
    }
    _write_folder(Path(folder), state, config)


# --------------------------------------------------------------------------------------------
# starter (cached lower part)
# --------------------------------------------------------------------------------------------
class StarterTarget(DualEncoderTarget):
    """The starter's top MBConv block(s) + conv head of each backbone, top MiniLM layer(s) and linear heads,
    trained on the cached activations of the frozen lower part (`calibclip.training.starter_cache`)."""

    name = "dual_encoder"

    def __init__(
        self,
        encoder: Encoder,
        settings: TrainSettings,
        data: TrainData,
        cache_dir: Path,
        eval_sets: list[RetrievalDataset],
    ):
        from calibclip.models.starter import Starter
        from calibclip.models.starter_parts import (
            image_split_index,
            upper_parameter_names,
        )

        if not isinstance(encoder, Starter):
            raise TypeError(f"StarterTarget trains the starter, got {type(encoder).__name__}")
        if settings.trainable == "all":
            raise ValueError(
                "the starter trains on cached lower activations: use training.trainable heads or top "
                "(training.starter.image_blocks / text_layers set how much of the towers trains)"
            )
        super().__init__(settings, data, encoder.embed_dim)
        opts = settings.starter
        image_blocks, text_layers = opts.image_blocks, opts.text_layers
        if settings.trainable == "top" and settings.top_blocks > 0:
            image_blocks = text_layers = settings.top_blocks
        n_layers = len(encoder.text_tower.encoder.layer)  # type: ignore[arg-type]
        if not 0 <= text_layers <= n_layers:
            raise ValueError(f"training.starter.text_layers must be in [0, {n_layers}], got {text_layers}")
        self.encoder = encoder.float()
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.objective.to(self.encoder.device)
        self.image_blocks, self.text_layers = image_blocks, text_layers
        self.splits = [image_split_index(net, image_blocks) for net in encoder.image_tower.nets]
        self.n_lower = n_layers - text_layers
        prefixes = ["image_head.", "text_head."]
        if settings.trainable == "top":
            prefixes += upper_parameter_names(encoder.image_tower, image_blocks, text_layers, n_layers)
        self.train_names = [n for n, _ in encoder.named_parameters() if any(n.startswith(p) for p in prefixes)]
        params = dict(encoder.named_parameters())
        for n in self.train_names:
            params[n].requires_grad_(True)
        self.encoder.image_head.dropout.p = opts.head_dropout
        self.cache_dir = Path(cache_dir)
        self.train_cache = self._cache(data.dataset)
        self.eval_caches = {(d.name, d.split): self._cache(d) for d in eval_sets}
        if not settings.augment_flip:
            raise ValueError(
                "the starter is trained with flip augmentation (its features are flip-averaged); "
                "keep training.augment_flip: true"
            )

    def _cache(self, ds: RetrievalDataset):
        from calibclip.training.starter_cache import (
            LowerImages,
            LowerTexts,
            extract_image_lower,
            extract_text_lower,
        )

        base = self.cache_dir / f"{ds.name}-{ds.split}"
        bb = self.encoder.backbones
        hw = self.encoder.image_tower.image_hw
        pre = self.encoder.preprocess
        geometry = "" if hw is None and pre.mode == "clip" else f"-{pre.mode}{pre.size[0]}x{pre.size[1]}"
        img = extract_image_lower(
            ds.images,
            base / f"images-{self.image_blocks}-{'+'.join(bb)}{geometry}",
            bb,
            self.image_blocks,
            batch_size=self.settings.starter.extract_batch_size,
            desc=f"{ds.split} images",
            transform=pre,
            image_hw=hw,
        )
        txt = extract_text_lower(ds.captions, base / f"text-{self.n_lower}", self.n_lower, desc=f"{ds.split} captions")
        return LowerImages(img, bb), LowerTexts(txt)

    def train(self, mode: bool = True) -> None:
        self.encoder.image_head.train(mode)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        params = dict(self.encoder.named_parameters())
        return [params[n] for n in self.train_names], self.new_parameters()

    def _image(self, cache, items: torch.Tensor, flips: torch.Tensor | bool) -> torch.Tensor:
        from calibclip.models.starter_parts import tower_upper

        dev = self.encoder.device
        lowers = [x.to(dev) for x in cache.get(items, flips)]
        return tower_upper(self.encoder.image_tower, lowers, self.splits).mean((2, 3))

    def _text(self, cache, captions: torch.Tensor) -> torch.Tensor:
        from calibclip.models.starter import minilm_pool
        from calibclip.models.starter_parts import text_upper

        hidden, mask = (t.to(self.encoder.device) for t in cache.get(captions))
        pooled = minilm_pool(text_upper(self.encoder.text_tower, hidden, mask, self.n_lower), mask)
        return F.normalize(pooled, dim=-1) if self.encoder.text_normalize else pooled

    def loss(
        self, items: torch.Tensor, captions: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        img_cache, txt_cache = self.train_cache
        img = self.encoder.image_head(self._image(img_cache, items, flips))
        txt = self.encoder.text_head(self._text(txt_cache, captions))
        return self.objective_loss(img, txt, items)

    @torch.inference_mode()
    def _embed_all(
        self, img_cache, txt_cache, captions: torch.Tensor, n_images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        was = self.encoder.image_head.training
        self.encoder.image_head.eval()
        bs = max(64, self.settings.eval_batch_size)
        imgs = []
        for s in range(0, n_images, bs):
            idx = torch.arange(s, min(n_images, s + bs))
            pooled = self._image(img_cache, idx, False)
            if self.encoder.flip_average:
                pooled = 0.5 * (pooled + self._image(img_cache, idx, True))
            imgs.append(self.encoder.image_head(pooled).float().cpu())
        order = torch.argsort(txt_cache.lengths[captions], descending=True, stable=True)
        txt = torch.empty(len(captions), self.encoder.embed_dim)
        for s in range(0, len(captions), 256):
            idx = order[s : s + 256]
            txt[idx] = self.encoder.text_head(self._text(txt_cache, captions[idx])).float().cpu()
        self.encoder.image_head.train(was)
        return torch.cat(imgs), txt

    def item_embeddings(self, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_cache, txt_cache = self.train_cache
        return self._embed_all(img_cache, txt_cache, captions, self.data.size)

    def validate(self, dataset: RetrievalDataset) -> dict[str, float]:
        img_cache, txt_cache = self.eval_caches[(dataset.name, dataset.split)]
        img, txt = self._embed_all(img_cache, txt_cache, torch.arange(len(dataset.captions)), len(dataset.images))
        return self.metrics_from(txt, img, dataset)

    def export(self, folder: Path, info: dict[str, Any]) -> None:
        from calibclip.models.starter import TOWER_FORMAT, head_state

        enc = self.encoder
        tensors = head_state(enc.image_head, enc.text_head, self.objective.logit_scale)
        own = enc.state_dict()
        tower = [n for n in self.train_names if n.startswith(("image_tower.", "text_tower."))]
        for n in tower:
            tensors[n] = own[n].detach().float().contiguous().clone()
        meta = {
            **enc.meta,
            "format": TOWER_FORMAT if tower else enc.meta.get("format", "1"),
            "image_blocks": str(self.image_blocks if tower else 0),
            "text_layers": str(self.text_layers if tower else 0),
            "dev_metrics": json.dumps(info.get("val_metrics", {})),
            "command": str(info.get("command", "")),
        }
        config = {"architecture": "starter", "format": CHECKPOINT_FORMAT, "starter": enc.config(), "training": info}
        _write_folder(folder, tensors, config, metadata={k: str(v) for k, v in meta.items()})
