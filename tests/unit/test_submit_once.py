"""Submissions are idempotent: an sbatch/qsub that fails after the scheduler took the job
("Socket timed out", a lost reply) is followed by one lookup of the submission's token, and
the job found is taken instead of submitting again.

The scheduler here is a fake controller behind the mock transport (no Slurm or PBS server
can be made to time out on purpose); tests/cluster/test_submit_once.py does the same
against the real Slurm of the test cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("submitit")

from hpc_serverless.adapters.schedulers import pbs as P  # noqa: E402
from hpc_serverless.adapters.schedulers import slurm as S  # noqa: E402
from hpc_serverless.adapters.schedulers.pbs_runner import PBSScheduler  # noqa: E402
from hpc_serverless.adapters.schedulers.slurm_runner import SlurmScheduler  # noqa: E402
from hpc_serverless.adapters.transport import MockTransport  # noqa: E402
from hpc_serverless.config.site import site_from_mapping  # noqa: E402
from hpc_serverless.core.errors import SchedulerError, TransportError  # noqa: E402
from hpc_serverless.core.target import Target  # noqa: E402

TIMED_OUT = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"


class Controller:
    """A Slurm controller as sbatch and squeue see it: `sbatch` makes the job, then answers
    as `reply` says ("ok", "timeout" after making it, "lost" reply after making it,
    "down" without making it); `squeue --me --name N -o %F|%k` lists jobs by name."""

    def __init__(self, replies: list[str], squeue_ok: bool = True) -> None:
        self.replies = replies
        self.squeue_ok = squeue_ok
        self.jobs: dict[str, tuple[str, str]] = {}   # id -> (name, comment)
        self.squeues = 0

    def __call__(self, argv: tuple[str, ...], inp: str | None) -> tuple[int, str, str]:
        if argv[0] == "sbatch":
            reply = self.replies.pop(0) if self.replies else "ok"
            if reply == "down":
                return 1, "", "sbatch: error: Batch job submission failed: Unable to contact slurm controller"
            opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", Path(argv[-1]).read_text(), re.M))
            opts.update(a[2:].split("=", 1) for a in argv[1:-1] if "=" in a)  # the command line wins
            job_id = str(100 + len(self.jobs))
            self.jobs[job_id] = (shlex.split(opts.get("job-name", "x"))[0], shlex.split(opts.get("comment", "''"))[0])
            if reply == "timeout":
                return 1, "", TIMED_OUT
            if reply == "lost":
                raise TransportError("running `sbatch`: the connection dropped after it started")
            return 0, f"{job_id}\n", ""
        if argv[0] == "squeue" and "--name" in argv:
            self.squeues += 1
            if not self.squeue_ok:
                return 1, "", "squeue: error: Socket timed out on send/recv operation"
            name = argv[argv.index("--name") + 1]
            return 0, "".join(f"{j}|{c}\n" for j, (n, c) in self.jobs.items() if n == name), ""
        return 0, "", ""


def _tasks(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(name="f", ref=SimpleNamespace(task_id=f"t{i}")) for i in range(n)]


def _slurm(tmp_path: Path, controller: Controller, **site: object) -> SlurmScheduler:
    conf = {"scheduler": "slurm", "storage": str(tmp_path / "site"), "python": "/opt/py", **site}
    sched = SlurmScheduler(site_from_mapping(conf, name="s"), MockTransport(controller), str(tmp_path / "site" / "store"))
    sched.settle_s = 0
    return sched


@pytest.mark.parametrize("reply", ["timeout", "lost"])
def test_a_job_made_before_the_failure_is_taken_not_resubmitted(tmp_path, reply):
    c = Controller([reply])
    sched = _slurm(tmp_path, c)
    assert sched.submit(_tasks(1), Target(), []) == ["100"]
    assert list(c.jobs) == ["100"] and c.squeues == 1
    # submitit's files went where job 100 reads them
    assert (tmp_path / "site/jobs/100/100_submitted.pkl").is_file()


def test_an_array_found_by_its_token_gives_every_element_its_id(tmp_path):
    c = Controller(["timeout"])
    sched = _slurm(tmp_path, c)
    assert sched.submit(_tasks(3), Target(), []) == ["100_0", "100_1", "100_2"]
    assert len(c.jobs) == 1
    assert sorted(p.name for p in (tmp_path / "site/jobs").glob("100_*/*.pkl")) == [
        "100_0_submitted.pkl", "100_1_submitted.pkl", "100_2_submitted.pkl"]


def test_no_job_with_the_token_means_a_retry_is_safe(tmp_path):
    c = Controller(["down"])
    sched = _slurm(tmp_path, c)
    with pytest.raises(SchedulerError, match="no job carries its token: safe to retry") as info:
        sched.submit(_tasks(1), Target(), [])
    assert info.value.transient and c.squeues == 1 and not c.jobs


def test_when_the_lookup_fails_too_the_submission_is_not_retried(tmp_path):
    c = Controller(["timeout"], squeue_ok=False)
    sched = _slurm(tmp_path, c)
    with pytest.raises(SchedulerError, match="the job may exist.*not submitting it again") as info:
        sched.submit(_tasks(1), Target(), [])
    assert not info.value.transient
    assert len(c.jobs) == 1 and c.squeues == 1  # made once, asked about once, not submitted again


def test_a_refusal_asks_nothing(tmp_path):
    sched = _slurm(tmp_path, Controller([]))
    sched.transport = t = MockTransport(lambda argv, inp: (1, "", "sbatch: error: invalid partition"))
    with pytest.raises(SchedulerError, match="invalid partition"):
        sched.submit(_tasks(1), Target(), [])
    assert [a[0] for a in t.calls] == ["sbatch"]


def test_another_jobs_token_is_not_taken(tmp_path):
    c = Controller(["down"])
    c.jobs["7"] = ("hpcs-f", "hpcs:0123456789ab")   # an earlier submission of the same name
    with pytest.raises(SchedulerError, match="safe to retry"):
        _slurm(tmp_path, c).submit(_tasks(1), Target(), [])


def test_the_engine_leaves_one_job_after_a_timeout(tmp_path):
    """The batch engine retries transient failures: before this change a timed-out sbatch
    that had made its job was submitted again (2 jobs for 1 task)."""
    from hpc_serverless.providers.batch import BatchProvider

    tmp_path.chmod(0o700)
    c = Controller(["timeout", "down", "ok"])
    sched = _slurm(tmp_path, c, array_linger=0.01)
    provider = BatchProvider("s", sched.site, sched.transport, sched)
    try:
        from hpc_serverless import QuantumServerless, distribute_task

        @distribute_task
        def f():
            return 1

        with QuantumServerless().add_provider(provider).context("s"):
            ref = f()
            provider.backend.flush()
        assert list(c.jobs) == ["100"] and ref.job_id == "100"
    finally:
        provider.backend.close()


def test_a_program_found_by_its_token(tmp_path):
    c = Controller(["timeout"])
    sched = _slurm(tmp_path, c)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=hpcs-prog\n#SBATCH --comment=site-note\ntrue\n")
    target = Target(directives=("--comment=site-note",))
    assert sched.submit_script(str(script), target, "prog") == "100"
    assert c.jobs["100"][1].startswith("site-note,hpcs:") and len(c.jobs) == 1


def test_a_pilot_job_command_is_submitted_once(tmp_path):
    """dask-jobqueue's `sbatch SCRIPT` of a pilot job, through the adapter (dask_jobqueue.py)."""
    c = Controller(["timeout"])
    sched = _slurm(tmp_path, c)
    script = tmp_path / "pilot.sh"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=hpcs-pilot-s\ndask-worker\n")
    assert sched.submit_command(["sbatch", str(script)], "hpcs-pilot-s") == "100"
    assert len(c.jobs) == 1 and c.jobs["100"][1].startswith("hpcs:")


