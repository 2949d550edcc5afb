"""QPUs (issue 16) without a cluster: the `qpu` target, a site's `qpus:` section and its
errors, how asks render for each way of counting (golden scripts for IBM's SPANK plugin
and PBS), how a job reads its grant, the QPU handle's errors, and the local provider's
own QPU slots. The cluster's counting is tests/cluster/test_qpus.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from hpc_serverless import Program, QuantumServerless, Target, distribute_task, get
from hpc_serverless.adapters.schedulers import pbs as P
from hpc_serverless.adapters.schedulers import slurm as S
from hpc_serverless.adapters.transport import MockTransport
from hpc_serverless.config.site import site_from_mapping
from hpc_serverless.core.errors import ConfigError, QPUError, ResourceError, TargetError
from hpc_serverless.core.qpus import GRANTED_ENV, PLAN_ENV, QpuAsk, QpuDevice, QpuSection, qpu_ask
from hpc_serverless.runtime import qpus as runtime_qpus
from hpc_serverless.runtime.qpu_grants import (
    granted_from_plugin_env,
    granted_from_qstat,
    granted_from_scontrol,
)

from .test_jobscripts import check_golden

ROOT = Path(__file__).resolve().parents[2]
TWO = QpuSection("gres", (QpuDevice("aer", "aer"), QpuDevice("fake", "fake", backend="FakeManilaV2")))


# -- the target ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, kept", [(1, 1), (2, 2), (0, 0), (None, 0), ("aer", ("aer",)),
                                         (["aer", "fake", "aer"], ("aer", "fake")), (True, 1)])
def test_target_qpu_is_a_count_or_names(value, kept):
    t = Target.of({"qpu": value})
    assert t.qpu == kept
    assert Target.of(t.as_dict()) == t


@pytest.mark.parametrize("value", [-1, 1.5, [], "ibm-fez", "", {"aer": 1}, ["aer", 3]])
def test_target_qpu_refuses_what_is_not_a_count_or_names(value):
    with pytest.raises(TargetError, match="target 'qpu'"):
        Target.of({"qpu": value})


def test_an_ask_names_the_qpus_there_are():
    with pytest.raises(TargetError, match=r"site 'x' has no QPU 'ibm_fez'; its QPUs are: aer, fake"):
        qpu_ask(("ibm_fez",), TWO, "site 'x'")
    with pytest.raises(TargetError, match=r"3 QPUs asked but site 'x' has 2: aer, fake"):
        qpu_ask(3, TWO, "site 'x'")
    with pytest.raises(TargetError, match=r"site 'x' has none \(its site file has no 'qpus:' section\)"):
        qpu_ask(1, None, "site 'x'")
    ask = qpu_ask(1, TWO, "site 'x'")
    assert ask is not None and (ask.count, ask.choices, ask.named) == (1, ("aer", "fake"), False)
    assert QpuAsk.from_plan(ask.plan()) == ask


# -- the site file ----------------------------------------------------------------------------------
def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("scheduler: slurm\nstorage: /tmp/x\n" + text)
    return path


@pytest.mark.parametrize("text, key, words", [
    ("qpus:\n  counted_by: resource\n  devices:\n    aer: {type: aer}\n", "qpus.counted_by",
     "a slurm site counts QPUs by one of gres, licenses, spank"),
    ("qpus:\n  devices:\n    aer: {type: aer}\n", "qpus.counted_by", "required key 'counted_by' is missing"),
    ("qpus:\n  counted_by: gres\n  devices:\n    aer: {type: simulator}\n", "qpus.devices.aer.type",
     "must be one of 'aer', 'fake', 'qiskit-ibm-runtime' or 'qrmi'"),
    ("qpus:\n  counted_by: gres\n  devices:\n    fake: {type: fake}\n", "qpus.devices.fake.backend",
     "names its fake backend class"),
    ("qpus:\n  counted_by: gres\n  devices:\n    aer: {type: aer, token_env: TOKEN}\n", "qpus.devices.aer.token_env",
     "only a 'qiskit-ibm-runtime' QPU takes a token"),
    ("qpus:\n  counted_by: gres\n  devices:\n    ibm_fez: {type: qrmi}\n", "qpus.devices.ibm_fez.type",
     "count it with counted_by: spank"),
    ("qpus:\n  counted_by: gres\n  devices:\n    aer: {type: aer, colour: red}\n", "qpus.devices.aer.colour",
     "unknown key 'colour'; valid keys are: type, resource, backend, options, token_env"),
    ("qpus:\n  counted_by: gres\n  devices:\n    ibm-fez: {type: aer}\n", "qpus.devices", "'ibm-fez' is not a QPU name"),
    ("qpus:\n  counted_by: gres\n  devices:\n    aer: {type: aer, resource: 'qpu:x'}\n", "qpus.devices.aer.resource",
     "is not a scheduler resource name"),
    ("qpus:\n  counted_by: gres\n  devices:\n    x: {type: qiskit-ibm-runtime, options: {token: abc}}\n",
     "qpus.devices.x.options.token", "a credential does not belong in a site file"),
    ("defaults:\n  qpu: 1\nqpus:\n  counted_by: gres\n  devices:\n    aer: {type: aer}\n", "defaults.qpu",
     "a site's defaults cannot ask for a QPU"),
])
def test_site_qpus_errors_name_file_key_and_line(tmp_path, text, key, words):
    from hpc_serverless.config.site import load_site

    with pytest.raises(ConfigError) as info:
        load_site(_site(tmp_path, text))
    message = str(info.value)
    assert words in message and f"key '{key}'" in message, message
    # the file and (but for a key that is missing) the line of the key
    assert re.search(r"site\.yaml:\d+, key" if "missing" not in words else r"site\.yaml, key", message), message


def test_pilot_workers_cannot_hold_a_qpu(tmp_path):
    with pytest.raises(ConfigError, match="pilot workers cannot hold a QPU"):
        site_from_mapping({"scheduler": "slurm", "storage": "/tmp/x", "mode": "pilot",
                           "pilot": {"target": {"qpu": 1}}}, name="p")


def test_pilot_mode_refuses_qpu_tasks(tmp_path, monkeypatch):
    from hpc_serverless.providers.pilot import PilotProvider

    monkeypatch.setenv("HPC_SERVERLESS_HOME", str(tmp_path))
    transport = MockTransport(lambda argv, input: (1, "", "not asked"))
    pilot = PilotProvider("p", site=str(ROOT / "site_configs/localhost-slurm-pilot.yaml"), transport=transport)

    @distribute_task(target={"qpu": 1})
    def f() -> int:
        return 1

    with QuantumServerless().add_provider(pilot).context("p"), pytest.raises(
            ResourceError, match=r"qpu=1: the scheduler counts QPUs per batch job"):
        f()
    assert transport.calls == []


# -- rendering ------------------------------------------------------------------------------------------
def _ask(value, counted_by: str, devices=TWO.devices) -> QpuAsk:
    ask = qpu_ask(value, QpuSection(counted_by, devices), "site 'x'")
    assert ask is not None
    return ask


def _opts(value, counted_by: str, directives=()) -> dict:
    return S.sbatch_options(Target.of({"qpu": value}), directives=directives,
                            qpus=QpuSection(counted_by, TWO.devices))


def test_slurm_gres_licenses_and_spank_requests():
    assert _opts("aer", "gres")["gres"] == "qpu:aer:1"
    assert _opts(1, "gres")["gres"] == "qpu:1"  # Slurm picks the type
    assert _opts(["aer", "fake"], "gres")["gres"] == "qpu:aer:1,qpu:fake:1"
    assert _opts("aer", "gres", ["--gres=gpu:1"])["gres"] == "gpu:1,qpu:aer:1"  # one option, both lists
    assert _opts("fake", "licenses")["licenses"] == "fake:1"
    spank = _opts(["aer", "fake"], "spank")
    assert (spank["qpu"], spank["gres"]) == ("aer,fake", "qpu:2")
    for how in ("licenses", "spank"):
        with pytest.raises(ResourceError, match="cannot leave the choice to the scheduler; name the QPU"):
            _opts(1, how)
    resource = QpuSection("licenses", (QpuDevice("fez", "aer", resource="qpu_fez"),))
    assert S.sbatch_options(Target.of({"qpu": "fez"}), qpus=resource)["licenses"] == "qpu_fez:1"


def test_pbs_resource_and_qrmi_requests():
    target = Target.of({"qpu": ["aer", "fake"]})
    opts = P.qsub_options(target, "pbspro", qpus=QpuSection("resource", TWO.devices))
    assert opts[-4:] == ["-l", "aer=1", "-l", "fake=1"]
    opts = P.qsub_options(target, "pbspro", qpus=QpuSection("qrmi", TWO.devices))
    assert opts[-2:] == ["-l", 'quantum_resources="aer,fake"']
    assert P.qsub_options(Target.of({"qpu": "aer"}), "pbspro",
                          qpus=QpuSection("qrmi", TWO.devices))[-1] == "quantum_resources=aer"
    with pytest.raises(ResourceError, match="pbs_flavor is 'torque'"):
        P.qsub_options(target, "torque", qpus=QpuSection("resource", TWO.devices))


def _program_script(site_text: dict, target: dict, tmp_path: Path) -> str:
    from hpc_serverless.providers.pbs import PBSProvider
    from hpc_serverless.providers.slurm import SlurmProvider

    site = site_from_mapping(site_text, name=f"golden-{site_text['qpus']['counted_by']}")
    cls = SlurmProvider if site.scheduler == "slurm" else PBSProvider
    provider = cls("golden", site=site, transport=MockTransport(lambda argv, inp: (0, "", "")))
    (tmp_path / "main.py").write_text("print('hi')\n")
    text = provider.render_program(Program("sweep", "main.py", working_dir=str(tmp_path), target=target))
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    return text


def test_spank_program_script_golden(tmp_path):
    """IBM's SPANK plugin: `--qpu=NAMES` with `--gres=qpu:N`, as its users write them."""
    text = _program_script({
        "scheduler": "slurm", "storage": "/shared/alice/hpcs", "python": "/opt/venv/bin/python",
        "defaults": {"partition": "quantum", "time": 30},
        "qpus": {"counted_by": "spank", "devices": {
            "ibm_fez": {"type": "qrmi"}, "ibm_marrakesh": {"type": "qrmi"}}},
    }, {"qpu": ["ibm_fez", "ibm_marrakesh"], "cpu": 4}, tmp_path)
    assert "#SBATCH --qpu=ibm_fez,ibm_marrakesh" in text and "#SBATCH --gres=qpu:2" in text
    check_golden("slurm_spank_qpu_program.sh", _stable(text, tmp_path))


