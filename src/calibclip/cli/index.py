"""`calibclip index`: build or incrementally update an index of an image folder."""

from __future__ import annotations

import argparse
import json
import sys

from calibclip.cli.common import PRECISIONS, add_backend_argument, apply_backend


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from calibclip.calibration.methods import calibration_methods

    p = sub.add_parser(
        "index", help="index a folder of images (incremental, resumable)",
        description="Walk IMAGES_DIR recursively (jpg jpeg png webp bmp gif tif tiff), encode new or changed images "
        "and drop deleted ones. Safe to interrupt (even kill -9) and re-run: batches are committed atomically.",
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images (walked recursively)")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder (created or updated)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="registered model name or checkpoint path (default: the existing index's model, else starter)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoded and committed batch (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding worker processes (default: CPU cores - 1, at most 4; 0 = decode in-process)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="model precision (fp16 needs CUDA, int8 --backend onnx; default: the existing index's, else fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--calibrate", action="store_true",
                   help="also store CalibCLIP-calibrated image embeddings (enables `search --calibrate`)")
    p.add_argument("--calibration-method", metavar="METHOD", choices=calibration_methods(),
                   help=f"with --calibrate: the calibration method ({', '.join(calibration_methods())}; default: the "
                   "existing index's, else calibclip)")
    p.add_argument("--combiner", metavar="PATH", help="Combiner checkpoint (RUN_DIR/best.pt) to copy into the index "
                   "for composed image+text queries")
    add_backend_argument(p)
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
    check_index_model(args.out, args.model)
    index = Index.build(
        args.images_dir, args.out, model=args.model, batch_size=args.batch_size, workers=args.workers,
        calibrate=True if args.calibrate else None, combiner=args.combiner, precision=args.precision,
        device=args.device, progress=not args.quiet, calibration_method=args.calibration_method,
    )
    report = index.report.to_dict()  # type: ignore[union-attr]
    index.close()
    if args.json:
        print(json.dumps({"index": args.out, **report}))
        return 0
    skipped = report["skipped"]
    print(
        f"{args.out}: {plural(report['count'], 'image')} indexed (added {report['added']}, updated "
        f"{report['updated']}, removed {report['removed']}, unchanged {report['unchanged']}) in "
        f"{report['seconds']:.1f}s; {plural(skipped, 'file')} skipped"
        + (f" (see `calibclip info {args.out} --skipped`)" if skipped else ""),
        file=sys.stdout,
    )
    return 0
