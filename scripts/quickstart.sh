#!/usr/bin/env bash
# Set up a virtual environment and run the quick start on the `local` provider.
# Safe to run again: the environment is reused and only updated. Installs the versions
# the project was tested with (requirements/test.lock).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
setup_venv .venv "qiskit,progress" locked
exec .venv/bin/python examples/quickstart.py "$@"
