#!/usr/bin/env python
"""Seed-compatible batch evaluation (a thin wrapper over `calibclip batch-evaluate`).

    python scripts/batch_evaluate.py --checkpoint CKPT --datasets cuhkpedes icfgpedes rstp \
        --data_roots DIR1 DIR2 DIR3 --output_dir results/batch/
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ensure_environment  # noqa: E402

ensure_environment(__file__)  # outside calibclip's environment: one line with the exact command to run

from evaluate import seed_argv  # noqa: E402

from calibclip.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["batch-evaluate", *seed_argv(sys.argv[1:])]))
