#!/usr/bin/env bash
# One-off tree-wide clean-up: apply ruff's safe lint fixes (import sorting, pyupgrade) and the
# formatter to src/ and tests/, then report what is left. Run once after merging parallel work;
# afterwards scripts/lint.sh (and .ci/run) keep the tree clean. Uses the active environment's ruff
# (activate .venv first, or run scripts/lint.sh once to create it).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check --fix src tests || true
ruff format src tests
ruff check --fix src tests || true   # formatting can expose a few more fixable issues
ruff check src tests
ruff format --check src tests
# Docstrings and help texts should point into docs/, not at README sections (the README is short now).
if grep -rn 'README "\|README, section' src configs; then
    echo "format_all.sh: the lines above still cite README sections; point them at docs/*.md" >&2
fi
mypy src || echo "format_all.sh: mypy reports errors (a reformat can move a line-level '# type: ignore')" >&2
