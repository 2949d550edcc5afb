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


def test_qpu_sweep_queues_its_points_for_the_local_qpu():
    out = subprocess.run([sys.executable, str(ROOT / "examples/qpu_sweep.py"), "--points", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if re.match(r"\s*[+-]\d\.\d{4} ", ln)]
    assert [row[2] for row in rows] == ["aer"] * 4  # the local provider's one QPU
    exact = {-3.1416: -1.0, -1.5708: -1.0, 0.0: 1.0, 1.5708: 1.0}  # 1.0 cos + 1.0 sin, h = 0.5
    for theta, energy, _, seconds in rows:
        assert abs(float(energy) - exact[float(theta)]) < 1e-6 and float(seconds) > 0
    assert re.search(r"minimum -1\.41421\d at theta -2\.356\d, exact ground energy -1\.414214", out.stdout)
    assert re.search(r"wall time \d+\.\d\d s, QPU busy \d+\.\d\d s, ratio [01]\.\d\d", out.stdout)
    assert "QPU intervals: 4 tasks, none overlapping on the same QPU" in out.stdout
