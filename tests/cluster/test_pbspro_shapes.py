"""The fake PBS Pro server against PBS Pro's documented shapes, so that the fake and our
parser cannot drift together away from the real thing. Fixtures (tests/data):
- qstat_pbspro_docs.json: transcribed from OpenPBS design PP-483 (qstat -f -F json example);
- exit statuses: OpenPBS src/include/job.h (JOB_EXEC_KILL_WALLTIME = -29, ...), and the
  "=>> PBS: job killed: walltime X exceeded limit Y" line PBS writes to the job's stderr."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from hpc_serverless.adapters.schedulers import pbs as P

from .conftest import ROOT

pytestmark = pytest.mark.cluster

FAKE = ROOT / "tests/cluster/pbspro"
DOCS = json.loads((ROOT / "tests/data/qstat_pbspro_docs.json").read_text())


def run(*argv: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FAKE / argv[0]), *argv[1:]], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def finished(job_id: str, deadline: float = 90) -> dict:
    end = time.time() + deadline
    while time.time() < end:
        jobs = json.loads(run("qstat", "-f", "-F", "json", "-x", job_id).stdout)["Jobs"]
        if jobs and next(iter(jobs.values()))["job_state"] in "FX":
            return jobs
        time.sleep(1)
    raise AssertionError(f"{job_id} did not finish")


def test_ids_json_shape_exit_status_and_walltime_kill(tmp_path):
    ok = run("qsub", "-N", "shape", "-l", "select=1:ncpus=1:mem=100mb", stdin="#!/bin/sh\ntrue\n", cwd=tmp_path)
    assert re.match(r"^\d+\.pbsserver$", ok.stdout.strip()), ok.stderr
    wall = run("qsub", "-l", "walltime=00:00:02", stdin="#!/bin/sh\n#PBS -N overtime\nsleep 60\n", cwd=tmp_path)
    arr = run("qsub", "-J", "1-3", stdin="#!/bin/sh\nexit $PBS_ARRAY_INDEX\n", cwd=tmp_path)
    assert re.match(r"^\d+\[\]\.pbsserver$", arr.stdout.strip()), arr.stderr

    data = json.loads(run("qstat", "-f", "-F", "json", "-x", ok.stdout.strip()).stdout)
    assert set(data) == {k for k in DOCS if not k.startswith("_")}
    documented = next(iter(DOCS["Jobs"].values()))
    job = next(iter(data["Jobs"].values()))
    for key, value in documented.items():  # every documented attribute, with its type
        assert key in job and type(job[key]) is type(value), key
    assert re.match(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$", job["ctime"])

    done = finished(ok.stdout.strip())
    assert next(iter(done.values()))["Exit_status"] == 0
    killed = next(iter(finished(wall.stdout.strip()).values()))
    assert killed["Exit_status"] == -29 and killed["Job_Name"] == "overtime"
    err = (tmp_path / f"overtime.e{wall.stdout.split('.')[0]}").read_text()
    assert re.search(r"=>> PBS: job killed: walltime \d+ exceeded limit 2", err)
    assert P.parse_qstat_json(json.dumps({"Jobs": {"1.s": killed}}))["1"].state == "TIMEOUT"

    seq = arr.stdout.split("[")[0]
    finished(f"{seq}[3]")
    subjobs = json.loads(run("qstat", "-f", "-F", "json", "-x", "-t", f"{seq}[]").stdout)["Jobs"]
    assert subjobs[f"{seq}[].pbsserver"]["job_state"] == "F" and subjobs[f"{seq}[].pbsserver"]["array"] is True
    assert subjobs[f"{seq}[].pbsserver"]["Exit_status"] == 1  # some subjob exited non-zero
    assert [subjobs[f"{seq}[{i}].pbsserver"]["Exit_status"] for i in (1, 2, 3)] == [1, 2, 3]
    assert all(subjobs[f"{seq}[{i}].pbsserver"]["job_state"] == "X" for i in (1, 2, 3))


@pytest.mark.parametrize("argv,says", [
    (["-l", "nodes=1:ppn=2"], "Torque"), (["-l", "select=1:ncpus=1+1:ncpus=2"], "chunks"),
    (["-l", "filesystems=home"], "Unknown resource"), (["-W", "block=true"], "-W block"),
    (["-m", "abe"], "mail"), (["-J", "5-1"], "-J"), (["-W", "depend=before:1"], "before"),
])
def test_what_it_cannot_emulate_is_refused(argv, says):
    out = run("qsub", *argv, stdin="#!/bin/sh\ntrue\n")
    assert out.returncode != 0 and says in out.stderr and not out.stdout


def test_unknown_and_finished_ids():
    out = run("qstat", "-f", "-F", "json", "-x", "999999999.pbsserver")
    assert out.returncode != 0 and "Unknown Job Id" in out.stderr
    assert run("qdel", "999999999").returncode != 0
    assert run("qstat", "-Q").returncode != 0  # not emulated: said so
