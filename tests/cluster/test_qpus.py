"""QPUs counted by the real Slurm of the test cluster (issue 16), as the unprivileged client.

The test cluster has two stand-in QPUs, `aer` (an Aer simulator) and `fake` (qiskit-ibm-
runtime's 5-qubit FakeManilaV2), each one typed gres `qpu:<name>` on node n1 and one
cluster-wide license (tests/cluster/up.sh). Tasks that hold a QPU return when they held
it; the scheduler must keep those intervals apart whoever submits: this process, a second
client process, or a plain `sbatch` outside hpc_serverless, while tasks without a QPU run
beside them. About fifteen jobs in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpc_serverless import Program, QuantumServerless, distribute_task, get
from hpc_serverless.core.errors import QPUError, ResourceError, TargetError

from .conftest import ROOT

pytestmark = pytest.mark.cluster

HOLD_S = 2.0


@distribute_task(target={"qpu": "aer", "mem": "300M"})
def hold_aer(seconds: float) -> tuple[str, float, float]:
    """Hold the `aer` QPU for `seconds`; (the QPU the scheduler says we hold, start, end)."""
    from hpc_serverless import qpu

    start = time.time()
    name = qpu().name
    time.sleep(seconds)
    return name, start, time.time()


@distribute_task(target={"mem": "300M"})
def classical(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def _plain_sbatch(tmp_path: Path, request: list[str], seconds: float, name: str) -> tuple[str, Path]:
    """A job outside hpc_serverless holding a QPU; it writes its start and end times."""
    out = tmp_path / f"{name}.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "-p", "debug", "--mem=100M", "-J", name, *request, "-o", str(out),
         "--wrap", f"date +%s.%N; sleep {seconds}; date +%s.%N"],
        capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    return job, out


def _wait_for_job(job: str, state: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if now == state or (state == "GONE" and now in ("", "COMPLETED")):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not reach {state} in {timeout} s")


def _times(out: Path) -> tuple[float, float]:
    lines = out.read_text().split()
    return float(lines[0]), float(lines[1])


def _apart(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The pairs of intervals that overlap (none, if the QPU was held by one at a time)."""
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if a[1] > b[0]]


SECOND_CLIENT = """
import json, sys, time
from hpc_serverless import QuantumServerless, distribute_task, get, qpu

@distribute_task(target={"qpu": "aer", "mem": "300M"})
def hold(seconds):
    start = time.time(); name = qpu().name; time.sleep(seconds); return name, start, time.time()

s = QuantumServerless({"providers": [{"name": "other", "site": sys.argv[1]}]})
with s.context("other"):
    print(json.dumps(get([hold(float(sys.argv[2])) for _ in range(2)])))
"""


