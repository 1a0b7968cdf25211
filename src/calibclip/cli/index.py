"""`calibclip index`: build or incrementally update an index of an image folder."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from calibclip.cli.common import PRECISIONS, add_backend_argument, apply_backend
from calibclip.index.stores import store_schemes


def store_spec_help() -> str:
    """One line on store specs, built from the backend table."""
    others = [s for s in store_schemes() if s not in ("local", "milvus")]
    return "a folder (local format), milvus:PATH.db (Milvus Lite), milvus:http://HOST:PORT (Milvus server)" + "".join(
        f", {s}:LOCATION" for s in others
    )


def add_store_options(p: argparse.ArgumentParser) -> None:
    """Options that every command opening a store takes."""
    p.add_argument(
        "--milvus-token",
        default=None,
        metavar="TOKEN",
        help="token of a Milvus server (default: $CALIBCLIP_MILVUS_TOKEN)",
    )


def store_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Backend options from the command line."""
    return {"token": args.milvus_token} if getattr(args, "milvus_token", None) else None


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from calibclip.calibration.methods import calibration_methods

    p = sub.add_parser(
        "index",
        help="index a folder of images (incremental, resumable)",
        description="Walk IMAGES_DIR recursively (jpg jpeg png webp bmp gif tif tiff), encode new or changed images "
        "and drop deleted ones. Safe to interrupt (even kill -9) and re-run: batches are committed atomically.",
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images (walked recursively)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="INDEX_DIR", help="index folder (created or updated)")
    where.add_argument("--store", metavar="SPEC", help="where the index lives: " + store_spec_help())
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        help="registered model name or checkpoint path (default: the existing index's model, else starter)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per encoded and committed batch (default 32)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding worker processes (default: CPU cores - 1, at most 4; 0 = decode in-process)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="model precision (fp16 needs CUDA, int8 --backend onnx; default: the existing index's, else fp32)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also store CalibCLIP-calibrated image embeddings (enables `search --calibrate`)",
    )
    p.add_argument(
        "--calibration-method",
        metavar="METHOD",
        choices=calibration_methods(),
        help=f"with --calibrate: the calibration method ({', '.join(calibration_methods())}; default: the "
        "existing index's, else calibclip)",
    )
    p.add_argument(
        "--rerank",
        nargs="?",
        const="packaged",
        default=None,
        metavar="PATH",
        help="also store the trained cross-modal re-ranker's projected fp16 image tokens (enables `search "
        "--rerank`): the re-ranker shipped with the encoder (no value) or a re-ranker folder; the index keeps "
        "a copy and records its sha256 (default: keep what an existing index has; local store only)",
    )
    p.add_argument(
        "--combiner",
        metavar="PATH",
        help="Combiner checkpoint (RUN_DIR/best.pt) to copy into the index for composed image+text queries",
    )
    p.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local: a decoding process pool here; ray: Ray Data (decode tasks + encoder actor pool; "
        "needs `pip install calibclip[ray]`)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to join (default: start a local one with 2 CPUs)",
    )
    p.add_argument("--num-workers", type=int, default=None, help="Ray encoder actors (default 1)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per Ray encoder actor (default: 1 when the cluster has GPUs, else 0)",
    )
    add_backend_argument(p)
    add_store_options(p)
    p.add_argument("--json", action="store_true", help="print the run summary as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def plural(n: int, word: str) -> str:
    """``1 file``, ``2 files``, ``0 files``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def run(args: argparse.Namespace) -> int:
    from calibclip.cli.search import check_index_model
    from calibclip.index import Index

    apply_backend(args)
    target = args.out if args.out is not None else args.store
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    ray_flags = {
        "--ray-address": args.ray_address,
        "--num-workers": args.num_workers,
        "--gpus-per-worker": args.gpus_per_worker,
    }
    engine_options: dict[str, Any] = {}
    if args.engine == "ray":
        engine_options = {
            "address": args.ray_address,
            "num_workers": args.num_workers,
            "gpus_per_worker": args.gpus_per_worker,
        }
    elif any(v is not None for v in ray_flags.values()):
        used = [k for k, v in ray_flags.items() if v is not None]
        raise ValueError(f"{', '.join(used)} only apply with --engine ray")
    check_index_model(target, args.model)
    index = Index.build(
        args.images_dir,
        target,
        model=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        calibrate=True if args.calibrate else None,
        combiner=args.combiner,
        precision=args.precision,
        device=args.device,
        progress=not args.quiet,
        calibration_method=args.calibration_method,
        store_options=store_options(args),
        engine=args.engine,
        engine_options=engine_options,
        rerank=args.rerank,
    )
    report = index.report.to_dict()  # type: ignore[union-attr]
    reranker = index.reranker_info
    index.close()
    if args.json:
        print(json.dumps({"index": target, **report, **({"reranker": reranker} if reranker else {})}))
        return 0
    skipped = report["skipped"]
    print(
        f"{target}: {plural(report['count'], 'image')} indexed (added {report['added']}, updated "
        f"{report['updated']}, removed {report['removed']}, unchanged {report['unchanged']}) in "
        f"{report['seconds']:.1f}s; {plural(skipped, 'file')} skipped"
        + (f" (see `calibclip info {target} --skipped`)" if skipped else "")
        + (
            f"; re-ranker tokens {reranker['tokens'][0]}x{reranker['tokens'][1]} fp16 per image "
            f"({2 * reranker['tokens'][0] * reranker['tokens'][1]:,} bytes)"
            if reranker
            else ""
        ),
        file=sys.stdout,
    )
    return 0
