#!/usr/bin/env python
"""Seed-compatible batch evaluation (a thin wrapper over `calibclip batch-evaluate`).

    python scripts/batch_evaluate.py --checkpoint CKPT --datasets cuhkpedes icfgpedes rstp \
        --data_roots DIR1 DIR2 DIR3 --output_dir results/batch/
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import torch  # noqa: F401
except ImportError:
    sys.exit(f"error: torch is not installed for {sys.executable}; activate the project's environment first: "
             ". .venv/bin/activate   (created by: bash scripts/quickstart.sh)")
try:
    import calibclip  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from evaluate import seed_argv

from calibclip.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["batch-evaluate", *seed_argv(sys.argv[1:])]))
