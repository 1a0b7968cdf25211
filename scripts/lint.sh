#!/usr/bin/env bash
# Lint, format check and type check (what .ci/run runs before the tests). Creates .venv with the
# test extras (ruff, mypy) if absent, like scripts/test.sh.
set -euo pipefail
. "$(dirname "$0")/venv.sh" "[test]"
ruff check src tests
ruff format --check src tests
mypy src