def test_tasks_holding_the_one_qpu_never_overlap_whoever_submits_them(on_slurm, site_path, tmp_path):
    plain, plain_out = _plain_sbatch(tmp_path, ["--gres=qpu:aer:1"], HOLD_S, "plain-qpu")
    other = subprocess.Popen([sys.executable, "-c", SECOND_CLIENT, site_path, str(HOLD_S)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    mine = [hold_aer(HOLD_S) for _ in range(2)]
    beside = [classical(HOLD_S + 1) for _ in range(3)]
    held = get(mine)
    free = get(beside)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-2000:]
    theirs = [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]
    _wait_for_job(plain, "GONE")
    assert {name for name, _, _ in held + theirs} == {"aer"}  # (what the scheduler says they hold)
    intervals = [(a, b) for _, a, b in held + theirs] + [_times(plain_out)]
    assert len(intervals) == 5
    assert _apart(intervals) == [], f"QPU holders overlapped: {sorted(intervals)}"
    # tasks without a QPU did not queue behind it: each overlaps some QPU holder
    for start, end in free:
        assert any(start < b and a < end for a, b in intervals), (start, end, sorted(intervals))


@distribute_task(target={"qpu": 1, "mem": "300M"})
def which_qpu() -> str:
    from hpc_serverless import qpu

    return qpu().name


def test_the_scheduler_picks_the_qpu_and_the_task_learns_it_from_the_scheduler(on_slurm, tmp_path):
    """{"qpu": 1} on a site with two: while a plain job holds `aer`, Slurm gives `fake`."""
    plain, _ = _plain_sbatch(tmp_path, ["--gres=qpu:aer:1"], 12, "plain-aer")
    try:
        _wait_for_job(plain, "RUNNING")
        assert get(which_qpu()) == "fake"
    finally:
        subprocess.run(["scancel", plain], check=False)


@distribute_task(target={"qpu": "fake", "mem": "600M"})
def bell_expectations() -> dict[str, float]:
    """<ZZ>, <XX> and <ZI> of a Bell state on the `fake` QPU (its device's noise)."""
    from qiskit import QuantumCircuit
    from qiskit.quantum_info import SparsePauliOp
    from qiskit.transpiler.preset_passmanagers import generate_preset_pass_manager

    from hpc_serverless import qpu

    q = qpu()
    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.cx(0, 1)
    isa = generate_preset_pass_manager(backend=q.backend(), optimization_level=1, seed_transpiler=7).run(circuit)
    labels = ["ZZ", "XX", "ZI"]
    pubs = [(isa, SparsePauliOp(label).apply_layout(isa.layout)) for label in labels]
    result = q.estimator().run(pubs).result()
    return {label: float(r.data.evs) for label, r in zip(labels, result)}


def test_the_fake_qpus_estimator_is_within_its_noise_of_an_ideal_run(on_slurm):
    from qiskit import QuantumCircuit
    from qiskit.quantum_info import SparsePauliOp, Statevector

    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.cx(0, 1)
    ideal = {label: float(Statevector(circuit).expectation_value(SparsePauliOp(label)).real)
             for label in ("ZZ", "XX", "ZI")}
    noisy = get(bell_expectations())
    # FakeManilaV2's noise (1-3 % per CX and readout) moves a 2-qubit value by a few percent:
    # the device is noisy (not equal) and close (within 0.1)
    for label, value in ideal.items():
        assert abs(noisy[label] - value) < 0.1, (label, noisy, ideal)
    assert noisy["ZZ"] < 0.999 and noisy["XX"] < 0.999, noisy


def test_a_program_holding_a_qpu_shows_the_request_and_gets_it(slurm, tmp_path):
    entry = tmp_path / "use_qpu.py"
    entry.write_text(textwrap.dedent("""
        from hpc_serverless import qpu, save_result
        q = qpu()
        print("holding", q.name)
        save_result({"qpu": q.name, "qubits": q.backend().num_qubits})
    """))
    program = Program("qpu-program", entry.name, working_dir=str(tmp_path), target={"qpu": "fake", "mem": "600M"})
    script = slurm.render_program(program)
    assert "#SBATCH --gres=qpu:fake:1" in script
    job = slurm.run_program(program)
    assert job.result(timeout=240) == {"qpu": "fake", "qubits": 5}, job.logs()
    assert "holding fake" in job.logs()


def test_unknown_qpu_names_and_missing_credentials_are_clear_errors(site_path, tmp_path):
    s = QuantumServerless({"providers": [{
        "name": "creds", "site": site_path,
        # a cloud QPU whose key the job lacks; counted by the `aer` gres
        "qpus": {"counted_by": "gres", "devices": {
            "aer": {"type": "aer"},
            "cloud": {"type": "qiskit-ibm-runtime", "resource": "aer", "backend": "ibm_fez",
                      "token_env": "HPCS_TEST_NO_SUCH_TOKEN"}}}}]})

    @distribute_task(target={"qpu": "cloud", "mem": "300M"})
    def cloud_backend() -> str:
        from hpc_serverless import qpu

        return str(qpu().backend())

    with s.context("creds"):
        with pytest.raises(TargetError, match=r"no QPU 'ibm_kyiv'; its QPUs are: aer, cloud"):
            distribute_task(target={"qpu": "ibm_kyiv"})(lambda: 1)()
        with pytest.raises(QPUError, match=r"\$HPCS_TEST_NO_SUCH_TOKEN, which is not set in this job"):
            get(cloud_backend())


def test_licenses_count_named_qpus_against_plain_jobs_too(site_path, tmp_path):
    s = QuantumServerless({"providers": [{
        "name": "lic", "site": site_path,
        "qpus": {"counted_by": "licenses", "devices": {
            "aer": {"type": "aer"}, "fake": {"type": "fake", "backend": "FakeManilaV2"}}}}]})

    @distribute_task(target={"qpu": "fake", "mem": "300M"})
    def hold_fake(seconds: float) -> tuple[str, float, float]:
        from hpc_serverless import qpu

        start = time.time()
        name = qpu().name
        time.sleep(seconds)
        return name, start, time.time()

    with s.context("lic") as provider:
        script = provider.render_program(Program("lic", "quickstart.py", working_dir=str(ROOT / "examples"),
                                                 target={"qpu": "fake"}))
        assert "#SBATCH --licenses=fake:1" in script
        # licenses name what they count: Slurm 22.05 cannot choose among several
        with pytest.raises(ResourceError, match="name the QPU"):
            distribute_task(target={"qpu": 1})(lambda: 1)()
        plain, plain_out = _plain_sbatch(tmp_path, ["-L", "fake:1"], HOLD_S, "plain-lic")
        held = get([hold_fake(HOLD_S) for _ in range(2)])
    _wait_for_job(plain, "GONE")
    assert [h[0] for h in held] == ["fake", "fake"]
    intervals = [(a, b) for _, a, b in held] + [_times(plain_out)]
    assert _apart(intervals) == [], f"QPU holders overlapped: {sorted(intervals)}"


# -- PBS Pro (the fake PBS Pro over this Slurm: tests/cluster/pbspro; its server resources
# `aer` and `fake` and its emulation of IBM's QRMI hook are counted by Slurm licenses) --------
PBSPRO_SITE = str(ROOT / os.environ.get("HPC_SERVERLESS_TEST_PBSPRO_SITE", "site_configs/localhost-pbspro.yaml"))


def test_pbs_pro_custom_resources_count_the_qpu(tmp_path):
    s = QuantumServerless({"providers": [{"name": "pbsq", "site": PBSPRO_SITE}]})
    with s.context("pbsq") as provider:
        script = provider.render_program(Program("p", "quickstart.py", working_dir=str(ROOT / "examples"),
                                                 target={"qpu": "aer"}))
        assert "#PBS -l aer=1" in script
        with pytest.raises(ResourceError, match="name the QPU"):
            distribute_task(target={"qpu": 1})(lambda: 1)()
        held = get([hold_aer(HOLD_S) for _ in range(2)])
    assert [h[0] for h in held] == ["aer", "aer"]  # (from `qstat -f`: Resource_List.aer = 1)
    assert _apart([(a, b) for _, a, b in held]) == []


def test_pbs_qrmi_hook_resources_reach_the_task(tmp_path):
    qrmi = {"counted_by": "qrmi", "devices": {"aer": {"type": "aer"},
                                              "fake": {"type": "fake", "backend": "FakeManilaV2"}}}
    s = QuantumServerless({"providers": [{"name": "qrmi", "site": PBSPRO_SITE, "qpus": qrmi}]})

    @distribute_task(target={"qpu": ["aer", "fake"], "mem": "300M"})
    def held_qpus() -> list[str]:
        from hpc_serverless import qpus

        return [q.name for q in qpus()]

    with s.context("qrmi") as provider:
        script = provider.render_program(Program("p", "quickstart.py", working_dir=str(ROOT / "examples"),
                                                 target={"qpu": ["aer", "fake"]}))
        assert "#PBS -l 'quantum_resources=\"aer,fake\"'" in script
        # (the hook's QRMI_JOB_QPU_RESOURCES=aer:fake, QRMI_LIST_DELIMITER=:)
        assert get(held_qpus()) == ["aer", "fake"]
