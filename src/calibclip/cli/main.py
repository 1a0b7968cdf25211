"""`calibclip` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Subcommand modules under `calibclip.cli`, in the order `--help` lists them.
COMMANDS = (
    "models",
    "version",
    "index",
    "search",
    "info",
    "evaluate",
    "batch_evaluate",
    "explain",
    "train",
    "train_starter",
    "train_combiner",
    "make_css",
    "make_pseudo_cir",
    "serve",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``calibclip`` parser with every subcommand of `COMMANDS`.

    Args:
        only: build just this subcommand (a module name of `COMMANDS`): `main` does so when the command
            line names one, so a one-off ``calibclip search`` does not import the other 13 modules.

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
    for name in COMMANDS if only is None else (only,):
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


#: Failures a user can cause and fix (bad input, missing or damaged files, unmet requirements): one line, exit 2.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError, ImportError)


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` wherever it appears before a ``--`` (it is global: before or after the subcommand)."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], debug


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a KeyError's message without its repr quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _silence_stdout() -> None:
    """After a broken pipe (output piped into `head`), point stdout at /dev/null so the interpreter's
    final flush does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests, embedding)
        pass


def _parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the one subcommand ``argv`` starts with (lazy imports), else the full parser."""
    first = argv[0].replace("-", "_") if argv else ""
    if first in COMMANDS:
        parser = build_parser(only=first)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if argv[0] in sub.choices:
            return parser
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: the CLI's single error boundary.

    Expected failures (`EXPECTED_ERRORS`) print ``calibclip CMD: error: MESSAGE`` and return 2; any other
    exception prints one line ending "rerun with --debug for the traceback" and returns 1; ``--debug``
    (anywhere on the command line) re-raises instead. A closed stdout (``| head``) ends the run quietly (141,
    as a shell reports SIGPIPE).
    """
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = _parser_for(argv)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (accepted before or after the command)",
    )
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    command = args.command
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except EXPECTED_ERRORS as exc:
        if debug:
            raise
        print(f"calibclip {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the boundary: anything else is a bug, reported in one line
        if debug:
            raise
        print(
            f"calibclip {command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
