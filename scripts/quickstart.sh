#!/usr/bin/env bash
# Set up a virtual environment and run the quick start on the `local` provider.
# Safe to run again: the environment is reused and only updated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[qiskit,progress]"
exec .venv/bin/python examples/quickstart.py "$@"
