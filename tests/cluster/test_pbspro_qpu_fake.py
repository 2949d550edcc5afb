"""QPUs in the fake PBS Pro (tests/cluster/pbspro/): the server resources `aer`/`fake`
(`-l aer=1`) and the PBS QRMI hook's `-l quantum_resources=...` are Slurm licenses of the
test cluster (Licenses=aer:1,fake:1), so jobs holding a QPU never overlap, neither with each
other nor with plain `sbatch -L aer:1` jobs; the hook's QRMI_* variables reach the job and
qstat shows the request under Resource_List. Plain commands, as the test client."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.cluster

FAKE = ROOT / "tests/cluster/pbspro"
# start and end of the job, to the nanosecond, in its output
TIMED = "#!/bin/sh\n{directives}date +%s.%N\n{body}sleep 3\ndate +%s.%N\n"


def run(*argv: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FAKE / argv[0]), *argv[1:]], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


@pytest.fixture(scope="module", autouse=True)
def licenses() -> None:
    """Without the cluster's licenses every job here would be refused: say why instead."""
    out = subprocess.run(["scontrol", "show", "lic"], capture_output=True, text=True, timeout=30).stdout
    if "LicenseName=aer" not in out or "LicenseName=fake" not in out:
        pytest.skip("the test cluster has no licenses aer and fake (tests/cluster/up.sh makes them)")


def qsub(tmp_path: Path, *options: str, directives: str = "", body: str = "") -> str:
    out = run("qsub", *options, stdin=TIMED.format(directives=directives, body=body), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def output(path: Path, deadline: float = 120) -> list[str]:
    """The job's output lines once its closing timestamp is there."""
    end = time.time() + deadline
    while time.time() < end:
        lines = path.read_text().split() if path.exists() else []
        if sum(1 for w in lines if w[:1].isdigit()) >= 2:
            return lines
        time.sleep(0.5)
    raise AssertionError(f"no finished output in {path}")


def span(lines: list[str]) -> tuple[float, float]:
    stamps = [float(w) for w in lines if w[:1].isdigit()]
    return stamps[0], stamps[-1]


def test_qpu_jobs_take_turns_and_get_the_qrmi_environment(tmp_path):
    a = qsub(tmp_path, "-N", "qa", "-l", "aer=1", directives="#PBS -l walltime=60\n")
    b = qsub(tmp_path, "-N", "qb", "-l", 'walltime=60,quantum_resources="aer,fake"',
             body="echo $QRMI_JOB_QPU_RESOURCES $QRMI_JOB_QPU_TYPES $QRMI_LIST_DELIMITER\n")
    plain = tmp_path / "plain.out"
    c = subprocess.run(["sbatch", "--parsable", "-L", "aer:1", f"--output={plain}", f"--chdir={tmp_path}"],
                       input=TIMED.format(directives="", body=""), capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    sbatch = subprocess.run(["squeue", "-h", "-o", "%i %W", "-j", f"{a.split('.')[0]},{b.split('.')[0]}"],
                            capture_output=True, text=True, timeout=30).stdout
    outs = {"a": output(tmp_path / f"qa.o{a.split('.')[0]}"), "b": output(tmp_path / f"qb.o{b.split('.')[0]}"),
            "c": output(plain)}
    assert outs["b"][1:4] == ["aer:fake", "simulator:simulator", ":"], outs["b"]
    spans = sorted(span(lines) for lines in outs.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):  # one holder of `aer` at a time
        assert start >= end, spans
    if sbatch:  # still queued or running when asked: the licenses Slurm was given, job by job
        given = dict(line.split() for line in sbatch.splitlines())
        expected = {a.split(".")[0]: "aer:1", b.split(".")[0]: "aer:1,fake:1"}
        assert given == {k: v for k, v in expected.items() if k in given}, sbatch

    text = run("qstat", "-f", "-x", a, b).stdout
    assert "    Resource_List.aer = 1\n" in text and "    Resource_List.quantum_resources = aer,fake\n" in text
    jobs = json.loads(run("qstat", "-f", "-F", "json", "-x", a, b).stdout)["Jobs"]
    assert jobs[a]["Resource_List"]["aer"] == 1 and "quantum_resources" not in jobs[a]["Resource_List"]
    assert jobs[b]["Resource_List"]["quantum_resources"] == "aer,fake"
    assert jobs[a]["Exit_status"] == jobs[b]["Exit_status"] == 0


@pytest.mark.parametrize("option, said", [
    ("aer=x", "Illegal attribute or resource value for aer: x"),
    ("aer=-1", "Illegal attribute or resource value for aer: -1"),
    ("fake=1.5", "Illegal attribute or resource value for fake: 1.5"),
    ("quantum_resources=qpu9", "Illegal attribute or resource value for quantum_resources: qpu9"),
    ("quarks=1", "Unknown resource Resource_List.quarks (this fake knows aer, fake, mem, ncpus, ngpus, place, "
                 "quantum_resources, select, walltime)"),
])
def test_bad_qpu_requests_are_refused(tmp_path, option, said):
    out = run("qsub", "-l", option, stdin="#!/bin/sh\ntrue\n", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "" and said in out.stderr, out.stderr
    in_script = run("qsub", stdin=f"#!/bin/sh\n#PBS -l {option}\ntrue\n", cwd=tmp_path)  # a #PBS line alike
    assert in_script.returncode == 2 and said in in_script.stderr, in_script.stderr
