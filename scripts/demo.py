#!/usr/bin/env python
"""Seed-compatible demo: rank the images of a folder for a text query and print the top matches.

    python scripts/demo.py --config configs/cuhkpedes.yaml --checkpoint CKPT --image_dir DIR \
        --query "A woman wearing a red dress" [--topk 5] [--calibrate]

Image features are cached (feature cache), so repeated queries on the same folder are fast.
Unreadable files are skipped with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    p.add_argument("--topk", type=int, default=5, help="matches to print (default 5)")
    p.add_argument("--calibrate", action="store_true", help="CalibCLIP re-ranking with the config's settings")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: config's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from calibclip.data.cache import FeatureCache
    from calibclip.data.images import load_image
    from calibclip.data.scan import scan_images
    from calibclip.evaluation.config import load_config
    from calibclip.evaluation.evaluator import similarity_matrix
    from calibclip.calibration import create_calibrator
    from calibclip.data.registry import get_dataset
    from calibclip.evaluation.runner import load_encoder

    args = parse_args(argv)
    cfg = load_config(args.config)
    m = cfg["model"]
    task = "person" if cfg.get("dataset") and get_dataset(cfg["dataset"]).task == "person" else "captions"
    encoder = load_encoder(args.model or m["name"], task, args.device or m["device"], m["precision"],
                           m.get("clip_image_size"))
    calibrator = create_calibrator(encoder, settings=cfg.get("calibration")) if args.calibrate else None
    scan = scan_images(args.image_dir)
    usable = []
    for f in scan.files:  # decode check up front so one bad file does not stop the demo
        try:
            load_image(f.path)
            usable.append(f.path)
        except Exception as exc:  # noqa: BLE001 - any undecodable file is skipped and reported
            print(f"skipping {f.relpath}: {exc}", file=sys.stderr)
    if not usable:
        raise SystemExit(f"no readable images under {args.image_dir}")
    names = ("raw", "calibrated") if calibrator else ("raw",)
    tags = {"dataset": f"folder:{Path(args.image_dir).resolve()}", "split": "demo",
            "preprocess": encoder.preprocess.describe()}
    if calibrator:
        tags["variant"] = calibrator.config_id()
    cache = FeatureCache()
    images = cache.image_features(encoder, usable, fn=calibrator.image_features if calibrator else None,
                                  names=names, **tags)
    with torch.inference_mode():
        batch = encoder.tokenize([args.query]).to(encoder.device)
        text = calibrator.text_features(batch) if calibrator else {"raw": encoder.encode_text(batch)}
    scores = similarity_matrix({k: v.float().cpu().numpy() for k, v in text.items()}, images, calibrator)[0]
    top = torch.topk(scores, min(args.topk, len(usable)))
    print(f'top {len(top.indices)} of {len(usable)} images for "{args.query}":')
    for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>3}. {score:.4f}  {usable[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