@pytest.mark.parametrize("counted_by", ["resource", "qrmi"])
def test_pbs_qpu_program_script_golden(tmp_path, counted_by):
    text = _program_script({
        "scheduler": "pbs", "pbs_flavor": "pbspro", "storage": "/lus/eagle/projects/qc/hpcs",
        "python": "/opt/venv/bin/python", "defaults": {"queue": "debug", "time": 60},
        "qpus": {"counted_by": counted_by, "devices": {
            "ibm_kingston": {"type": "qrmi" if counted_by == "qrmi" else "aer"}}},
    }, {"qpu": "ibm_kingston"}, tmp_path)
    line = "#PBS -l ibm_kingston=1" if counted_by == "resource" else "#PBS -l quantum_resources=ibm_kingston"
    assert line in text
    check_golden(f"pbs_pbspro_qpu_{counted_by}_program.sh", _stable(text, tmp_path))


def _stable(text: str, tmp_path: Path) -> str:
    """The script with this run's job id and folders made constant."""
    text = text.replace(str(tmp_path), "/home/alice/sweep")
    return re.sub(r"\d{8}-\d{6}-[0-9a-f]+|DRY-RUN-JOB-ID", "JOBID", text)


# -- the grant, read inside the job ---------------------------------------------------------------------
SCONTROL_GRES = """JobId=77 JobName=x
   TRES=cpu=1,mem=100M,node=1,billing=1
   JOB_GRES=qpu:aer:1,qpu:fake:0
     Nodes=n1 CPU_IDs=0 Mem=100 GRES=qpu:aer(CNT:1)
   OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null)
"""
SCONTROL_LICENSES = "   OverSubscribe=OK Contiguous=0 Licenses=fake:1,aer@db:1 Network=(null)\n"


