"""`calibclip train`: fine-tune a dual encoder (CLIP or the starter) for text->image retrieval with the dual
curriculum; per-epoch validation, best/last checkpoints, crash-safe `--resume` (docs/training.md)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _epochs(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 10,20,30, got {text!r}") from exc


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="fine-tune a dual encoder (CLIP, starter) with the dual curriculum",
        description="Train on a dataset's train split, select the best epoch on its validation split, write "
        "OUT/best and OUT/last (loadable by calibclip.create_model and every --model flag), train_log.csv/json and "
        "train_curves.png. Flags override the config's training: and model.dcc: keys.",
    )
    p.add_argument(
        "--config", help="YAML in the seed's shape (model.dcc.*, model.cve.*, training:), e.g. configs/cuhkpedes.yaml"
    )
    p.add_argument("--dataset", help="dataset name (default: the config's dataset:)")
    p.add_argument("--data-root", help="dataset folder (default: the config's data_root:)")
    p.add_argument("--output-dir", required=True, help="run folder (created); an existing run needs --resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last saved step")
    p.add_argument(
        "--checkpoint",
        help="starting weights: a checkpoint path or a registered model name (default: the config's model.name)",
    )
    p.add_argument("--epochs", type=int, help="training epochs (config training.epochs)")
    p.add_argument("--batch-size", type=int, help="batch size (training.batch_size)")
    p.add_argument("--lr", type=float, help="base learning rate (training.lr); new modules get x new_module_lr_mult")
    p.add_argument("--seed", type=int, help="random seed (training.seed)")
    p.add_argument("--trainable", choices=("heads", "top", "all"), help="which parameters train (training.trainable)")
    p.add_argument("--top-blocks", type=int, help="with --trainable top: blocks of each tower that train")
    p.add_argument("--val-split", help="validation split used for model selection (default: dev/val of the dataset)")
    p.add_argument(
        "--image-curriculum-epochs",
        type=_epochs,
        help="model.dcc.image_curriculum_epochs, e.g. 10,20,30 (empty string = no image curriculum)",
    )
    p.add_argument("--text-curriculum-epochs", type=_epochs, help="model.dcc.text_curriculum_epochs, e.g. 15,25,35")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="AMP precision on CUDA (training.precision)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (model.device)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute CLIP blocks in backward")
    p.add_argument("--checkpoint-every", type=int, help="also save the resume state every N steps (0 = per epoch)")
    p.add_argument(
        "--eval-test",
        action="store_true",
        default=None,
        help="after training, evaluate the best checkpoint on the test split (reported, never used to select)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary (best epoch, metrics) as one JSON line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.evaluation.config import load_config
    from calibclip.training.config import settings_from_config
    from calibclip.training.trainer import train

    cfg = load_config(args.config)
    if args.dataset:
        cfg["dataset"] = args.dataset
    if args.data_root:
        cfg["data_root"] = args.data_root
    if args.device:
        cfg["model"]["device"] = args.device
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "trainable": args.trainable,
        "top_blocks": args.top_blocks,
        "val_split": args.val_split,
        "image_curriculum_epochs": args.image_curriculum_epochs,
        "text_curriculum_epochs": args.text_curriculum_epochs,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "checkpoint_every": args.checkpoint_every,
        "eval_test": args.eval_test,
    }
    settings = settings_from_config(cfg, overrides)
    command = (
        shlex.join(["calibclip", *sys.argv[1:]])
        if sys.argv and sys.argv[0].endswith("calibclip")
        else shlex.join(sys.argv)
    )
    summary = train(
        settings,
        args.output_dir,
        checkpoint=args.checkpoint,
        resume=args.resume,
        progress=not args.no_progress,
        command=command,
    )
    line = {
        "output_dir": args.output_dir,
        "best_epoch": summary["best_epoch"],
        "select": summary["select"],
        "best_val": summary["best_val"],
        "train_seconds": round(summary["train_seconds"], 1),
    }
    if "test_metrics" in summary:
        line["test_metrics"] = summary["test_metrics"]
    if args.json:
        print(json.dumps(line))
    else:
        print(
            f"best epoch {line['best_epoch']} ({summary['select']}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in line["best_val"].items())
        )
        print(f"checkpoints: {args.output_dir}/best, {args.output_dir}/last ({line['train_seconds']} s)")
    return 0
