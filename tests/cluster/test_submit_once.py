"""A submission that times out after the scheduler took the job leaves exactly one job.

Fake here: the timeout. `sbatch` (and `qsub`) first in PATH is a wrapper that runs the real
command, which makes the job, and then reports the error a busy controller gives, exit 1;
no real controller can be made to time out on cue. Everything else is the real Slurm of
the test cluster (and its PBS wrappers), driven as the unprivileged client.
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from hpc_serverless import Program, QuantumServerless, SlurmProvider, distribute_task, get

from .conftest import ROOT

pytestmark = pytest.mark.cluster

MESSAGES = {"sbatch": "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
            "qsub": "qsub: Request timed out"}


@distribute_task(target={"cpu": 1})
def cube(x):
    return x ** 3


def _fake(command: str, tmp_path: Path, monkeypatch) -> Path:
    """Put a timing-out `command` first in PATH; the file where it logs what the real one said."""
    real = shutil.which(command)
    if real is None:
        pytest.skip(f"no {command} here (tests/cluster/up.sh installs it)")
    bin_dir, log = tmp_path / "bin", tmp_path / f"{command}.log"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / command
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        # the real {command}, which makes the job; then a timeout, as if its reply were lost
        out=$({real} "$@") || {{ echo "$out"; exit 1; }}
        echo "$out" >> {log}
        echo "{MESSAGES[command]}" >&2
        exit 1
    """))
    fake.chmod(0o700)
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def _made(log: Path) -> list[str]:
    """Job ids the real command printed (one line per job made)."""
    # ('123', '123;cluster' from --parsable, 'Submitted batch job 123', '123.server' from qsub)
    return [re.search(r"\d+", line).group(0) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def slurm_site(site_path, tmp_path, monkeypatch):
    log = _fake("sbatch", tmp_path, monkeypatch)
    provider = SlurmProvider("cluster", site=site_path)
    yield provider, log
    provider.backend.close()


def test_a_timed_out_task_and_array_leave_one_job_each(slurm_site):
    provider, log = slurm_site
    with QuantumServerless().add_provider(provider).context("cluster"):
        one = cube(2)
        assert get(one, timeout=180) == 8
        assert _made(log) == [one.job_id]
        many = [cube(i) for i in range(3)]
        assert get(many, timeout=180) == [0, 1, 8]
    made = _made(log)
    assert len(made) == 2, made  # one job, one array
    assert [r.job_id for r in many] == [f"{made[1]}_{i}" for i in range(3)]
    assert provider.transport.counts["sbatch"] == 2


def _program(tmp_path: Path) -> Program:
    wd = tmp_path / "src"
    wd.mkdir()
    (wd / "main.py").write_text("from hpc_serverless import save_result\nsave_result(6 * 7)\n")
    return Program(title="once", entrypoint="main.py", working_dir=str(wd))


def test_a_timed_out_program_leaves_one_job(site_path, tmp_path, monkeypatch):
    log = _fake("sbatch", tmp_path, monkeypatch)
    s = QuantumServerless({"providers": [{"name": "local"}, {"name": "cluster", "site": site_path}]})
    job = s.set_provider("cluster").run_program(_program(tmp_path))
    assert job.result(timeout=180) == 42
    assert _made(log) == [job.info()["scheduler_job_id"]]


@pytest.mark.parametrize("what", ["task", "program"])
def test_pbs_a_timed_out_qsub_leaves_one_job(tmp_path, monkeypatch, what):
    log = _fake("qsub", tmp_path, monkeypatch)
    s = QuantumServerless({"providers": [{"name": "local"},
                                         {"name": "pbs", "site": str(ROOT / "site_configs/localhost-pbs.yaml")}]})
    if what == "task":
        with s.context("pbs"):
            ref = cube(3)
            assert get(ref, timeout=180) == 27
            assert _made(log) == [ref.job_id]
    else:
        job = s.set_provider("pbs").run_program(_program(tmp_path))
        assert job.result(timeout=180) == 42
        assert _made(log) == [job.info()["scheduler_job_id"]]


@pytest.mark.ssh
def test_ssh_never_runs_a_started_command_again(tmp_path):
    """The SSH transport's claim (ssh.py, ssh_channels.py): a command whose connection drops
    after it started is reported (TransportError, transient), not run again after the
    reconnect. Real sshd on loopback; only this test's own connection is dropped."""
    import threading
    import time

    from hpc_serverless.adapters.transport.ssh import SSHTransport
    from hpc_serverless.core.errors import TransportError

    from ..testcluster import KEY, KNOWN_HOSTS, drop_ssh, need_sshd

    need_sshd()
    marker = f"hpcs-once-{os.getpid()}-{tmp_path.name}"
    with SSHTransport("127.0.0.1", port=2222, username="hpcsl", key_filename=KEY,
                      known_hosts=KNOWN_HOSTS) as t:
        t.open()
        port = t.client_port()
        assert port is not None
        dropper = threading.Timer(1.5, lambda: drop_ssh(2222, client_port=port))
        dropper.start()
        start = time.monotonic()
        try:
            with pytest.raises(TransportError) as info:
                t.run(["sh", "-c", f'echo ran >> "$HOME/{marker}"; sleep 20'], timeout=60)
        finally:
            dropper.join()
        assert info.value.transient and time.monotonic() - start < 20
        out = t.run(["sh", "-c", f'cat "$HOME/{marker}"; rm -f "$HOME/{marker}"'])
        assert out.stdout.splitlines() == ["ran"], out


def test_pilot_jobs_that_time_out_are_not_submitted_again(tmp_path, monkeypatch):
    """Pilot jobs go through dask-jobqueue, whose sbatch runs through the scheduler adapter:
    one pilot job made per worker asked for, though every sbatch "timed out"."""
    from hpc_serverless.config.site import load_site
    from hpc_serverless.providers.factory import provider_for_site

    log = _fake("sbatch", tmp_path, monkeypatch)
    site = load_site(ROOT / "site_configs/localhost-slurm-pilot.yaml")
    site = site.model_copy(update={"pilot": site.pilot.model_copy(update={"workers": 1})})
    provider = provider_for_site(site, "pilot-once")
    try:
        with QuantumServerless().add_provider(provider).context("pilot-once"):
            assert get(cube(4), timeout=180) == 64
        assert _made(log) == provider.pilot_jobs() and len(_made(log)) == 1
    finally:
        provider.close()


def test_pbspro_a_timed_out_array_is_one_array(tmp_path):
    """The fake PBS Pro server of the test cluster (tests/cluster/pbspro, arrays with -J):
    its commands from a copy of the site's `commands_dir` whose qsub times out after
    submitting; the array is found by its job name and keeps its element ids."""
    import yaml

    fake_pbs = ROOT / "tests/cluster/pbspro"
    bin_dir, log = tmp_path / "pbsbin", tmp_path / "qsub.log"
    bin_dir.mkdir()
    for name in ("qstat", "qdel", "qrerun"):
        (bin_dir / name).symlink_to(fake_pbs / name)
    (bin_dir / "qsub").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        out=$({fake_pbs}/qsub "$@") || {{ echo "$out"; exit 1; }}
        echo "$out" >> {log}
        echo "{MESSAGES['qsub']}" >&2
        exit 1
    """))
    (bin_dir / "qsub").chmod(0o700)
    log.touch()
    site = yaml.safe_load((ROOT / "site_configs/localhost-pbspro.yaml").read_text())
    site["commands_dir"] = str(bin_dir)
    site_file = tmp_path / "pbspro.yaml"
    site_file.write_text(yaml.safe_dump(site))
    s = QuantumServerless({"providers": [{"name": "local"}, {"name": "pbspro", "site": str(site_file)}]})
    with s.context("pbspro"):
        refs = [cube(i) for i in range(3)]
        assert get(refs, timeout=180) == [0, 1, 8]
    made = _made(log)
    assert len(made) == 1 and [r.job_id for r in refs] == [f"{made[0]}_{i}" for i in range(3)]
