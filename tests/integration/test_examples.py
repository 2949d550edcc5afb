"""The examples a newcomer runs first: they must work and be right."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qiskit_aer")
ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_matches_direct_estimator():
    out = subprocess.run([sys.executable, str(ROOT / "examples/quickstart.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("circuit ")]
    assert len(lines) == 3
    for line in lines:
        served, direct = map(float, re.findall(r"serverless (\S+) direct (\S+)", line)[0])
        assert abs(served - direct) < 1e-9
    assert "expectation values: [" in out.stdout


def test_benchmark_example_runs_from_flags():
    out = subprocess.run([sys.executable, str(ROOT / "examples/benchmark.py"), "--n-graphs", "2",
                          "--n-backends", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"Execution time: \d+\.\d+", out.stdout)


def test_benchmark_example_as_local_program():
    from hpc_serverless import Program, QuantumServerless

    program = Program(title="benchmark_program", entrypoint="benchmark.py",
                      working_dir=str(ROOT / "examples"), description="Benchmark program")
    job = QuantumServerless().run_program(program, arguments={"n_graphs": 2, "n_backends": 2})
    result = job.result(timeout=300)
    assert job.status() == "SUCCEEDED"
    assert result["execution_time"] > 0
    assert "Execution time:" in job.logs()