def test_grants_read_from_scheduler_words():
    assert granted_from_scontrol(SCONTROL_GRES, "gres") == ["aer"]
    assert granted_from_scontrol("     Nodes=n1 CPU_IDs=0 Mem=100 GRES=qpu:fake:1(IDX:0)\n", "gres") == ["fake"]
    assert granted_from_scontrol(SCONTROL_LICENSES, "licenses") == ["fake", "aer"]
    assert granted_from_scontrol(SCONTROL_GRES, "licenses") == []
    qstat = "Job Id: 5.pbs\n    Resource_List.aer = 1\n    Resource_List.fake = 0\n    Resource_List.ncpus = 1\n"
    assert granted_from_qstat(qstat, ["aer", "fake"], "resource") == ["aer"]
    assert granted_from_qstat("    Resource_List.quantum_resources = aer,fake\n", [], "qrmi") == ["aer", "fake"]
    assert granted_from_plugin_env({"QRMI_JOB_QPU_RESOURCES": "ibm_fez,ibm_torino"}) == ["ibm_fez", "ibm_torino"]
    assert granted_from_plugin_env({"QRMI_JOB_QPU_RESOURCES": "a:b", "QRMI_LIST_DELIMITER": ":"}) == ["a", "b"]
    assert granted_from_plugin_env({"SLURM_JOB_QPU_RESOURCES": "ibm_fez"}) == ["ibm_fez"]
    assert granted_from_plugin_env({}) is None


