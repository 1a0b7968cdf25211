# Sourced by quickstart.sh and test.sh: create .venv (or $CALIBCLIP_VENV) if absent, activate it,
# install torch 2.13.0 (CPU build) and the project; "$1" names pip extras, e.g. "[test]".
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${CALIBCLIP_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${1:-}"
