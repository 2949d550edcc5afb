"""The Slurm scheduler module: pure functions on recorded output (tests/data/*)."""

from pathlib import Path

import pytest

from hpc_serverless.adapters.schedulers import slurm as S
from hpc_serverless.core.errors import ResourceError
from hpc_serverless.core.target import Target

DATA = Path(__file__).resolve().parents[1] / "data"


def test_parse_sacct_recorded_output():
    # recorded from the test cluster (Slurm 22.05) with S.sacct_argv, extended by hand
    # with the failure states a shared cluster shows
    states = S.parse_sacct((DATA / "sacct_recorded.txt").read_text())
    assert states["21"].state == "CANCELLED" and states["21"].status == "STOPPED"
    assert states["21"].reason == "Dependency" and states["21"].nodes == ""
    assert states["20_1"].status == "FAILED" and states["20_1"].exit_code == "3:0"
    assert [states[f"30_{i}"].reason for i in (3, 4, 5, 8)] == ["Resources"] * 4
    assert states["31"].state == "TIMEOUT" and states["31"].status == "FAILED"
    assert states["32"].state == "OUT_OF_MEMORY"
    assert states["33"].status == "SUCCEEDED" and states["34"].status == "RUNNING"
    assert states["34"].nodes == "n[1-2]" and states["37"].reason == "Priority"
    assert all(s.final for s in (states["35"], states["36"]))


@pytest.mark.parametrize("state", ["PENDING", "RUNNING", "COMPLETING", "COMPLETED", "FAILED",
                                   "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                                   "BOOT_FAIL", "DEADLINE"])
def test_every_state_is_mapped(state):
    assert state in S.STATE_MAP
    if S.STATE_MAP[state] in ("FAILED", "STOPPED"):
        assert state in S.FAILURE_TEXT or state == "BOOT_FAIL" or state in S.FAILURE_TEXT


def test_parse_squeue():
    out = "40|PENDING|Priority|\n41_[0-2]|PENDING|Resources|\n42|RUNNING|None|n1\n"
    states = S.parse_squeue(out)
    assert states["40"].reason == "Priority" and states["41_2"].status == "PENDING"
    assert states["42"].status == "RUNNING" and states["42"].nodes == "n1"


def test_expand_array_ids():
    assert S.expand_array_ids("12_[0-2,5]") == ["12_0", "12_1", "12_2", "12_5"]
    assert S.expand_array_ids("12_[0-3%2]") == ["12_0", "12_1", "12_2", "12_3"]
    assert S.expand_array_ids("12_7") == ["12_7"]
    assert S.expand_array_ids("12") == ["12"]


def test_parse_sbatch_and_config():
    assert S.parse_sbatch("123\n") == "123"
    assert S.parse_sbatch("123;cluster\n") == "123"
    assert S.parse_sbatch("Submitted batch job 77\n") == "77"
    with pytest.raises(ValueError):
        S.parse_sbatch("sbatch: error: nope")
    assert S.parse_max_array_size("ClusterName = x\nMaxArraySize            = 1001\n") == 1001


def test_parse_sinfo_and_fit_checks():
    parts = S.parse_sinfo("debug*|2|4000|(null)|4|infinite|up\ngpu|64|512000|gpu:a100:4|10|2-00:00:00|up\n")
    assert parts["debug"].default and parts["debug"].cpus == 2 and parts["gpu"].gpus == 4
    S.check_fits(Target.of({"cpu": 2}), parts, "site")
    with pytest.raises(ResourceError, match="4 cores per node but its nodes have 2"):
        S.check_fits(Target.of({"cpu": 2, "mpi": 2}), parts, "site")
    S.check_fits(Target.of({"cpu": 2, "mpi": 2, "nodes": 2}), parts, "site")
    with pytest.raises(ResourceError, match="gpu=1"):
        S.check_fits(Target.of({"gpu": 1}), parts, "site")
    S.check_fits(Target.of({"gpu": 4, "partition": "gpu"}), parts, "site")
    with pytest.raises(ResourceError, match="no partition 'gpus'.*debug, gpu"):
        S.check_fits(Target.of({"partition": "gpus"}), parts, "site")


def test_target_to_submitit_parameters():
    t = Target.of({"cpu": 4, "mem": "8G", "gpu": 2, "time": "01:30:00", "mpi": 8, "nodes": 2,
                   "partition": "gpu", "account": "chem", "qos": "high", "constraint": "a100",
                   "directives": ["--exclusive", "#SBATCH --gres-flags=enforce-binding"]})
    p = S.submitit_parameters(t, directives=["--mail-type=END"])
    assert p["cpus_per_task"] == 4 and p["mem"] == "8192M" and p["gpus_per_node"] == 2
    assert p["time"] == 90 and p["nodes"] == 2 and p["ntasks_per_node"] == 4
    assert (p["partition"], p["account"], p["qos"], p["constraint"]) == ("gpu", "chem", "high", "a100")
    assert p["additional_parameters"] == {"exclusive": True, "gres-flags": "enforce-binding",
                                          "mail-type": "END"}
    assert p["use_srun"] is False
    with pytest.raises(ResourceError, match="must look like"):
        S.submitit_parameters(Target.of({"directives": ["exclusive"]}))


def test_transient_and_accounting_errors():
    assert S.is_transient("sbatch: error: Batch job submission failed: Unable to contact slurm controller")
    assert not S.is_transient("sbatch: error: invalid partition specified: x")
    assert S.accounting_missing("sacct: error: Problem talking to the database: Connection refused")
    assert S.accounting_missing("Slurm accounting storage is disabled")
