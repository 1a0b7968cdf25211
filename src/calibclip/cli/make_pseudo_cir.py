"""`calibclip make-pseudo-cir`: composed-retrieval triplets from a captioned photo dataset."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "make-pseudo-cir",
        help="build composed-retrieval triplets from real captioned photos (Flickr8k)",
        description="Deterministic (reference image, modification text, target image) triplets from a captioned "
        "dataset: every image is a target once; its reference is the visual neighbour described least "
        "like it; the text is the target caption least like the reference's captions. Writes only "
        "annotations (OUT/pseudo-cir.<split>.json with image names and the data root), never images. "
        "Evaluate with `calibclip evaluate --dataset pseudo-cir --data-root OUT --split SPLIT`.",
    )
    p.add_argument("--dataset", required=True, choices=("flickr8k",), help="captioned source dataset")
    p.add_argument("--data-root", required=True, help="its folder (official layout; recorded, never copied)")
    p.add_argument("--split", required=True, help="its split: train or dev (val = dev)")
    p.add_argument("--out", required=True, help="output folder for pseudo-cir.<split>.json (e.g. runs/pseudo-cir)")
    p.add_argument("--model", default="starter", help="encoder whose features choose the triplets (default starter)")
    p.add_argument(
        "--neighbours", type=int, default=10, help="visual neighbours a reference is chosen from (default 10)"
    )
    p.add_argument("--references-per-target", type=int, default=1, help="triplets per target image (default 1)")
    p.add_argument("--max-images", type=int, help="use only the first N images of the split (split-file order)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoding batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0)")
    p.add_argument("--device", default="cpu", help="device of the encoder (cpu, cuda, auto)")
    p.add_argument("--cache-dir", help="feature cache root (default $CALIBCLIP_CACHE/features)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.composed.pseudo_cir import SHARD_SIZE, make_pseudo_cir
    from calibclip.data.cache import FeatureCache
    from calibclip.models.registry import create_model

    encoder = create_model(args.model, device=args.device)
    summary = make_pseudo_cir(
        encoder,
        args.dataset,
        args.data_root,
        args.split,
        args.out,
        cache=FeatureCache(args.cache_dir, shard_size=SHARD_SIZE),
        neighbours=args.neighbours,
        references_per_target=args.references_per_target,
        max_images=args.max_images,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{summary['triplets']} triplets over {summary['images']} images ({summary['references']} distinct "
        f"references, median visual rank {summary['median_visual_rank']:g}) in {summary['seconds']:.1f} s"
    )
    print(f"written to {summary['file']}")
    print(
        f"next: calibclip evaluate --dataset pseudo-cir --data-root {args.out} --split {summary['split']} "
        "--combining combiner --json"
    )
    return 0
