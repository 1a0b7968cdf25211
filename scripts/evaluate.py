#!/usr/bin/env python
"""Seed-compatible evaluation script (a thin wrapper over `calibclip evaluate`).

    python scripts/evaluate.py --config configs/cuhkpedes.yaml --checkpoint CKPT --data_root DIR --output_dir results/

Flags are those of `calibclip evaluate`; ``--data_root``/``--output_dir`` (underscores) are accepted.
The dataset comes from the config's ``dataset:`` unless ``--dataset`` is given.
"""

from __future__ import annotations

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

from calibclip.cli.main import main

UNDERSCORE_FLAGS = {"--data_root": "--data-root", "--output_dir": "--output-dir", "--batch_size": "--batch-size",
                    "--data_roots": "--data-roots", "--no_cache": "--no-cache"}


def seed_argv(argv: list[str]) -> list[str]:
    """Map the seed's underscore flags (also ``--flag=value``) to the CLI's dashed ones."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(UNDERSCORE_FLAGS.get(flag, flag) + eq + value)
    return out


if __name__ == "__main__":
    sys.exit(main(["evaluate", *seed_argv(sys.argv[1:])]))
