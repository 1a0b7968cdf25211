"""`calibclip train-starter`: train the heads of the built-in `starter` model on Flickr8k."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-starter",
        help="train the starter model's heads on Flickr8k (train split; selection on dev)",
        description="Extract and cache frozen EfficientNet-Lite/MiniLM features of the Flickr8k train and dev "
        "splits (resumable), train linear heads with a symmetric contrastive loss, keep the epoch with the best "
        "dev text->image R@1 and write RUN_DIR/starter.safetensors, train_log.csv/json and train_curves.png.",
    )
    p.add_argument("--data-root", required=True, help="Flickr8k root (Flicker8k_Dataset/, Flickr8k_text/)")
    p.add_argument("--out", required=True, help="run folder (feature cache, weights, logs); re-running resumes")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the committed recipe's)")
    p.add_argument("--batch-size", type=int, default=1024, help="distinct images per batch (default 1024)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, cosine schedule (default 1e-3)")
    p.add_argument("--backbones", default="lite0,lite2", help="comma-separated subset of lite0,lite2 (default both)")
    p.add_argument("--embed-dim", type=int, default=None, help="joint embedding size (default: the recipe's)")
    p.add_argument("--no-flip", action="store_true", help="no flip augmentation / test-time flip averaging")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads during extraction (default 2)")
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.models.starter_train import TrainConfig, train_starter

    defaults = TrainConfig()
    cfg = TrainConfig(
        backbones=tuple(b.strip() for b in args.backbones.split(",") if b.strip()),
        seed=args.seed,
        epochs=args.epochs if args.epochs is not None else defaults.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        embed_dim=args.embed_dim if args.embed_dim is not None else defaults.embed_dim,
        flip=not args.no_flip,
        workers=args.workers,
    )
    command = (
        "calibclip " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["train-starter"] else ""
    )
    summary = train_starter(args.data_root, args.out, cfg, command=command)
    print(
        json.dumps(
            {
                "best_epoch": summary["best_epoch"],
                "dev": summary["dev"],
                "feature_seconds": round(summary["feature_seconds"], 1),
                "train_seconds": round(summary["train_seconds"], 1),
                "out": str(args.out),
            },
            indent=1,
        )
    )
    return 0
