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
