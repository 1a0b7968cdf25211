"""Training of the ``starter`` heads on Flickr8k (LiT-style: frozen towers, cached features).

Steps (`train_starter`):
1. Extract and cache the pooled image features of every backbone, for each image and its
   mirror image, in shards under ``RUN_DIR/features/<split>/`` (resumable: existing shards are
   kept, so killing and re-running continues), and the MiniLM caption features.
2. Train a linear image head and a linear text head with a symmetric contrastive loss and a
   learnable temperature: batches of distinct images with one random caption each, dropout
   on the standardised image features, a random choice of original/mirrored features per
   image, AdamW with a cosine schedule.
3. Evaluate text->image R@1 on the dev split after every epoch (test-time flip averaging,
   as `Starter.encode_image` does) and keep the best epoch.
4. Write ``RUN_DIR/starter.safetensors``, ``train_log.csv``, ``train_log.json`` and ``train_curves.png``.

Only the ``train`` and ``dev`` splits are ever read.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclip.data.captions import load_flickr8k
from calibclip.data.images import load_image
from calibclip.data.transforms import TFLITE_MEAN, TFLITE_STD, ImageTransform
from calibclip.models.starter import (
    BACKBONE_DIM,
    BACKBONES,
    TEXT_DIM,
    MiniLM,
    StandardizedLinear,
    StarterImageTower,
    head_state,
    minilm_pool,
    minilm_tokenize,
    save_heads,
)
from calibclip.utils import progress_bar

SPLITS = ("train", "dev")
SHARD = 256


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_starter` (the defaults are the committed recipe)."""

    backbones: tuple[str, ...] = ("lite0", "lite2")
    seed: int = 0
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 1e-3
    embed_dim: int = 512
    dropout: float = 0.5
    init_temperature: float = 0.07
    flip: bool = True
    text_normalize: bool = True
    extract_batch_size: int = 16
    workers: int = 2


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------
def recall_at_k(sim: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (in %) both ways of a ``[captions, images]`` similarity matrix, keys ``t2i_r1`` ...
    ``i2t_r10`` (the project's `caption_metrics`, so the numbers match ``calibclip evaluate``)."""
    from calibclip.evaluation.metrics import caption_metrics

    out = caption_metrics(sim, caption_image, ks)
    return {k.replace("_R@", "_r"): v for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# Feature extraction (cached, resumable)
# ----------------------------------------------------------------------------------------
def _preprocess_for(backbones: Sequence[str]) -> ImageTransform:
    size = max(BACKBONES[b][1] for b in backbones)
    return ImageTransform(size=(size, size), mode="clip", mean=TFLITE_MEAN, std=TFLITE_STD, resample="bicubic")


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            raise RuntimeError(
                f"feature cache {folder} was made with different settings (images/backbones/preprocessing); "
                f"use another --out or delete {folder}"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))


def extract_image_features(
    images: Sequence[Path],
    folder: Path,
    backbones: Sequence[str],
    flip: bool = True,
    batch_size: int = 16,
    workers: int = 2,
    desc: str = "images",
) -> dict[str, torch.Tensor]:
    """Pooled features ``{backbone: [N, 1280], backbone + "_flip": [N, 1280]}`` of ``images``,
    computed with `StarterImageTower` (exactly the encoder's image path) and cached in shards
    of 256 images under ``folder`` (existing shards are reused: the extraction resumes)."""
    from safetensors.torch import load_file, save_file

    transform = _preprocess_for(backbones)
    manifest = {
        "images": [Path(p).name for p in images],
        "backbones": list(backbones),
        "flip": flip,
        "preprocess": transform.describe(),
        "shard": SHARD,
    }
    _check_manifest(folder, manifest)
    n_shards = math.ceil(len(images) / SHARD)
    todo = [s for s in range(n_shards) if not (folder / f"{s:05d}.safetensors").exists()]
    tower: StarterImageTower | None = None

    def run_chunk(chunk: Sequence[Path]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([transform(load_image(p)) for p in chunk])
        views = {"": pixels, "_flip": pixels.flip(-1)} if flip else {"": pixels}
        out = {}
        assert tower is not None  # built before the first chunk runs
        with torch.inference_mode():
            for suffix, x in views.items():
                pooled = tower(x).mean((2, 3))
                for i, b in enumerate(backbones):
                    out[b + suffix] = pooled[:, i * BACKBONE_DIM : (i + 1) * BACKBONE_DIM]
        return out

    bar = progress_bar(
        total=len(images), desc=desc, initial=len(images) - sum(len(images[s * SHARD : (s + 1) * SHARD]) for s in todo)
    )
    threads = torch.get_num_threads()
    # one intra-op thread per worker, chunks in parallel: robust on a shared, busy CPU
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for s in _claimed(folder, todo):
                if tower is None:
                    tower = StarterImageTower(backbones)
                paths = list(images[s * SHARD : (s + 1) * SHARD])
                chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
                parts: dict[str, list[torch.Tensor]] = {}
                for chunk, out in zip(chunks, pool.map(run_chunk, chunks)):
                    for k, v in out.items():
                        parts.setdefault(k, []).append(v)
                    bar.update(len(chunk))
                tmp = folder / f"{s:05d}.{os.getpid()}.tmp"
                save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, str(tmp))
                os.replace(tmp, folder / f"{s:05d}.safetensors")
                (folder / f"{s:05d}.lock").unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    bar.close()
    shards = [load_file(str(folder / f"{s:05d}.safetensors")) for s in range(n_shards)]
    return {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claimed(folder: Path, shards: Sequence[int]) -> Iterator[int]:
    """Yield the shards this process should compute, claiming each with an exclusive lock file,
    so several processes can extract into one cache at once (a dead owner's lock is taken over);
    return once every shard exists."""
    pending = list(shards)
    while pending:
        waiting = []
        for s in pending:
            done, lock = folder / f"{s:05d}.safetensors", folder / f"{s:05d}.lock"
            if done.exists():
                continue
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = int(lock.read_text() or 0)
                except (OSError, ValueError):
                    owner = 0
                try:
                    being_written = owner == 0 and time.time() - lock.stat().st_mtime < 10
                except FileNotFoundError:
                    being_written = False
                if being_written or (owner and owner != os.getpid() and _pid_alive(owner)):
                    waiting.append(s)
                else:  # stale lock of a killed run
                    lock.unlink(missing_ok=True)
                    waiting.append(s)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            if done.exists():  # finished by another process between the checks
                lock.unlink(missing_ok=True)
                continue
            yield s
        pending = waiting
        if pending:
            time.sleep(1.0)


def extract_text_features(
    captions: Sequence[str], path: Path, batch_size: int = 128, desc: str = "captions"
) -> torch.Tensor:
    """MiniLM mean-pooled (un-normalised) caption features ``[N, 384]``, cached in ``path``."""
    from safetensors.torch import load_file, save_file

    key_file = path.with_suffix(".key")
    if path.exists() and key_file.exists() and key_file.read_text() == _caption_key(captions):
        return load_file(str(path))["features"]
    model = MiniLM()
    order = np.argsort([-len(c) for c in captions], kind="stable")
    out = torch.empty(len(captions), TEXT_DIM)
    bar = progress_bar(total=len(captions), desc=desc)
    with torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            idx = order[start : start + batch_size]
            batch = minilm_tokenize([captions[i] for i in idx])
            hidden, _ = model(batch.input_ids, batch.attention_mask)
            out[torch.as_tensor(idx)] = minilm_pool(hidden, batch.attention_mask)
            bar.update(len(idx))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": out}, str(tmp))
    os.replace(tmp, path)
    key_file.write_text(_caption_key(captions))
    return out


def _caption_key(captions: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(captions).encode()).hexdigest()


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def _standardize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0)
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)


def _text_input(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(features, dim=-1) if normalize else features


class _Heads(nn.Module):
    def __init__(self, image_dim: int, cfg: TrainConfig):
        super().__init__()
        self.image_head = StandardizedLinear(image_dim, cfg.embed_dim, dropout=cfg.dropout)
        self.text_head = StandardizedLinear(TEXT_DIM, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        a = F.normalize(self.image_head(img), dim=-1)
        b = F.normalize(self.text_head(txt), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * a @ b.t()
        labels = torch.arange(len(a))
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.inference_mode()
def evaluate_heads(
    heads: _Heads, image_feats: torch.Tensor, text_feats: torch.Tensor, caption_image: torch.Tensor
) -> dict[str, float]:
    """Dev metrics of the heads on cached features (``image_feats`` already flip-averaged)."""
    was_training = heads.training
    heads.eval()
    a = F.normalize(heads.image_head(image_feats), dim=-1)
    b = F.normalize(heads.text_head(text_feats), dim=-1)
    heads.train(was_training)
    return recall_at_k(b @ a.t(), caption_image)


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    for key in ("t2i_r1", "t2i_r5", "i2t_r1"):
        ax2.plot(epochs, [h[key] for h in history], label=key)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("dev recall (%)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _set_seed(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit_heads(
    train_img: dict[str, torch.Tensor],
    train_txt: torch.Tensor,
    train_cap_img: torch.Tensor,
    dev_img: dict[str, torch.Tensor],
    dev_txt: torch.Tensor,
    dev_cap_img: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = True,
) -> tuple[_Heads, list[dict[str, Any]], int]:
    """Train the heads on cached features; returns (best heads, per-epoch history, best epoch).

    ``*_img``: ``{"orig": [N, C], "flip": [N, C]}`` pooled backbone features."""
    gen = _set_seed(cfg.seed)
    views = [train_img["orig"], train_img["flip"]] if cfg.flip else [train_img["orig"]]
    dev_view = 0.5 * (dev_img["orig"] + dev_img["flip"]) if cfg.flip else dev_img["orig"]
    txt = _text_input(train_txt, cfg.text_normalize)
    dev_t = _text_input(dev_txt, cfg.text_normalize)
    heads = _Heads(views[0].shape[1], cfg)
    heads.image_head.mean, heads.image_head.std = _standardize_stats(torch.cat(views))
    heads.text_head.mean, heads.text_head.std = _standardize_stats(txt)
    n_img = views[0].shape[0]
    captions_of = [torch.nonzero(train_cap_img == i).flatten() for i in range(n_img)]
    counts = torch.tensor([len(c) for c in captions_of])
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} training images have no caption")
    padded = torch.nn.utils.rnn.pad_sequence(captions_of, batch_first=True)
    steps_per_epoch = math.ceil(n_img / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, {})
    bar = progress_bar(total=cfg.epochs, desc="epochs", disable=not progress)
    heads.train()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n_img, generator=gen)
        pick = (torch.rand(n_img, generator=gen) * counts[perm]).long()
        caps = padded[perm, pick]
        view = torch.randint(len(views), (n_img,), generator=gen)
        losses = []
        for start in range(0, n_img, cfg.batch_size):
            idx, cidx, vidx = (
                perm[start : start + cfg.batch_size],
                caps[start : start + cfg.batch_size],
                view[start : start + cfg.batch_size],
            )
            img = torch.where((vidx == 1)[:, None], views[-1][idx], views[0][idx])
            loss = heads.loss(img, txt[cidx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        metrics = evaluate_heads(heads, dev_view, dev_t, dev_cap_img)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "temperature": float(1 / heads.logit_scale.detach().exp()),
            "lr": float(sched.get_last_lr()[0]),
            **metrics,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if metrics["t2i_r1"] > best[0]:
            best = (metrics["t2i_r1"], epoch, {k: v.detach().clone() for k, v in heads.state_dict().items()})
        bar.set_postfix(t2i_r1=f"{metrics['t2i_r1']:.1f}", best=f"{best[0]:.1f}@{best[1]}")
        bar.update(1)
    bar.close()
    heads.load_state_dict(best[2])
    heads.eval()
    return heads, history, best[1]


def load_split_features(
    data_root: str | Path, run_dir: Path, split: str, cfg: TrainConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(image features {"orig", "flip"} [N, C] concatenated over ``cfg.backbones``, caption
    features [M, 384], caption->image index [M]) of a train/dev split, extracting what is missing."""
    if split not in SPLITS:
        raise ValueError(f"the starter is trained and selected on {SPLITS} only, not {split!r}")
    ds = load_flickr8k(data_root, split)
    # the default set is cached under features/<split>; any other set in its own folder
    folder = split if tuple(cfg.backbones) == ALL_BACKBONES else f"{split}-{'+'.join(cfg.backbones)}"
    feats = extract_image_features(
        ds.images,
        run_dir / "features" / folder,
        cfg.backbones,
        flip=True,
        batch_size=cfg.extract_batch_size,
        workers=cfg.workers,
        desc=f"{split} images",
    )
    img = {
        "orig": torch.cat([feats[b] for b in cfg.backbones], 1),
        "flip": torch.cat([feats[b + "_flip"] for b in cfg.backbones], 1),
    }
    txt = extract_text_features(
        ds.captions, run_dir / "features" / f"{split}_captions.safetensors", desc=f"{split} captions"
    )
    return img, txt, torch.as_tensor(ds.caption_image, dtype=torch.long)


#: The default backbone set (its features are cached under ``features/<split>``).
ALL_BACKBONES = ("lite0", "lite2")


def train_starter(data_root: str | Path, run_dir: str | Path, cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Extract/cached features, train, select by dev text->image R@1, write the run outputs.

    Returns the summary also written to ``RUN_DIR/train_log.json``."""
    unknown = [b for b in cfg.backbones if b not in ALL_BACKBONES]
    if unknown or not cfg.backbones:
        raise ValueError(
            f"--backbones must be a comma-separated subset of {list(ALL_BACKBONES)}, got {list(cfg.backbones)}"
        )
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch size >= 2, got {cfg.epochs} and {cfg.batch_size}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = load_split_features(data_root, run_dir, "train", cfg)
    dev = load_split_features(data_root, run_dir, "dev", cfg)
    t_features = time.perf_counter() - t0
    heads, history, best_epoch = fit_heads(*train, *dev, cfg)
    t_train = time.perf_counter() - t0 - t_features
    best = history[best_epoch - 1]
    meta = {
        "backbones": ",".join(cfg.backbones),
        "image_size": max(BACKBONES[b][1] for b in cfg.backbones),
        "flip_average": str(cfg.flip).lower(),
        "text_normalize": str(cfg.text_normalize).lower(),
        "embed_dim": cfg.embed_dim,
        "seed": cfg.seed,
        "best_epoch": best_epoch,
        "dev_metrics": json.dumps({k: round(best[k], 2) for k in best if "_r" in k}),
        "command": command,
    }
    save_heads(run_dir / "starter.safetensors", head_state(heads.image_head, heads.text_head, heads.logit_scale), meta)
    with open(run_dir / "train_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    summary = {
        "config": {**asdict(cfg), "backbones": list(cfg.backbones)},
        "command": command,
        "best_epoch": best_epoch,
        "dev": {k: best[k] for k in best if "_r" in k},
        "feature_seconds": t_features,
        "train_seconds": t_train,
        "train_images": int(train[0]["orig"].shape[0]),
        "train_captions": int(train[1].shape[0]),
        "dev_images": int(dev[0]["orig"].shape[0]),
        "dev_captions": int(dev[1].shape[0]),
        "history": history,
    }
    (run_dir / "train_log.json").write_text(json.dumps(summary, indent=1))
    _plot(history, run_dir / "train_curves.png")
    return summary
