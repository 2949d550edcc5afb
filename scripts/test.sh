#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite.
#
# As root on a Debian-like machine this installs and starts the real test cluster
# (Slurm with accounting, PBS command wrappers, OpenMPI, loopback sshd) with
# tests/cluster/up.sh. Elsewhere, cluster tests run against the site file named in
# HPC_SERVERLESS_TEST_SITE, or are skipped with one line that says why.
#
# The test environment (.venv) holds the exact versions of requirements/test.lock, so CI
# tests what was tested. `bash scripts/test.sh --latest` runs the suite against the newest
# releases that pyproject.toml allows instead, in .venv-latest, to catch drift on purpose.
# Other arguments go to pytest (e.g. `bash scripts/test.sh -k local -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
T0=$SECONDS

mode=locked venv=.venv
args=()
for arg in "$@"; do
    if [[ $arg == --latest ]]; then mode=latest venv=.venv-latest; else args+=("$arg"); fi
done

cluster_note=""
if [[ -n ${HPC_SERVERLESS_TEST_SITE:-} ]]; then
    cluster_note="cluster tests: against $HPC_SERVERLESS_TEST_SITE"
elif [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    bash tests/cluster/up.sh
    export HPC_SERVERLESS_TEST_SITE=site_configs/localhost-slurm.yaml
    export HPC_SERVERLESS_TEST_PBS_SITE=site_configs/localhost-pbs.yaml        # Torque wrappers
    export HPC_SERVERLESS_TEST_PBSPRO_SITE=site_configs/localhost-pbspro.yaml  # fake PBS Pro
    cluster_note="cluster tests: against the local test cluster (tests/cluster/up.sh)"
else
    cluster_note="cluster tests: SKIPPED (not root on a Debian-like machine, and HPC_SERVERLESS_TEST_SITE is not set)"
fi
echo "$cluster_note"

extras="qiskit,slurm,ssh,pilot,progress,dev"
# mpi4py compiles against an MPI library; take it only where one is installed
if command -v mpicc >/dev/null 2>&1; then extras="$extras,mpi"; fi
setup_venv "$venv" "$extras" "$mode"
export HPC_SERVERLESS_TEST_DEPS=$mode   # tests/unit/test_tooling.py checks the lock was honoured

echo "setup took $((SECONDS - T0)) s ($mode versions in $venv)"
exec "$venv/bin/python" -m pytest tests ${args[@]+"${args[@]}"}
