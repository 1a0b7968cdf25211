#!/usr/bin/env bash
# Fresh machine -> passing test suite. Creates .venv (if absent), installs torch 2.13.0 (CPU),
# the project with its test extras, then runs the default (fast) suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow/data-heavy tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CALIBCLIP_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pytest "$@"
