"""`calibclip train-combiner`: train a CLIP4Cir Combiner on cached encoder features."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from calibclip.data.registry import dataset_names

    p = sub.add_parser(
        "train-combiner",
        help="train a composed-retrieval Combiner (FashionIQ, CIRR, CSS, pseudo-CIR)",
        description="Train the CLIP4Cir Combiner on frozen, cached encoder features. Recipe flags not "
        "given come from the encoder's measured recipe (calibclip/configs/composed.yaml; "
        "the run prints and records which). Re-running with the same --out resumes from "
        "RUN_DIR/last.pt.",
    )
    p.add_argument("--dataset", required=True, choices=dataset_names("composed"))
    p.add_argument("--data-root", required=True, help="dataset folder (layouts: docs/composed.md)")
    p.add_argument("--model", default="starter", help="registered model name or checkpoint path (default: starter)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, plot)")
    recipe = " (default: the encoder's recipe; starter: {}, others CLIP4Cir's {})"
    p.add_argument("--epochs", type=int, help="training epochs" + recipe.format(40, 30))
    p.add_argument("--batch-size", type=int, help="training batch (features are cached)" + recipe.format(64, 4096))
    p.add_argument("--lr", type=float, help="Adam learning rate" + recipe.format("3e-4", "2e-5"))
    p.add_argument("--proj-mult", type=float, help="projection size / feature size" + recipe.format(2, 4))
    p.add_argument("--hidden-mult", type=float, help="hidden size / feature size" + recipe.format(4, 8))
    p.add_argument("--dropout", type=float, help="dropout" + recipe.format(0.5, 0.5))
    p.add_argument(
        "--normalize-inputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise both inputs and start from the normalised sum" + recipe.format("on", "off"),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-split", help="validation split for model selection (default: dev for pseudo-cir, else val)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image decoding processes for feature extraction (default as `index`: CPU cores - 1, at most 4)",
    )
    p.add_argument("--image-batch-size", type=int, default=32, help="encoder batch size for feature extraction")
    p.add_argument("--device", default="cpu", help="device of the encoder (cpu, cuda, auto)")
    p.add_argument("--cache-dir", default=None, help="feature cache root (default $CALIBCLIP_CACHE/features)")
    p.add_argument("--no-cache", action="store_true", help="do not store extracted features")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.composed.train import TrainConfig, train_combiner
    from calibclip.data.cache import FeatureCache
    from calibclip.data.loader import default_workers
    from calibclip.models.registry import create_model

    encoder = create_model(args.model, device=args.device)
    config = TrainConfig(
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        proj_mult=args.proj_mult,
        hidden_mult=args.hidden_mult,
        dropout=args.dropout,
        normalize_inputs=args.normalize_inputs,
        seed=args.seed,
        val_split=args.val_split,
    )
    cache = FeatureCache(args.cache_dir, enabled=not args.no_cache)
    workers = default_workers() if args.workers is None else args.workers
    summary = train_combiner(
        encoder,
        args.data_root,
        args.out,
        config,
        cache=cache,
        image_batch_size=args.image_batch_size,
        workers=workers,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    head = summary["headline"]
    print(
        f"best epoch {summary['best_epoch']}: val {head} {summary['best'].get(head, float('nan')):.2f} "
        f"(sum {summary['baselines']['sum'][head]:.2f}, image {summary['baselines']['image'][head]:.2f}, "
        f"text {summary['baselines']['text'][head]:.2f}); training {summary['train_time_s']:.1f} s"
    )
    print(
        f"recipe: {summary['recipe']!r} entry of calibclip/configs/composed.yaml for "
        f"{', '.join(summary['recipe_fields']) or 'nothing (all flags given)'}"
    )
    print(f"checkpoint: {args.out}/best.pt")
    return 0
