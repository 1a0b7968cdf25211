"""CPU throughput of the `starter` encoder: images/s and texts/s by batch size and threads.

Compares, in the same run, `Starter.encode_image` (folded batch norm, channels_last, with
test-time flip averaging as shipped), the same without flip averaging, and the plain backbones
(unfolded batch norm, NCHW, no flip: what ``efficientnet-lite-pytorch`` gives out of the box).
Prints a markdown table (``--json`` for machine-readable rows).

    python bench/bench_starter.py --batch-sizes 1,4,16 --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from calibclip.models.starter import StarterImageTower
from calibclip.models.registry import create_model

CAPTION = "A young boy in a red shirt is jumping into a swimming pool while his friends watch ."


def _rate(fn, items: int, min_seconds: float, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += items
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,4,16,32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each cell at least this long")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model = create_model("starter")
    plain = StarterImageTower(model.backbones, fold=False, channels_last=False, image_size=model.image_size).eval()
    # each backbone alone (folded, channels_last, no flip) at its native input size: the cost side
    # of the quality-per-image/s choice
    single = {b: StarterImageTower((b,)).eval() for b in model.backbones} if len(model.backbones) > 1 else {}
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.rand(bs, 3, model.image_size, model.image_size) * 2 - 1
            texts = model.tokenize([CAPTION] * bs)
            flip = model.flip_average
            with torch.inference_mode():
                row = {
                    "threads": threads,
                    "batch": bs,
                    "starter_img_s": _rate(lambda: model.encode_image(x), bs, args.min_seconds),
                }
                model.flip_average = False
                row["starter_noflip_img_s"] = _rate(lambda: model.encode_image(x), bs, args.min_seconds)
                model.flip_average = flip
                row["plain_noflip_img_s"] = _rate(lambda: plain(x), bs, args.min_seconds)
                for name, tower in single.items():
                    xs = torch.rand(bs, 3, tower.image_size, tower.image_size) * 2 - 1
                    row[f"{name}_only_noflip_img_s"] = _rate(lambda: tower(xs), bs, args.min_seconds)
                row["texts_s"] = _rate(lambda: model.encode_text(texts), bs, args.min_seconds)
            rows.append(row)
            if not args.json:
                print(
                    f"threads={threads} batch={bs}: "
                    + ", ".join(f"{k}={v:.1f}" for k, v in row.items() if k.endswith("_s")),
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"\nbackbones={','.join(model.backbones)} image_size={model.image_size} torch={torch.__version__}\n")
    extra = [k for k in rows[0] if k.endswith("_only_noflip_img_s")]
    print(
        "| threads | batch | starter images/s (flip-averaged, shipped) | starter images/s (no flip) "
        "| plain backbones images/s (no flip) | "
        + " | ".join(f"{k.split('_')[0]} alone images/s (no flip)" for k in extra)
        + " | texts/s |"
    )
    print("|---" * (6 + len(extra)) + "|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['batch']} | {r['starter_img_s']:.1f} | {r['starter_noflip_img_s']:.1f} "
            f"| {r['plain_noflip_img_s']:.1f} | "
            + " | ".join(f"{r[k]:.1f}" for k in extra)
            + f" | {r['texts_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
