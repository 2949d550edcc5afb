#!/usr/bin/env bash
# Refresh requirements/test.lock: resolve the newest releases that pyproject.toml allows for
# every extra the suite uses, in a throw-away environment, and write their exact versions.
# Run it on the CI machine's kind (the lock is for its Python and platform), then run the
# suite (`bash scripts/test.sh`) before committing the new lock.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
EXTRAS="qiskit,ibm,slurm,ssh,pilot,progress,dev,mpi"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check ".[$EXTRAS]"
{
    echo "# The exact versions the test suite runs with: pip constraints, used by scripts/test.sh"
    echo "# and scripts/quickstart.sh (users installing the package get pyproject.toml's ranges)."
    echo "# Resolved for $("$tmp/venv/bin/python" -c 'import platform, sys; print(f"CPython {sys.version_info[0]}.{sys.version_info[1]} on {sys.platform} {platform.machine()} (with {platform.python_version()})")')"
    echo "# (the CI machine's kind), extras [$EXTRAS], on $(date -u +%Y-%m-%d)."
    echo "# Refresh: bash scripts/lock.sh, then bash scripts/test.sh; newest releases without"
    echo "# touching this file: bash scripts/test.sh --latest."
    "$tmp/venv/bin/python" -m pip freeze --all --disable-pip-version-check --exclude hpc-serverless \
        --exclude setuptools --exclude wheel | LC_ALL=C sort -f
    # setuptools and wheel come with the venv; the dev extra asks for setuptools: pin it too
    "$tmp/venv/bin/python" -m pip freeze --all --disable-pip-version-check | grep -iE '^setuptools==' || true
} > requirements/test.lock.new
mv requirements/test.lock.new requirements/test.lock
echo "wrote requirements/test.lock ($(grep -vc '^#' requirements/test.lock) packages)"
