#!/usr/bin/env python
"""Seed-compatible training script (a thin wrapper over `calibclip train`).

    python tools/train.py --config configs/cuhkpedes.yaml --data_root /path/to/CUHK-PEDES --output_dir outputs/

Flags are those of `calibclip train` (docs/training.md); the seed's underscore spellings (``--data_root``,
``--output_dir``, ``--batch_size`` ...) are accepted as in scripts/evaluate.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import calibclip  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from calibclip.cli.main import main

UNDERSCORE_FLAGS = {
    "--data_root": "--data-root",
    "--output_dir": "--output-dir",
    "--batch_size": "--batch-size",
    "--top_blocks": "--top-blocks",
    "--val_split": "--val-split",
    "--image_curriculum_epochs": "--image-curriculum-epochs",
    "--text_curriculum_epochs": "--text-curriculum-epochs",
    "--grad_checkpointing": "--grad-checkpointing",
    "--checkpoint_every": "--checkpoint-every",
    "--eval_test": "--eval-test",
    "--no_progress": "--no-progress",
}


def seed_argv(argv: list[str]) -> list[str]:
    """Map the seed's underscore flags (also ``--flag=value``) to the CLI's dashed ones."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        out.append(UNDERSCORE_FLAGS.get(flag, flag) + eq + value)
    return out


if __name__ == "__main__":
    sys.exit(main(["train", *seed_argv(sys.argv[1:])]))
