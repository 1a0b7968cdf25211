#!/usr/bin/env python
"""Package a fine-tuned starter run folder as one shippable weights file (fp16 tower tensors).

    python tools/package_starter.py RUN/best src/calibclip/weights/starter-person.safetensors \
        --meta val_metrics='{"R@1": ...}'

See docs/training.md, "starter-person".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import calibclip  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    import torch

    from calibclip.models.starter import package_starter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="OUT/best (or its model.safetensors) of `calibclip train` on the starter")
    p.add_argument("dest", help="weights file to write")
    p.add_argument("--fp32", action="store_true", help="keep the tower tensors in fp32 (default fp16)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata to add (repeatable)")
    args = p.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.meta)
    dest = package_starter(args.source, args.dest, torch.float32 if args.fp32 else torch.float16, extra)
    print(f"{dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
