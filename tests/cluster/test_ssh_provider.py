"""The Slurm test cluster reached over SSH (real sshd on loopback): tasks, objects and
programs from "outside", host keys, a ProxyJump hop, a dropped connection."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpc_serverless import Program, QuantumServerless, distribute_task, get, put
from hpc_serverless.core.errors import HostKeyError

from ..conftest import HOSTILE_NAMES
from ..testcluster import KEY, KNOWN_HOSTS, SSH_CONFIG, cluster_python, drop_ssh, need_sshd
from ..traceback_checks import assert_user_frame
from .conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.ssh]



@pytest.fixture(autouse=True)
def _need_sshd():
    need_sshd()


def _config(tmp_path, site_path, **entry) -> Path:
    """A provider entry over the test site that logs in as the cluster account hpcsl (not
    the client's): storage in its home, its python linked to this run's interpreter."""
    import yaml

    provider = {"name": "remote", "site": site_path, "username": "hpcsl",
                "storage": "${SCRATCH:-$HOME}/hpcs-remote-" + secrets.token_hex(4),
                **cluster_python(),
                "agent_grace": 30, **entry}
    cfg = tmp_path / "serverless.yaml"
    cfg.write_text(yaml.safe_dump({"providers": [{"name": "local"}, provider], "default": "remote"}))
    return cfg


@pytest.fixture
def remote_config(tmp_path, site_path):
    return _config(tmp_path, site_path, host="127.0.0.1", port=2222,
                   key_filename=KEY, known_hosts=KNOWN_HOSTS)


@distribute_task
def energy(scale, table, divide=False):
    if divide:
        return scale / sum(table["h"])
    return scale * sum(table["h"])


def test_du_and_gc_through_the_agent(remote_config):
    """A laptop's session lives on the site, beaten by the agent while the client beats;
    du and gc run there, and gc removes the session once the client closed it."""
    s = QuantumServerless.load_configuration(remote_config)
    provider = s.provider("remote")
    with s.context("remote"):
        assert get([energy(i, {"h": [1.0]}) for i in range(3)], timeout=180) == [0.0, 1.0, 2.0]
    sid = provider.session_id
    usage = s.du("remote")
    mine = [x for x in usage["sessions"] if x["id"] == sid]
    assert mine and mine[0]["live"] and mine[0]["files_by_kind"]["results"] == 3
    report = s.gc(0, provider="remote")
    assert sid in {k["id"] for k in report["kept"]}  # live: the client still beats it
    provider.close()
    provider = QuantumServerless.load_configuration(remote_config).provider("remote")
    report = provider.gc(0, dry_run=False)
    assert sid in {r["id"] for r in report["removed"]}
    assert not provider.transport.run(["test", "-e", f"{provider.store.root}/sessions/{sid}"]).ok
    provider.close()


def test_tasks_and_objects_over_ssh(remote_config):
    s = QuantumServerless.load_configuration(remote_config)
    provider = s.provider("remote")
    assert type(provider.transport).__name__ == "SSHTransport"
    with s.context("remote"):
        table = put({"h": [1.0, 2.0, 3.0]})
        refs = [energy(i, table) for i in range(5)]
        assert get(refs, timeout=180) == [6.0 * i for i in range(5)]
    # one connection, one agent channel, carried every call and byte
    assert provider.transport.connections == 1 and provider.agent.channels == 1
    assert provider.stats()["sbatch"] == 1
    # the objects live on the remote storage, owned by the cluster account (the client,
    # another account, cannot even look: it asks over the connection)
    assert str(provider.store.root).startswith("/home/hpcsl/hpcs-remote-")
    assert not os.access(str(provider.store.root), os.F_OK)
    assert provider.transport.run(["test", "-f", f"{provider.store.root}/{table.key}"]).ok
    # a failing task's traceback names this file and line, read here, not on the cluster
    with s.context("remote"), pytest.raises(ZeroDivisionError) as e:
        get(energy(1, {"h": []}, divide=True), timeout=180)
    assert_user_frame(str(e.value.__cause__), energy, "return scale / sum(table")


def test_seed_tutorial_from_outside(remote_config):
    pytest.importorskip("qiskit")
    out = subprocess.run([sys.executable, str(ROOT / "examples/quickstart.py"), "--config",
                          str(remote_config), "--provider", "remote"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("serverless") == 3


def test_password_auth_provider(tmp_path, site_path):
    cfg = _config(tmp_path, site_path, host="127.0.0.1", port=2222,
                  password="hpcsl-test-pw", key_filename=None, known_hosts=KNOWN_HOSTS)
    cfg_text = cfg.read_text()
    s = QuantumServerless.load_configuration(cfg)
    provider = s.provider("remote")
    provider.transport.look_for_keys = False  # noqa: B010 - make the password do the work
    result = provider.transport.run(["squeue", "-h"])
    assert result.ok, result.describe()
    assert provider.transport.run(["id", "-un"]).stdout.strip() == "hpcsl"
    with s.context("remote"):
        ref = put([1, 2, 3])
        assert get(ref) == [1, 2, 3]
    assert "hpcsl-test-pw" not in repr(provider) + provider.describe()
    assert "hpcsl-test-pw" in cfg_text  # (only in the user's own file)


def test_unknown_host_key_is_refused(tmp_path, site_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg = _config(tmp_path, site_path, host="127.0.0.1", port=2222,
                  key_filename=KEY, known_hosts=str(empty))
    s = QuantumServerless.load_configuration(cfg)
    with s.context("remote"), pytest.raises(HostKeyError, match=r"(?s)127\.0\.0\.1 port 2222 is not known.*SHA256:"):
        energy(1, {"h": [1]})


def test_proxyjump_hop(tmp_path, site_path):
    cfg = _config(tmp_path, site_path, host="hpcsl-via-jump", ssh_config=SSH_CONFIG,
                  key_filename=KEY, known_hosts=KNOWN_HOSTS)
    s = QuantumServerless.load_configuration(cfg)
    provider = s.provider("remote")
    with s.context("remote"):
        assert get([energy(2, {"h": [1, 1]}) for _ in range(3)], timeout=180) == [4, 4, 4]
    assert len(provider.transport.jump_connections) == 1


def test_program_over_ssh_follow_survives_dropped_connection(remote_config, tmp_path):
    wd = tmp_path / "src"
    (wd / "sub dir; 'x'").mkdir(parents=True)
    for i, n in enumerate(HOSTILE_NAMES):  # the working dir travels to the agent as one tar
        (wd / n).write_text(f"file {i}\n")
    (wd / "sub dir; 'x'" / "inner $(touch pwned)").write_bytes(b"\0" * 300_000)
    (wd / "slow.py").write_text(textwrap.dedent("""
        import os, time
        from hpc_serverless import get_arguments, save_result
        for i in range(8):
            print("line", i, flush=True)
            time.sleep(0.7)
        files = {n: open(n).read() for n in os.listdir(".") if os.path.isfile(n)}
        save_result({"n": get_arguments()["n"], "files": files,
                     "inner": os.path.getsize("sub dir; 'x'/inner $(touch pwned)")})
    """))
    s = QuantumServerless.load_configuration(remote_config)
    job = s.run_program(Program("slow printer", "slow.py", working_dir=str(wd)), arguments={"n": 8})
    assert job.job_id.startswith("remote-")  # the client's provider name: found by it later
    follow = subprocess.Popen([sys.executable, "-m", "hpc_serverless.cli", "--config", str(remote_config),
                               "logs", "--follow", "--interval", "0.3", job.job_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "line 1" not in job.logs() and time.time() < deadline:
        time.sleep(0.3)
    assert drop_ssh(2222) >= 1  # the follower's (and our own) connections drop
    out, err = follow.communicate(timeout=180)
    assert follow.returncode == 0, err
    assert all(f"line {i}" in out for i in range(8)), out
    # collected from yet another process
    expected = sorted([*((n, f"file {i}\n") for i, n in enumerate(HOSTILE_NAMES)),
                       ("slow.py", (wd / "slow.py").read_text())])
    code = (f"from hpc_serverless import QuantumServerless; s = QuantumServerless.load_configuration("
            f"{str(remote_config)!r}); j = s.get_job_by_id({job.job_id!r}); r = j.result(); "
            f"print(j.status(), r['n'], r['inner'], sorted(r['files'].items()) == {expected!r})")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == "SUCCEEDED 8 300000 True", other.stderr


def test_job_search_does_not_prompt_for_a_provider_that_is_not_connected(tmp_path, site_path):
    """Issue 17 item 2: get_job_by_id looks on every configured provider, but logs in to one
    that is not connected only if no one has to type anything; otherwise it says it did not
    search there. With a password in the configuration, the same provider is searched."""
    from hpc_serverless.core.errors import JobNotFoundError

    prompts = []

    def recorder(title, instructions, asked):
        prompts.append(asked)
        raise AssertionError("prompted")

    for password in (None, "hpcsl-test-pw"):
        entry = {"host": "127.0.0.1", "port": 2222, "username": "hpcsl", "key_filename": None,
                 "known_hosts": KNOWN_HOSTS, **({"password": password} if password else {})}
        s = QuantumServerless.load_configuration(_config(tmp_path, site_path, **entry)).set_provider("local")
        transport = s.provider("remote").transport
        transport.look_for_keys = transport.allow_agent = False  # noqa: B010 - only the password may let us in
        transport.interactive_handler = recorder
        with pytest.raises(JobNotFoundError) as e:
            s.get_job_by_id("20000101-000000-abcdef")
        msg = str(e.value)
        if password is None:
            assert "not searched: remote (not connected, and logging in to hpcsl@127.0.0.1:2222 asks for" in msg
            assert transport.connection is None
        else:
            assert "not searched" not in msg and "remote (127.0.0.1:/home/hpcsl/" in msg, msg
        transport.close()
    assert prompts == []


@distribute_task(target={"qpu": 1, "mem": "300M"})
def qpu_name_and_qubits():
    from hpc_serverless import qpu

    q = qpu()
    return q.name, q.backend().num_qubits


def test_qpu_tasks_from_outside(remote_config):
    """A laptop's QPU ask is checked and rendered on the login node by the agent, from the
    same site file (its `qpus:`): an unknown name lists the site's QPUs; a task gets the QPU
    Slurm granted, told by the scheduler inside the job."""
    from hpc_serverless.core.errors import TargetError

    s = QuantumServerless.load_configuration(remote_config)
    with s.context("remote"):
        with pytest.raises(TargetError, match="has no QPU 'ibm_fez'; its QPUs are: aer, fake"):
            distribute_task(target={"qpu": "ibm_fez"})(lambda: 1)()
        name, qubits = get(qpu_name_and_qubits(), timeout=180)
    # the simulator has many qubits, the fake device five
    assert (name == "aer" and qubits > 5) or (name, qubits) == ("fake", 5), (name, qubits)
    s.provider("remote").close()
