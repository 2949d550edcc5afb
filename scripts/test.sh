#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite.
#
# As root on a Debian-like machine this installs and starts the real test cluster
# (Slurm with accounting, PBS command wrappers, OpenMPI, loopback sshd) with
# tests/cluster/up.sh. Elsewhere, cluster tests run against the site file named in
# HPC_SERVERLESS_TEST_SITE, or are skipped with one line that says why.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k local -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
T0=$SECONDS

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

if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="qiskit,slurm,ssh,pilot,progress,dev"
# mpi4py compiles against an MPI library; take it only where one is installed
if command -v mpicc >/dev/null 2>&1; then extras="$extras,mpi"; fi
.venv/bin/python -m pip install --quiet -e ".[$extras]"

echo "setup took $((SECONDS - T0)) s"
exec .venv/bin/python -m pytest tests "$@"