@pytest.fixture
def in_job(monkeypatch):
    """This process as a job holding what `set` says (the cache of grants emptied)."""
    runtime_qpus._cache.clear()

    def setup(ask: QpuAsk, **env: str) -> None:
        runtime_qpus._cache.clear()
        monkeypatch.setenv(PLAN_ENV, ask.plan())
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    yield setup
    runtime_qpus._cache.clear()


def test_qpu_outside_a_qpu_task_says_how_to_ask(monkeypatch):
    from hpc_serverless import qpu

    monkeypatch.delenv(PLAN_ENV, raising=False)
    with pytest.raises(QPUError, match=r"target=\{'qpu': 1\}"):
        qpu()


def test_qpu_and_qpus_from_the_grant(in_job):
    from hpc_serverless import qpu, qpus

    in_job(_ask(["aer", "fake"], "spank"), QRMI_JOB_QPU_RESOURCES="aer,fake")
    assert [q.name for q in qpus()] == ["aer", "fake"]
    with pytest.raises(QPUError, match=r"holds 2 QPUs \(aer, fake\); .* use qpus\(\)"):
        qpu()
    # the local pool's grant: the one it chose of the two
    in_job(QpuAsk(1, ("aer", "fake"), "slots", TWO.devices), **{GRANTED_ENV: "fake"})
    assert qpu().name == "fake"
    in_job(_ask(["aer"], "spank"), QRMI_JOB_QPU_RESOURCES="", QRMI_PLUGIN_ERROR="acquisition failed: busy")
    with pytest.raises(QPUError, match="it says: acquisition failed: busy"):
        qpus()


def test_a_grant_the_ask_does_not_cover_is_an_error(in_job):
    from hpc_serverless import qpus

    in_job(_ask(["aer"], "spank"), QRMI_JOB_QPU_RESOURCES="fake")
    with pytest.raises(QPUError, match="should hold 1 of the QPUs aer, but IBM's QPU plugin"):
        qpus()


def test_a_missing_credential_names_its_variable(in_job, monkeypatch):
    from hpc_serverless import qpu

    cloud = QpuSection("spank", (QpuDevice("ibm_fez", "qiskit-ibm-runtime", token_env="MY_IBM_KEY"),))
    in_job(qpu_ask("ibm_fez", cloud, "x"), QRMI_JOB_QPU_RESOURCES="ibm_fez")
    monkeypatch.delenv("MY_IBM_KEY", raising=False)
    with pytest.raises(QPUError, match=r"needs its API key in the environment variable \$MY_IBM_KEY"):
        qpu().backend()


def test_qrmi_qpus_go_through_qrmis_own_primitives(in_job, monkeypatch):
    """qrmi cannot run here (it needs IBM's service): a stand-in module with its names
    shows which of its calls a `qrmi` QPU makes."""
    calls: list[tuple] = []

    class Service:
        def resource(self, rid):
            calls.append(("resource", rid))
            return None if rid == "gone" else f"<resource {rid}>"

    primitives = types.ModuleType("qrmi.primitives")
    primitives.QRMIService = Service  # type: ignore[attr-defined]
    ibm = types.ModuleType("qrmi.primitives.ibm")
    ibm.get_backend = lambda res: ("backend", res)  # type: ignore[attr-defined]
    ibm.SamplerV2 = lambda res, options: ("sampler", res, options)  # type: ignore[attr-defined]
    ibm.EstimatorV2 = lambda res, options: ("estimator", res, options)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qrmi", types.ModuleType("qrmi"))
    monkeypatch.setitem(sys.modules, "qrmi.primitives", primitives)
    monkeypatch.setitem(sys.modules, "qrmi.primitives.ibm", ibm)
    from hpc_serverless import qpu

    section = QpuSection("spank", (QpuDevice("ibm_fez", "qrmi"), QpuDevice("gone", "qrmi")))
    in_job(qpu_ask("ibm_fez", section, "x"), QRMI_JOB_QPU_RESOURCES="ibm_fez")
    q = qpu()
    assert q.backend() == ("backend", "<resource ibm_fez>")
    assert q.sampler(default_shots=100) == ("sampler", "<resource ibm_fez>", {"default_shots": 100})
    assert q.estimator() == ("estimator", "<resource ibm_fez>", {})
    in_job(qpu_ask("gone", section, "x"), QRMI_JOB_QPU_RESOURCES="gone")
    with pytest.raises(QPUError, match="QRMI resource 'gone' is not accessible in this job"):
        qpu().sampler()


