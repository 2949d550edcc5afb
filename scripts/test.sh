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
# Other arguments go to pytest (e.g. `bash scripts/test.sh -k local -x`, or
# `bash scripts/test.sh tests/unit -q` to run only the files or folders named).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
T0=$SECONDS

mode=locked venv=.venv
args=()
for arg in "$@"; do
    if [[ $arg == --latest ]]; then mode=latest venv=.venv-latest; else args+=("$arg"); fi
done

cluster_note="" client=""
if [[ -n ${HPC_SERVERLESS_TEST_SITE:-} ]]; then
    cluster_note="cluster tests: against $HPC_SERVERLESS_TEST_SITE"
elif [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    bash tests/cluster/up.sh
    export HPC_SERVERLESS_TEST_SITE=site_configs/localhost-slurm.yaml
    export HPC_SERVERLESS_TEST_PBS_SITE=site_configs/localhost-pbs.yaml        # Torque wrappers
    export HPC_SERVERLESS_TEST_PBSPRO_SITE=site_configs/localhost-pbspro.yaml  # fake PBS Pro
    # root hides permission bugs: the suite runs as the cluster's unprivileged test client
    client=hpcs-dev
    cluster_note="cluster tests: against the local test cluster (tests/cluster/up.sh), client: $client"
else
    cluster_note="cluster tests: SKIPPED (not root on a Debian-like machine, and HPC_SERVERLESS_TEST_SITE is not set)"
fi
echo "$cluster_note"

extras="qiskit,ibm,slurm,ssh,pilot,progress,dev"
# mpi4py compiles against an MPI library; take it only where one is installed
if command -v mpicc >/dev/null 2>&1; then extras="$extras,mpi"; fi
# (absolute paths: a relative one would pass from inside a folder the client cannot enter)
if [[ -n $client ]] && ! runuser -u "$client" -- test -r "$PWD/pyproject.toml" -a -x "$PWD/tests" 2>/dev/null; then
    # a checkout the client cannot reach (under /root, a 0700 temporary folder): run the
    # suite from a copy it can read, rather than as root
    copy=/var/tmp/hpcs-test-checkout
    echo "test.sh: the test client '$client' cannot read $PWD; running the suite from a copy in $copy"
    rm -rf "$copy"
    install -d -m 755 "$copy"
    tar --exclude=./.venv --exclude=./.venv-latest --exclude=./.git -cf - . | tar -C "$copy" -xpf -
    cd "$copy"
fi
if [[ -n $client ]]; then
    # the client runs the venv's python: build it from an interpreter the client can run
    # (pyenv's under /root cannot be)
    if ! runuser -u "$client" -- "$venv/bin/python" -c '' 2>/dev/null; then
        rm -rf "$venv"
        chosen=""
        for py in "${PYTHON:-python3}" /usr/bin/python3; do
            py=$(readlink -f "$(command -v "$py" || echo /nonexistent)")
            if runuser -u "$client" -- "$py" -c '' 2>/dev/null; then chosen=$py; break; fi
        done
        [[ -n $chosen ]] || { echo "test.sh: no python that '$client' can run" >&2; exit 2; }
        export PYTHON=$chosen
    fi
fi
setup_venv "$venv" "$extras" "$mode"
export HPC_SERVERLESS_TEST_DEPS=$mode   # tests/unit/test_tooling.py checks the lock was honoured

echo "setup took $((SECONDS - T0)) s ($mode versions in $venv)"
run_as=()
[[ -n $client ]] && run_as=(runuser -u "$client" --)
# the whole suite, unless the arguments name test files or folders (tests/unit, file::test)
where=(tests)
for arg in ${args[@]+"${args[@]}"}; do
    if [[ $arg != -* && -e ${arg%%::*} ]]; then where=(); break; fi
done
# -p no:cacheprovider: the client may not write into the checkout
exec ${run_as[@]+"${run_as[@]}"} "$venv/bin/python" -m pytest -p no:cacheprovider ${where[@]+"${where[@]}"} ${args[@]+"${args[@]}"}
