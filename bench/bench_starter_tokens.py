"""Starter token views: the full forward (decode + both towers) vs the upper part from the starter training cache
(`calibclip.training.starter_tokens`), on the same images in one run, interleaved; prints images/s of each and
the ratio, and the agreement of the two (cosine of the token rows).

    python bench/bench_starter_tokens.py --data-root ../shared/data/flickr8k --cache /work/runs/starter-v2/cache \\
        --split dev --n 32 --rounds 2

Reads an existing, complete lower-activation cache of the split (it never writes into it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--cache", required=True, help="starter training cache root (training.starter.cache_dir)")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    from calibclip.data.images import load_image
    from calibclip.datasets import load_dataset
    from calibclip.models.registry import create_model
    from calibclip.models.starter_parts import image_split_index, tower_upper
    from calibclip.training.starter_cache import LowerImages
    from calibclip.training.starter_tokens import lower_cache_folders

    enc = create_model("starter")
    ds = load_dataset("flickr8k", args.data_root, args.split)
    img_dir, _, k, _ = lower_cache_folders(enc, ds, Path(args.cache))
    shards = sorted(img_dir.glob("*.safetensors"))
    if not shards or any(img_dir.glob("*.lock")):
        raise SystemExit(f"{img_dir}: no complete lower-activation cache to read")
    lower = LowerImages(shards[:1], enc.backbones)  # the first shard holds the first 256 images
    n = min(args.n, lower.count)
    idx = torch.arange(n)
    splits = [image_split_index(net, k) for net in enc.image_tower.nets]

    def full() -> torch.Tensor:
        pixels = torch.stack([enc.preprocess(load_image(p)) for p in ds.images[:n]])
        with torch.inference_mode():
            return enc.image_tokens(pixels).tokens

    def cached() -> torch.Tensor:
        with torch.inference_mode():
            fmap = tower_upper(enc.image_tower, lower.get(idx, False), splits)
            fmap = 0.5 * (fmap + tower_upper(enc.image_tower, lower.get(idx, True), splits).flip(-1))
            return enc.map_tokens(fmap).tokens

    times: dict[str, list[float]] = {"full": [], "cached": []}
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, fn in (("full", full), ("cached", cached)):
            t = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t)
    cos = torch.nn.functional.cosine_similarity(out["full"].flatten(0, 1), out["cached"].flatten(0, 1), dim=-1)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "images": n,
        "threads": torch.get_num_threads(),
        "full_img_per_s": round(n / best["full"], 2),
        "cached_img_per_s": round(n / best["cached"], 2),
        "speedup": round(best["full"] / best["cached"], 2),
        "token_cosine_min": round(float(cos.min()), 6),
        "times_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
