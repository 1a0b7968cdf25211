"""`calibclip make-css`: generate the CSS-style compositional benchmark (CIRR layout)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "make-css",
        help="generate a CSS-style composed-retrieval benchmark",
        description="Scenes of coloured shapes on a 3x3 grid with add/remove/change modifications; "
        "the test split contains (colour, shape) pairs never seen in train/val.",
    )
    p.add_argument("--out", required=True, help="output folder (must not hold a benchmark already)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=3000, help="training queries (default 3000)")
    p.add_argument("--n-val", type=int, default=400, help="validation queries (default 400)")
    p.add_argument("--n-test", type=int, default=800, help="test queries (default 800)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--mods-per-scene", type=int, default=4, help="modifications (queries) per reference scene")
    p.add_argument(
        "--no-reverse",
        action="store_true",
        help="do not add the inverse of every train query (target -> reference; on by default)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.composed.css import make_css

    info = make_css(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        size=args.size,
        mods_per_scene=args.mods_per_scene,
        reverse_train=not args.no_reverse,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(info))
    else:
        for split, c in info["splits"].items():
            print(f"{split}: {c['queries']} queries, {c['images']} images, {c['novel']} with held-out pairs")
        print(f"written to {args.out}")
    return 0
