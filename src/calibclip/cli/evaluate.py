"""`calibclip evaluate`: metrics of a model on a benchmark dataset (person retrieval, captions,
composed retrieval), optionally with CalibCLIP calibration; reports and JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from calibclip.cli.common import PRECISIONS, add_backend_argument, apply_backend


def dataset_choices() -> tuple[str, ...]:
    """Every accepted ``--dataset`` value, read from the dataset table (names and aliases)."""
    from calibclip.data.registry import dataset_names

    return dataset_names(aliases=True)


def calibration_method_choices() -> list[str]:
    """Every ``--calibration-method`` value, read from the calibration-method table."""
    from calibclip.calibration.methods import calibration_methods

    return calibration_methods()


def split_help() -> str:
    """``--split`` help: each dataset's default split, from the dataset table."""
    from calibclip.data.registry import list_datasets

    splits = "; ".join(f"{s.name}: {'/'.join(s.splits)} (default {s.default_split})" for s in list_datasets())
    return f"dataset split ({splits})"


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Model/config/runtime flags shared by `evaluate` and `batch-evaluate`."""
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="registered model name or checkpoint path (default: config's, else starter)")
    model.add_argument("--checkpoint", help="checkpoint file or folder (same as --model PATH)")
    p.add_argument(
        "--config", help="evaluation YAML (model, evaluation, calibration sections), e.g. configs/cuhkpedes.yaml"
    )
    p.add_argument("--split", help=split_help())
    p.add_argument("--batch-size", type=int, help="images per encoding batch (default 64)")
    p.add_argument("--workers", type=int, help="image decoding processes (default 0 = in process)")
    p.add_argument("--precision", choices=PRECISIONS, help="model precision (fp16 needs CUDA, int8 --backend onnx)")
    add_backend_argument(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default auto)")
    p.add_argument("--no-cache", action="store_true", help="recompute features instead of using the feature cache")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="CalibCLIP calibration with the config's calibration: section (encoder defaults otherwise)",
    )
    p.add_argument(
        "--calibration-method",
        choices=calibration_method_choices(),
        metavar="METHOD",
        help=f"with --calibrate: the calibration method ({', '.join(calibration_method_choices())}; default calibclip)",
    )
    p.add_argument(
        "--rerank",
        nargs="?",
        const="packaged",
        default=None,
        metavar="PATH",
        help="re-rank each query's top-K with the trained cross-modal re-ranker: the one shipped with the "
        "encoder (no value) or a re-ranker folder (PATH); combines with --calibrate",
    )
    p.add_argument(
        "--rerank-top-k",
        type=int,
        metavar="K",
        help="with --rerank: candidates re-scored per query (default: the re-ranker's own top_k)",
    )
    p.add_argument("--output-dir", help="write metrics.json, metrics.md and recall.png here")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML config with the command-line overrides applied."""
    from calibclip.evaluation.config import load_config

    apply_backend(args)
    cfg = load_config(args.config)
    if args.batch_size is not None:
        cfg["evaluation"]["batch_size"] = args.batch_size
    if args.workers is not None:
        cfg["evaluation"]["workers"] = args.workers
    if args.no_cache:
        cfg["evaluation"]["cache"] = False
    if args.precision:
        cfg["model"]["precision"] = args.precision
    if args.device:
        cfg["model"]["device"] = args.device
    return cfg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a model on a retrieval benchmark",
        description="Text->image (person retrieval: R@1/5/10, mAP, mINP; captions: t2i/i2t R@1/5/10) or "
        "composed retrieval (FashionIQ, CIRR, CSS) metrics in percent.",
    )
    p.add_argument("--dataset", choices=dataset_choices(), help="benchmark (default: the config's dataset:)")
    p.add_argument("--data-root", help="dataset folder (default: the config's data_root:)")
    add_common_arguments(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"dataset","split","model","metrics"} as the last stdout line',
    )
    p.add_argument(
        "--combiner",
        help="composed retrieval: trained Combiner checkpoint (RUN_DIR/best.pt); default: the "
        "encoder's packaged Combiner",
    )
    p.add_argument(
        "--combining",
        choices=("combiner", "sum", "image", "text"),
        help="composed retrieval: how to combine reference image and text (default: combiner with "
        "--combiner or a packaged Combiner, else the normalised sum)",
    )
    p.add_argument(
        "--submission",
        action="store_true",
        help="CIRR: write the two test-server JSON files into --output-dir (needed for test1)",
    )
    return p


def print_human(result: dict[str, Any]) -> None:
    from calibclip.evaluation.report import markdown_table

    metrics = result["metrics"]
    title = (
        f"{result['dataset']} ({result['split']}) — {result['model']}"
        + (" + CalibCLIP" if result["calibrate"] else "")
        + (" + re-ranker" if result.get("rerank") else "")
    )
    print(title)
    print(markdown_table([metrics], list(metrics)), end="")
    t = result["timing"]
    print(f"time: {t['total_s']:.1f} s (model load {t['model_s']:.1f} s)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from calibclip.evaluation.report import write_report
    from calibclip.evaluation.runner import run_evaluation

    cfg = config_from_args(args)
    dataset = args.dataset or cfg.get("dataset")
    data_root = args.data_root or cfg.get("data_root")
    if not dataset or not data_root:
        raise ValueError("give --dataset and --data-root (or a --config with dataset: and data_root:)")
    if args.submission and not args.output_dir:
        raise ValueError("--submission writes the CIRR test-server files into --output-dir: give one")
    if not (args.checkpoint or args.model):
        name = cfg["model"].get("name") or "starter"
        source = f"the model: of {args.config}" if args.config else "the default"
        print(
            f"calibclip evaluate: no --checkpoint given, using model {name!r} ({source}); "
            "pass --checkpoint PATH or --model NAME to evaluate another",
            file=sys.stderr,
        )
    result = run_evaluation(
        dataset,
        data_root,
        cfg,
        model=args.checkpoint or args.model,
        split=args.split,
        calibrate=args.calibrate,
        combiner=args.combiner,
        combining=args.combining,
        calibration_method=args.calibration_method,
        rerank=args.rerank,
        rerank_top_k=args.rerank_top_k,
        submission_dir=Path(args.output_dir) / "submission" if args.submission else None,
    )
    if args.output_dir:
        paths = write_report(result, args.output_dir)
        if not args.json:
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if args.json:
        print(json.dumps({k: result[k] for k in ("dataset", "split", "model", "metrics")}))
    else:
        print_human(result)
    return 0
