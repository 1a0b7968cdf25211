"""`calibclip` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules under `calibclip.cli`, in the order `--help` lists them.
COMMANDS = (
    "models", "version", "index", "search", "info", "evaluate", "batch_evaluate", "explain",
    "train", "train_starter", "train_combiner", "make_css", "make_pseudo_cir", "serve",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``calibclip`` parser with every subcommand of `COMMANDS`.

    Returns:
        The parser; each subcommand's ``func`` default is its module's ``run``.

    Raises:
        RuntimeError: a subcommand module is missing (a broken rename) or fails to import.
    """
    parser = argparse.ArgumentParser(
        prog="calibclip",
        description="CLIP-based image retrieval: indexing, search, CalibCLIP calibration, composed retrieval.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"calibclip.cli.{name}")
        except ImportError as exc:
            raise RuntimeError(
                f"calibclip subcommand module calibclip.cli.{name} cannot be imported ({exc}); it is listed in "
                "calibclip.cli.main.COMMANDS: restore the module or remove it from COMMANDS"
            ) from exc
        p = module.add_parser(sub)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"calibclip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
