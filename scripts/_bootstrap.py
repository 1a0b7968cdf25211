"""Shared start of the seed scripts: make ``import calibclip`` work from a source checkout and, when the
script runs outside calibclip's environment (no torch, numpy ...), exit with one line that gives the exact
command to run instead of a traceback."""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What every script needs before it can do anything (the heavy dependencies of calibclip).
REQUIRED = ("numpy", "torch", "PIL", "yaml")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path, Path.cwd())
    return str(path) if rel.startswith("..") else rel


def next_command(script: str, argv: list[str]) -> str:
    """The command that runs ``script`` with ``argv`` inside the project's virtual environment (set up by
    scripts/venv.sh when it does not exist yet)."""
    venv = Path(os.environ.get("CALIBCLIP_VENV") or REPO / ".venv")
    run = shlex.join(["python", _shown(Path(script).resolve()), *argv])
    if (venv / "bin" / "python").exists():
        return f"{shlex.join(['.', _shown(venv / 'bin' / 'activate')])} && {run}"
    setup = shlex.join([".", _shown(REPO / "scripts" / "venv.sh")])
    return f"{setup} && cd {shlex.quote(os.getcwd())} && {run}"


def ensure_environment(script: str) -> None:
    """Put ``src/`` on the path for a source checkout; exit 1 with one line if a dependency is missing."""
    try:
        import calibclip  # noqa: F401
    except ImportError:  # running from a source checkout without `pip install -e .`
        sys.path.insert(0, str(REPO / "src"))
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"{Path(script).name}: error: {exc} (this Python, {sys.executable}, is not calibclip's "
                  f"environment); run: {next_command(script, sys.argv[1:])}   (scripts/venv.sh creates .venv once; "
                  "later: . .venv/bin/activate first)", file=sys.stderr)
            raise SystemExit(1) from None