# -- PBS -------------------------------------------------------------------------------------------
TORQUE_QSTAT = """Job Id:\t{id}
\tJob_Name = {name}
\tJob_Owner = hpcs-dev@localhost
\tjob_state = Q
"""


@pytest.mark.parametrize("flavor", ["torque", "pbspro"])
def test_pbs_finds_a_timed_out_qsub_by_its_job_name(tmp_path, flavor):
    jobs: dict[str, str] = {}
    qsubs: list[list[str]] = []

    def server(argv, inp):
        if argv[0] == "qsub":
            qsubs.append(list(argv))
            jobs["55"] = argv[argv.index("-N") + 1]
            return 1, "", "qsub: Request timed out"
        if argv[:2] == ("qstat", "-f"):
            if flavor == "pbspro":
                import json
                return 0, json.dumps({"Jobs": {f"{j}[].srv": {"Job_Name": n} for j, n in jobs.items()}}), ""
            return 0, "".join(TORQUE_QSTAT.format(id=j, name=n) for j, n in jobs.items()), ""
        return 0, "", ""

    site = site_from_mapping({"scheduler": "pbs", "pbs_flavor": flavor, "storage": str(tmp_path),
                              "python": "/opt/py"}, name="p")
    sched = PBSScheduler(site, MockTransport(server), str(tmp_path / "store"))
    sched.settle_s = 0
    assert sched.submit(_tasks(2), Target(), []) == ["55_0", "55_1"]
    assert len(qsubs) == 1  # found by its name, not submitted again
    name = jobs["55"]
    assert len(name) <= 15 and re.fullmatch(r"hf-[0-9a-f]{8}", name)


def test_token_data():
    assert S.tagged_comment(None, "ab") == "hpcs:ab" and S.tagged_comment("x y", "ab") == "x y,hpcs:ab"
    out = "12|hpcs:aa\n13|note,hpcs:bb\n13|note,hpcs:bb\n14|hpcs:bbb\n"
    assert S.parse_token_lookup(out, "bb") == "13" and S.parse_token_lookup(out, "cc") is None
    assert P.token_job_name("a very long name!", "0123456789ab") == "ha_ver-01234567"
    assert P.parse_token_lookup(TORQUE_QSTAT.format(id="9.srv", name="hx-1"), "torque", "hx-1") == "9"


def test_the_agent_runs_a_resent_request_once(tmp_path):
    """Over SSH a submit request is sent again (same id) when its channel drops
    (agent_client.call); the agent answers it from the first run, which submitted."""
    from hpc_serverless.agent_daemon import Agent

    tmp_path.chmod(0o700)
    agent = Agent(site_from_mapping({"scheduler": "slurm", "storage": str(tmp_path / "site"),
                                     "python": "/opt/py"}, name="s"))
    runs: list[tuple[str, tuple]] = []

    def handle(op, args):
        runs.append((op, args))
        return f"job-{len(runs)}"

    agent.handle = handle  # type: ignore[method-assign]  # counts the runs of the real _submit
    try:
        first = agent._submit({"id": "client-1", "op": "submit", "args": ([],)})
        again = agent._submit({"id": "client-1", "op": "submit", "args": ([],)})
        other = agent._submit({"id": "client-2", "op": "submit", "args": ([],)})
        assert first.result(10) == again.result(10) == "job-1" and other.result(10) == "job-2"
        assert len(runs) == 2
    finally:
        agent.provider.backend.close()
