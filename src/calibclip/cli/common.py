"""Options shared by several subcommands (``--backend``, ``--precision int8``)."""

from __future__ import annotations

import argparse
import os

#: ``--precision`` choices of commands that build a model (int8 needs ``--backend onnx``).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def add_backend_argument(p: argparse.ArgumentParser, precision: bool = False) -> None:
    """Add ``--backend torch|onnx`` (and, with ``precision=True``, ``--precision fp32|int8`` for commands
    whose model otherwise follows the index)."""
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="inference backend: torch or onnx (ONNX Runtime; exported once per model into "
        "$CALIBCLIP_CACHE/onnx). Default $CALIBCLIP_BACKEND, else torch",
    )
    if precision:
        p.add_argument(
            "--precision",
            choices=("fp32", "int8"),
            default=None,
            help="int8: dynamic int8 quantisation (needs --backend onnx); default: the index's precision",
        )


def apply_backend(args: argparse.Namespace) -> None:
    """Make every model this command creates use ``args.backend`` (and int8 when ``--precision int8``).

    Raises:
        ValueError: ``--precision int8`` without ``--backend onnx``.
    """
    backend = getattr(args, "backend", None) or os.environ.get("CALIBCLIP_BACKEND") or None
    int8 = getattr(args, "precision", None) == "int8"
    if int8 and backend != "onnx":
        raise ValueError("--precision int8 needs --backend onnx (torch runs fp32, bf16 or fp16)")
    if backend is None:
        return
    from calibclip.models.registry import set_default_backend

    set_default_backend(backend, "int8" if int8 else None)
    os.environ["CALIBCLIP_BACKEND"] = backend  # server worker processes inherit the choice
    if int8:
        os.environ["CALIBCLIP_ONNX_PRECISION"] = "int8"
