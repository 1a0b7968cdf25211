"""The project's one feature cache: features of dataset images/texts, keyed by
(model fingerprint, preprocessing, dataset, split, variant) so a second evaluation or training
run is instant.

Layout: ``ROOT/<sha256(key)[:24]>/`` with ``key.json``, shard files ``<name>.<start>.npy`` written
atomically while computing (a killed run resumes at the first missing shard), and the final
``<name>.npy`` arrays. ROOT defaults to ``$CALIBCLIP_CACHE/features`` or
``~/.cache/calibclip/features``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibclip.data.loader import iter_image_batches
from calibclip.models.base import Encoder, TextBatch
from calibclip.utils import progress_bar

ImageFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
TextFn = Callable[[TextBatch], dict[str, torch.Tensor]]


def default_cache_root() -> Path:
    base = os.environ.get("CALIBCLIP_CACHE") or Path.home() / ".cache" / "calibclip"
    return Path(base) / "features"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureCache:
    """Disk cache of per-item feature arrays. ``enabled=False`` computes without storing."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True, shard_size: int = 2048):
        self.root = Path(root) if root else default_cache_root()
        self.enabled = enabled
        self.shard_size = shard_size

    # --- keys ----------------------------------------------------------------------------
    @staticmethod
    def make_key(encoder: Encoder, kind: str, items: Sequence[Any], **tags: Any) -> dict[str, Any]:
        """A cache key for ``kind`` ("images"/"texts") features of ``items`` by ``encoder``."""
        digest = hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]
        return {
            "model": encoder.fingerprint(),
            "config": encoder.config(),
            "kind": kind,
            "items": digest,
            "count": len(items),
            **tags,
        }

    def directory(self, key: dict[str, Any]) -> Path:
        h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.root / h

    def load(self, key: dict[str, Any], names: Sequence[str]) -> dict[str, np.ndarray] | None:
        d = self.directory(key)
        if not self.enabled or not all((d / f"{n}.npy").exists() for n in names):
            return None
        return {n: np.load(d / f"{n}.npy") for n in names}

    # --- computing -------------------------------------------------------------------------
    def _run(
        self,
        key: dict[str, Any],
        total: int,
        compute: Callable[[int, int, Any], dict[str, torch.Tensor]],
        desc: str,
        progress: bool,
    ) -> dict[str, np.ndarray]:
        d = self.directory(key)
        if self.enabled:
            d.mkdir(parents=True, exist_ok=True)
            (d / "key.json").write_text(json.dumps(key, sort_keys=True, default=str, indent=1))
        shards: dict[str, list[np.ndarray]] = {}
        bar = progress_bar(total=total, desc=desc, disable=not progress)
        for start in range(0, total, self.shard_size):
            stop = min(total, start + self.shard_size)
            existing = sorted(d.glob(f"*.{start}.npy")) if self.enabled else []
            if existing:
                arrays = {p.name.split(".")[0]: np.load(p) for p in existing}
                bar.update(stop - start)
            else:
                arrays = {k: v.float().cpu().numpy() for k, v in compute(start, stop, bar).items()}
                if self.enabled:
                    for name, arr in arrays.items():
                        _atomic_save(d / f"{name}.{start}.npy", arr)
            for name, arr in arrays.items():
                shards.setdefault(name, []).append(arr)
        bar.close()
        result = {name: np.concatenate(parts) for name, parts in shards.items()}
        if self.enabled:
            for name, arr in result.items():
                _atomic_save(d / f"{name}.npy", arr)
            for p in d.glob("*.*.npy"):
                p.unlink(missing_ok=True)
        return result

    @torch.inference_mode()
    def image_features(
        self,
        encoder: Encoder,
        paths: Sequence[str | Path],
        fn: ImageFn | None = None,
        names: Sequence[str] = ("raw",),
        batch_size: int = 32,
        workers: int = 0,
        progress: bool = True,
        **tags: Any,
    ) -> dict[str, np.ndarray]:
        """Features of every image in ``paths`` (float32 arrays ``[N, D]`` per name).

        ``fn(pixels) -> {name: [B, D]}`` defaults to ``{"raw": encoder.encode_image(pixels)}``; pass
        a calibrator's function and a ``variant`` tag to cache calibrated features too. A file that
        cannot be decoded is an error here (datasets must be complete), listing the bad files.
        """
        fn = fn or (lambda px: {"raw": encoder.encode_image(px)})
        key = self.make_key(encoder, "images", paths, names=list(names), **tags)
        cached = self.load(key, names)
        if cached is not None:
            return cached

        def compute(start: int, stop: int, bar: Any) -> dict[str, torch.Tensor]:
            outs: dict[str, list[torch.Tensor]] = {}
            bad: dict[int, tuple[str, str]] = {}
            for batch in iter_image_batches(paths[start:stop], encoder.preprocess, batch_size, workers):
                bad.update(batch.errors)
                if batch.pixels is not None:
                    for name, t in fn(batch.pixels.to(encoder.device, encoder.dtype)).items():
                        outs.setdefault(name, []).append(t.float().cpu())
                bar.update(len(batch.indices) + len(batch.errors))
            if bad:
                sample = "; ".join(msg for _, msg in list(bad.values())[:3])
                raise RuntimeError(f"{len(bad)} dataset images could not be read, e.g. {sample}")
            return {name: torch.cat(v) for name, v in outs.items()}

        return self._run(key, len(paths), compute, "encoding images", progress)

    @torch.inference_mode()
    def text_features(
        self,
        encoder: Encoder,
        texts: Sequence[str],
        fn: TextFn | None = None,
        names: Sequence[str] = ("raw",),
        batch_size: int = 128,
        progress: bool = True,
        **tags: Any,
    ) -> dict[str, np.ndarray]:
        """Features of every text (length-sorted batches for dynamic padding; output in input order)."""
        fn = fn or (lambda tb: {"raw": encoder.encode_text(tb)})
        key = self.make_key(encoder, "texts", texts, names=list(names), **tags)
        cached = self.load(key, names)
        if cached is not None:
            return cached

        def compute(start: int, stop: int, bar: Any) -> dict[str, torch.Tensor]:
            chunk = list(texts[start:stop])
            order = np.argsort([-len(t) for t in chunk], kind="stable")
            outs: dict[str, list[torch.Tensor]] = {}
            for s in range(0, len(chunk), batch_size):
                idx = order[s : s + batch_size]
                tb = encoder.tokenize([chunk[i] for i in idx]).to(encoder.device)
                for name, t in fn(tb).items():
                    outs.setdefault(name, []).append(t.float().cpu())
                bar.update(len(idx))
            inverse = torch.as_tensor(np.argsort(order, kind="stable"))
            return {name: torch.cat(v)[inverse] for name, v in outs.items()}

        return self._run(key, len(texts), compute, "encoding texts", progress)
