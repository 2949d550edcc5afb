"""The project's own standards, checked with the rest of the suite: lint and types."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean():
    if shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    # --no-cache: the test client may not write into the checkout
    out = subprocess.run([ruff, "check", "--no-cache", "hpc_serverless", "tests", "examples", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]


def test_mypy_is_clean(tmp_path):
    pytest.importorskip("mypy")
    # its cache in tmp_path: the test client may not write into the checkout
    out = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "hpc_serverless"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]


def test_the_test_environment_is_the_lock():
    """scripts/test.sh installs requirements/test.lock exactly, so CI tests what was tested."""
    import os
    from importlib import metadata

    if os.environ.get("HPC_SERVERLESS_TEST_DEPS") != "locked":
        pytest.skip("not installed from the lock (scripts/test.sh --latest, or pytest run by hand)")
    wrong = []
    for line in (ROOT / "requirements/test.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this machine doesn't take (mpi4py without an MPI library)
        if installed != version:
            wrong.append(f"{name}: locked {version}, installed {installed}")
    assert not wrong, "\n".join(wrong)
