#!/usr/bin/env python
"""Seed-compatible demo: rank the images of a folder for a text query (optionally composed with a
reference image) and print the top matches.

    python scripts/demo.py --config configs/cuhkpedes.yaml --checkpoint CKPT --image_dir DIR \
        --query "A woman wearing a red dress" [--topk 5] [--calibrate] [--image REF]

The folder is indexed once (`calibclip index`, incremental: later runs only encode new or changed
files) into ``--index`` (default: ``$CALIBCLIP_CACHE/demo-indexes/<folder+model hash>``); repeated
queries then take about a second. Unreadable files are skipped (and reported by the index).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

try:
    import torch  # noqa: F401
except ImportError:
    sys.exit(f"error: torch is not installed for {sys.executable}; activate the project's environment first: "
             ". .venv/bin/activate   (created by: bash scripts/quickstart.sh)")
try:
    import calibclip  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="evaluation YAML (model and calibration sections)")
    p.add_argument("--checkpoint", "--model", dest="model", help="checkpoint path or registered model name")
    p.add_argument("--image_dir", "--image-dir", required=True, help="folder of images (searched recursively)")
    p.add_argument("--query", required=True, help='text query, e.g. "A woman wearing a red dress"')
    p.add_argument("--image", help="reference image (path) for a composed query: REF modified by --query")
    p.add_argument("--topk", type=int, default=5, help="matches to print (default 5)")
    p.add_argument("--calibrate", action="store_true", help="CalibCLIP re-ranking with the config's settings")
    p.add_argument("--index", help="index folder for IMAGE_DIR (default: one per folder and model under "
                   "$CALIBCLIP_CACHE/demo-indexes)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: config's)")
    return p.parse_args(argv)


def default_index_dir(image_dir: Path, model: str) -> Path:
    """One index per (folder, model) under the calibclip cache folder."""
    base = Path(os.environ.get("CALIBCLIP_CACHE") or Path.home() / ".cache" / "calibclip")
    key = hashlib.sha256(f"{image_dir.resolve()}\n{model}".encode()).hexdigest()[:16]
    return base / "demo-indexes" / key


def run(args: argparse.Namespace) -> int:
    from calibclip.data.registry import get_dataset
    from calibclip.evaluation.config import load_config
    from calibclip.evaluation.runner import load_encoder
    from calibclip.index import Index

    image_dir = Path(args.image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"--image_dir {image_dir} is not a folder; give the folder of images to search")
    if args.image and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} does not exist; give a reference image file")
    cfg = load_config(args.config)
    m = cfg["model"]
    model = str(args.model or m["name"])
    looks_like_path = os.sep in model or model.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    if looks_like_path and not Path(model).exists():
        raise FileNotFoundError(f"--checkpoint {model} not found; give an existing checkpoint file or a registered "
                                "model name (`calibclip models` lists them)")
    task = "person" if cfg.get("dataset") and get_dataset(cfg["dataset"]).task == "person" else "captions"
    encoder = load_encoder(model, task, args.device or m["device"], m["precision"], m.get("clip_image_size"))
    out = Path(args.index) if args.index else default_index_dir(image_dir, model)
    index = Index.build(image_dir, out, model=encoder, calibrate=True if args.calibrate else None,
                        calibration=cfg.get("calibration") if args.calibrate else None, progress=True)
    report = index.report
    with index:
        if report is not None and (report.added or report.updated):
            print(f"indexed {report.added + report.updated} new or changed images into {out}", file=sys.stderr)
        for skipped in index.skipped():
            print(f"skipping {skipped.relpath}: {skipped.reason}", file=sys.stderr)
        results = index.search(text=args.query, image=args.image, k=args.topk, calibrate=args.calibrate)
        what = f'"{args.query}"' + (f" applied to {args.image}" if args.image else "")
        print(f"top {len(results)} of {len(index)} images for {what}:")
        for r in results:
            print(f"{r.rank:>3}. {r.score:.4f}  {r.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