# -- the local provider counts QPUs itself ------------------------------------------------------------
@pytest.fixture
def local_qpus(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_SERVERLESS_HOME", str(tmp_path))
    s = QuantumServerless({"providers": [{"name": "lq", "store": str(tmp_path / "store"), "qpus": {
        "aer": {"type": "aer"}, "fake": {"type": "fake", "backend": "FakeManilaV2"}}}]})
    with s.context("lq"):
        yield


@distribute_task(target={"qpu": "aer"})
def _hold(seconds: float) -> tuple[str, float, float]:
    from hpc_serverless import qpu

    start = time.time()
    name = qpu().name
    time.sleep(seconds)
    return name, start, time.time()


@distribute_task(target={"qpu": 1})
def _any(seconds: float) -> tuple[str, float, float]:
    from hpc_serverless import qpu

    start = time.time()
    name = qpu().name
    time.sleep(seconds)
    return name, start, time.time()


def test_local_tasks_hold_each_qpu_one_at_a_time(local_qpus):
    held = get([_hold(0.5) for _ in range(3)])
    assert {h[0] for h in held} == {"aer"}
    ordered = sorted((a, b) for _, a, b in held)
    assert all(x[1] <= y[0] for x, y in zip(ordered, ordered[1:])), ordered
    # any one: both QPUs in use at once, never one twice
    two = get([_any(0.5) for _ in range(2)])
    assert sorted(h[0] for h in two) == ["aer", "fake"]
    (_, s0, e0), (_, s1, e1) = two
    assert s0 < e1 and s1 < e0, two  # at the same time


def test_local_qpu_errors(local_qpus, tmp_path):
    with pytest.raises(TargetError, match="provider 'lq' has no QPU 'ibm_fez'; its QPUs are: aer, fake"):
        distribute_task(target={"qpu": "ibm_fez"})(lambda: 1)()
    (tmp_path / "p.py").write_text("print(1)\n")
    from hpc_serverless.api import current_provider

    with pytest.raises(ResourceError, match="cannot hold a QPU"):
        current_provider().run_program(Program("p", "p.py", working_dir=str(tmp_path), target={"qpu": 1}))
    with pytest.raises(ConfigError, match="'qrmi' QPU is acquired by IBM's scheduler plugin"):
        QuantumServerless({"providers": [{"name": "bad", "qpus": {"x": {"type": "qrmi"}}}]})


def test_sites_check_finds_qpus_the_scheduler_does_not_know():
    from hpc_serverless.adapters.schedulers.qpu_requests import missing_on_slurm

    assert missing_on_slurm(TWO, "qpu:aer:1,qpu:fake:1\n(null)\n") == []
    assert missing_on_slurm(TWO, "gpu:a100:4,qpu:aer:1\n") == ["fake"]
    lic = QpuSection("licenses", TWO.devices)
    assert missing_on_slurm(lic, "LicenseName=aer Total=1 Used=0\n") == ["fake"]
    spank = QpuSection("spank", TWO.devices)
    assert missing_on_slurm(spank, "Usage: sbatch [OPTIONS...] executable\n") == ["aer", "fake"]
    assert missing_on_slurm(spank, "      --qpu=names   Comma separated list of QPU resources to use.\n") == []


def test_a_local_task_that_fails_or_times_out_gives_its_qpu_back(local_qpus):
    from hpc_serverless.core.errors import TaskTimeoutError

    @distribute_task(target={"qpu": "aer", "time": "00:00:01"})
    def too_long() -> None:
        time.sleep(30)

    @distribute_task(target={"qpu": "aer"})
    def fails() -> None:
        raise ValueError("on the QPU")

    with pytest.raises(TaskTimeoutError):
        get(too_long())
    with pytest.raises(ValueError, match="on the QPU"):
        get(fails())
    assert get(_hold(0.1))[0] == "aer"  # not waiting for a QPU that nobody holds
