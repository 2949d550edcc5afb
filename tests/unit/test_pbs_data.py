"""The PBS scheduler module: dialects, exit statuses, and qstat parsers.

Fixtures in tests/data, and where they come from:
- qstat_wrapper_recorded.txt: recorded on the test cluster from Slurm's PBS wrapper
  (`qstat -f 829 831`), the only PBS-speaking server this project can run;
- qstat_torque_docs.txt: the `qstat -f` example published in Torque's documentation
  ("Job Exit Status"), plus a running job in the same format;
- qstat_pbspro.json: NOT recorded: written by hand in the format of PBS Pro's
  `qstat -f -F json -x` (top-level timestamp/pbs_version/pbs_server/Jobs; Exit_status;
  comment) as PBS Pro's reference guide documents it, with typical comments for
  walltime and memory kills. Replace it with a real recording when one is available.
"""

from pathlib import Path

import pytest

from hpc_serverless.adapters.schedulers import pbs as P
from hpc_serverless.core.errors import ResourceError, TargetError
from hpc_serverless.core.target import Target

DATA = Path(__file__).resolve().parents[1] / "data"


def test_pbspro_json_states_and_reasons():
    st = P.parse_qstat_json((DATA / "qstat_pbspro.json").read_text())
    assert st["101"].status == "SUCCEEDED" and st["101"].nodes.startswith("x3005")
    assert st["102"].state == "TIMEOUT" and "walltime" in st["102"].reason
    assert st["103"].state == "OUT_OF_MEMORY"
    assert st["104"].status == "PENDING" and "Insufficient" in st["104"].reason
    assert st["105[]"].status == "RUNNING"
    assert st["105[3]"].status == "FAILED" and st["105[3]"].exit_code == "1"
    assert st["106"].state == "CANCELLED" and st["106"].status == "STOPPED"


def test_torque_text_from_docs_and_wrapper():
    st = P.parse_qstat_text((DATA / "qstat_torque_docs.txt").read_text())
    assert st["179"].status == "FAILED" and "before files" in st["179"].reason
    assert st["180"].status == "RUNNING" and st["180"].nodes == "node2/0+node2/1"
    st = P.parse_qstat_text((DATA / "qstat_wrapper_recorded.txt").read_text())
    assert st["829"].state == "COMPLETED" and st["829"].exit_code == ""  # the wrapper has none
    assert st["831"].status == "PENDING"


@pytest.mark.parametrize("code,comment,state,status", [
    (0, "", "COMPLETED", "SUCCEEDED"), (None, "", "COMPLETED", "SUCCEEDED"),
    (1, "", "FAILED", "FAILED"), (271, "", "KILLED", "FAILED"),
    (271, "job killed: walltime 152 exceeded limit 120", "TIMEOUT", "FAILED"),
    (-11, "", "FAILED", "FAILED"), (265, "job killed: mem 3gb exceeded limit 2gb", "OUT_OF_MEMORY", "FAILED"),
    (271, "Job deleted by user", "CANCELLED", "STOPPED"),
])
def test_exit_status_mapping(code, comment, state, status):
    assert P.final_state(code, comment)[:2] == (state, status)
    if code == 271 and not comment:
        assert "signal 15" in P.final_state(code, comment)[2]


@pytest.mark.parametrize("code,state,status", [
    (-29, "TIMEOUT", "FAILED"), (-27, "OUT_OF_MEMORY", "FAILED"), (-1, "FAILED", "FAILED"),
    (271, "KILLED", "FAILED"), (0, "COMPLETED", "SUCCEEDED"),
])
def test_pbspro_exit_statuses(code, state, status):
    """PBS Pro's JOB_EXEC_* values (OpenPBS src/include/job.h): -29 walltime, -27 mem."""
    word, got, reason = P.final_state(code, "", "pbspro")
    assert (word, got) == (state, status)
    if code == -29:
        assert "walltime" in reason


def test_pbspro_options():
    t = Target.of({"cpu": 4, "mem": "8G", "gpu": 2, "mpi": 8, "nodes": 2, "time": 90,
                   "queue": "prod", "account": "QuantumSim"})
    opts = P.qsub_options(t, "pbspro", directives=["-l place=scatter", "-l filesystems=home:eagle"],
                          job_name="vqe", array=10)
    assert opts == ["-N", "vqe", "-q", "prod", "-A", "QuantumSim", "-l",
                    "select=2:ncpus=16:mpiprocs=4:mem=8192mb:ngpus=2,walltime=01:30:00,"
                    "place=scatter,filesystems=home:eagle", "-J", "0-9"]


def test_torque_options():
    t = Target.of({"cpu": 2, "mem": "1G", "nodes": 2, "mpi": 4, "time": "00:10:00", "gpu": 1})
    opts = P.qsub_options(t, "torque", directives=["#PBS -m abe"], array=3)
    assert opts == ["-l", "nodes=2:ppn=4:gpus=1,mem=2048mb,walltime=00:10:00", "-t", "0-2", "-m", "abe"]


def test_targets_pbs_cannot_express():
    with pytest.raises(TargetError, match="qos"):
        P.qsub_options(Target.of({"qos": "high"}), "pbspro")
    with pytest.raises(ResourceError, match="must look like"):
        P.qsub_options(Target(), "torque", directives=["place=scatter"])


def test_ids():
    assert P.parse_qsub("1234.pbs01.example\n") == "1234.pbs01.example"
    assert P.parse_qsub("1234[].pbs01\n") == "1234[].pbs01"
    assert P.parse_qsub("829\n") == "829"
    assert P.short_id("1234[5].pbs01.example") == "1234[5]"
    with pytest.raises(ValueError):
        P.parse_qsub("qsub: Unknown queue")
    assert P.qstat_argv(["1", "2"], "pbspro") == ["qstat", "-f", "-F", "json", "-x", "1", "2"]
    assert P.qstat_argv(["1"], "torque") == ["qstat", "-f", "1"]
