# Sourced by quickstart.sh and test.sh: one way to build the project's virtual environment.
#
#   setup_venv DIR EXTRAS locked|latest
#
# "locked" installs the exact versions of requirements/test.lock (pip constraints), so a run
# tests what was tested; "latest" ignores the lock and takes the newest releases that
# pyproject.toml's ranges allow, to catch drift on purpose. Safe to run again: an existing
# environment is brought to the wanted versions, not rebuilt.
LOCK=requirements/test.lock

setup_venv() {
    local dir=$1 extras=$2 mode=$3
    local py=${PYTHON:-python3}
    if [[ ! -x $dir/bin/python ]]; then
        "$py" -m venv "$dir"
    fi
    local pip=("$dir/bin/python" -m pip install --quiet --disable-pip-version-check)
    if [[ $mode == locked ]]; then
        # the build backend too: our package builds with the locked setuptools, not with
        # whatever an isolated build environment would download today
        "${pip[@]}" -c "$LOCK" pip setuptools
        "${pip[@]}" -c "$LOCK" --no-build-isolation -e ".[$extras]"
    else
        "${pip[@]}" --upgrade pip
        "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[$extras]"
    fi
}
