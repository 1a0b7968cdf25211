#!/usr/bin/env bash
# Fresh machine -> passing test suite. Creates .venv (if absent), installs torch 2.13.0 (CPU),
# the project with its test extras, then runs the default (fast) suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow/data-heavy tests.
set -euo pipefail
. "$(dirname "$0")/venv.sh" "[test]"
python -m pytest "$@"
