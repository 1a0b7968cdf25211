"""Indexing pipeline vs the encoder's own throughput on the same batches, and peak memory.

1. **pipeline**: `Index.build` end to end on N images (scan, decode + preprocess in ``--workers`` processes,
   encode, hash, commit float16 vectors + SQLite rows per batch) into a fresh index folder, wall time;
2. **encoder alone**: the same images in the same batches, decoded in this process first (not timed), then only
   the encoder's forward timed (``encode_image`` on each batch, the call `Index.build` makes);
3. the ratio pipeline / encoder (target >= 0.90), and peak RSS: this process during the pipeline and the largest
   decoding worker.

Rounds alternate pipeline and encoder (``--rounds``); the first pipeline runs first so that its peak RSS is
not the encoder pass's. ``--stub-encoder`` swaps the model for
a tiny fixed random projection of 4x4-pooled pixels (with the starter's preprocessing) so that 10,000 images
measure the pipeline's own overhead and memory in minutes; ``--generate N`` writes N synthetic JPEGs to
``--cache`` once (outside the repository).

    python bench/bench_indexer.py IMAGES_DIR --limit 200 [--model starter] [--batch-size 32] [--workers 1]
    python bench/bench_indexer.py --generate 10000 --cache /work/cache/indexer --stub-encoder --workers 1
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibclip.data.images import load_image
from calibclip.data.scan import scan_images
from calibclip.index import Index
from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens


class StubEncoder(Encoder):
    """A fixed random projection of 4x4 average-pooled pixels (the pipeline's cost without a real model)."""

    name = "stub"

    def __init__(self, preprocess: Any, dim: int = 512):
        super().__init__()
        self.embed_dim = dim
        self.preprocess = preprocess
        self.register_buffer("proj", torch.randn(48, dim, generator=torch.Generator().manual_seed(0)))

    def tokenize(self, texts: Any) -> TextBatch:
        n = len(list(texts))
        z = torch.zeros(n, 1, dtype=torch.long)
        return TextBatch(z, z + 1, z.bool())

    def encode_text(self, text: Any) -> torch.Tensor:
        return torch.zeros(len(text), self.embed_dim)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(pixels.float(), 4).flatten(1) @ self.proj

    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        raise NotImplementedError("stub encoder: no token view")

    def text_tokens(self, text: TextBatch) -> TextTokens:
        raise NotImplementedError("stub encoder: no token view")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.embed_dim, "preprocess": self.preprocess.describe()}


def generate(folder: Path, n: int) -> None:
    """``n`` synthetic 320x240 JPEGs (smooth colour fields + noise), written once."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(have, n):
        c = rng.uniform(0, 255, (3, 3))
        img = c[:, 0, None, None] + c[:, 1, None, None] * xx / 320 + c[:, 2, None, None] * yy / 240
        img = (img / 2 + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="?", type=Path, help="folder of images (default: --generate's folder)")
    ap.add_argument("--limit", type=int, default=200, help="images used (the first N of the folder, sorted)")
    ap.add_argument("--model", default="starter")
    ap.add_argument("--stub-encoder", action="store_true")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--generate", type=int, default=0, help="write this many synthetic JPEGs under --cache")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "calibclip-bench-indexer")
    ap.add_argument("--skip-encoder", action="store_true", help="pipeline and memory only")
    ap.add_argument("--rounds", type=int, default=2, help="pipeline / encoder rounds, interleaved")
    args = ap.parse_args()
    print(
        f"cpu count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()}",
        flush=True,
    )
    src = args.images
    if args.generate:
        src = args.cache / f"generated-{args.generate}"
        generate(src, args.generate)
        args.limit = max(args.limit, args.generate)
    if src is None:
        ap.error("give IMAGES_DIR or --generate N")
    files = sorted(scan_images(src).files, key=lambda f: f.relpath)[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="bench-indexer-"))
    try:
        folder = work / "images"
        folder.mkdir()
        for f in files:  # exactly these N files, as symlinks (no copy of the data)
            (folder / f.relpath.replace("/", "_")).symlink_to(Path(f.path).resolve())
        from calibclip.models.registry import create_model

        encoder: Encoder = create_model(args.model)
        if args.stub_encoder:
            encoder = StubEncoder(encoder.preprocess)
        n = len(files)
        paths = sorted(str(p) for p in folder.iterdir())
        pipe, enc = [], []
        for r in range(args.rounds):  # interleaved, so both see the same machine load
            out = work / f"ix{r}"
            t0 = time.perf_counter()
            built = Index.build(
                folder, out, model=encoder, batch_size=args.batch_size, workers=args.workers, progress=False
            )
            pipe.append(time.perf_counter() - t0)
            count = len(built)
            built.close()
            shutil.rmtree(out, ignore_errors=True)
            if r == 0:
                rss_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                rss_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                print(
                    f"pipeline round 1: {count} images in {pipe[0]:.1f} s = {n / pipe[0]:.2f} images/s "
                    f"(batch {args.batch_size}, {args.workers} decoding workers); peak RSS main process "
                    f"{rss_main:.0f} MiB, largest worker {rss_worker:.0f} MiB",
                    flush=True,
                )
            if args.skip_encoder:
                continue
            t_enc = 0.0
            for s in range(0, n, args.batch_size):
                pixels = torch.stack([encoder.preprocess(load_image(p)) for p in paths[s : s + args.batch_size]])
                t0 = time.perf_counter()
                encoder.encode_image(pixels.to(encoder.device, encoder.dtype))
                t_enc += time.perf_counter() - t0
            enc.append(t_enc)
            print(
                f"round {r + 1}: pipeline {n / pipe[-1]:.2f} images/s, encoder alone on the same batches "
                f"{n / t_enc:.2f} images/s, ratio {t_enc / pipe[-1]:.3f}; load average {os.getloadavg()}",
                flush=True,
            )
        if enc:
            print(
                f"best of {args.rounds}: pipeline {n / min(pipe):.2f} images/s, encoder {n / min(enc):.2f} images/s, "
                f"ratio {min(enc) / min(pipe):.3f} (target >= 0.90); median of the round ratios "
                f"{float(np.median([e / p for e, p in zip(enc, pipe)])):.3f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
