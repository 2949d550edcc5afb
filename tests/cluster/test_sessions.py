"""Sessions, gc and du on the real Slurm test cluster: a loop of 200 tasks leaves its
results and logs only, `du` shows its session, and `gc --older-than 0` removes every file
of it while keeping a session whose job still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.cluster

N = 200


def _files(path: str) -> int:
    return sum(len(names) for _root, _dirs, names in os.walk(path))


def _client(site_path: str, body: str, provider_class: str = "SlurmProvider") -> dict:
    """Run a client process on the login node; it prints one JSON line last."""
    code = textwrap.dedent(f"""
        import json, os, time
        from hpc_serverless import QuantumServerless, {provider_class} as Provider, distribute_task, get

        @distribute_task(target={{"cpu": 1, "time": 5}})
        def square(x):
            return x * x

        @distribute_task(target={{"cpu": 1, "time": 5}})
        def nap(seconds):
            time.sleep(seconds)
            return seconds

        provider = Provider("cluster", site={site_path!r})
        s = QuantumServerless().add_provider(provider)
        def count(path):
            return sum(len(n) for _r, _d, n in os.walk(path))
        with s.context("cluster"):
    """) + textwrap.indent(textwrap.dedent(body), "    ")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_serverless.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_loop_of_tasks_then_du_and_gc_leave_nothing_but_running_jobs(site_path, tmp_path):
    loop = _client(site_path, f"""
        refs = [square(i) for i in range({N})]
        assert get(refs, timeout=400) == [i * i for i in range({N})]
        d = str(provider.session.dir)
        at_get = count(d)
        provider.backend.flush(at_exit=True)   # what the exit does: collected tasks' job files go
        print(json.dumps({{"dir": d, "id": provider.session.id, "at_get": at_get,
                          "after": count(d), "sbatch": provider.stats().get("sbatch", 0)}}))
    """)
    session_dir = loop["dir"]
    assert loop["sbatch"] <= 2, loop  # the loop went out as one array (or two, split by the linger)
    records = {"session.json", "heartbeat", "job-ids", "closed"}
    # a task leaves its result and its log, nothing else; plus the session's own records
    assert _files(session_dir) <= 2 * N + len(records), (loop, _files(session_dir))
    results = sum(len(n) for _r, _d, n in os.walk(f"{session_dir}/results"))
    logs = len(list(Path(session_dir, "jobs").glob("*_log.out")))
    assert results == N and logs == N
    print(f"files in the session: {loop['at_get']} right after get, {_files(session_dir)} after release")

    running = _client(site_path, """
        ref = nap(45)  # outlasts du, the dry run and gc below (a few CLI calls)
        while ref.status() != "RUNNING":
            time.sleep(0.5)
        print(json.dumps({"dir": str(provider.session.dir), "id": provider.session.id}))
    """)
    assert Path(running["dir"], "closed").exists()  # the process ended: only its job holds it

    config = tmp_path / "serverless.yaml"
    config.write_text(f"providers:\n  - name: cluster\n    site: {site_path}\ndefault: cluster\n")
    du = _cli(config, "du")
    assert du.returncode == 0, du.stderr
    assert f"session {loop['id']}" in du.stdout and "quota:" in du.stdout

    dry = _cli(config, "gc", "--older-than", "0", "--dry-run", "--json")
    report = json.loads(dry.stdout)
    assert loop["id"] in {r["id"] for r in report["removed"]} and Path(session_dir).exists()
    assert running["id"] in {k["id"] for k in report["kept"]}

    gc = _cli(config, "gc", "--older-than", "0")
    assert gc.returncode == 0, gc.stderr
    assert not Path(session_dir).exists(), gc.stdout  # no file of that session left
    assert Path(running["dir"]).exists() and _files(running["dir"]) > 0, gc.stdout
    kept = [line for line in gc.stdout.splitlines() if running["id"] in line]
    assert kept and "RUNNING" in kept[0], gc.stdout

    # once its job ends, the second session goes too
    deadline = time.time() + 180
    while Path(running["dir"]).exists() and time.time() < deadline:
        time.sleep(5)
        _cli(config, "gc", "--older-than", "0")
    assert not Path(running["dir"]).exists()


def test_gc_on_pbs_takes_ended_sessions_and_keeps_one_whose_job_runs(tmp_path):
    """The same on the PBS (Torque wrapper) site, with few jobs: a finished session goes,
    one whose job is still queued or running stays, named with its job's state."""
    from .test_pbs import PBS_SITE

    done = _client(PBS_SITE, """
        assert get([square(i) for i in range(4)], timeout=300) == [0, 1, 4, 9]
        print(json.dumps({"dir": str(provider.session.dir), "id": provider.session.id}))
    """, "PBSProvider")
    running = _client(PBS_SITE, """
        ref = nap(40)
        while not ref.info()["job_id"]:   # submitted: its session records the job
            time.sleep(0.2)
        print(json.dumps({"dir": str(provider.session.dir), "id": provider.session.id}))
    """, "PBSProvider")
    config = tmp_path / "serverless.yaml"
    config.write_text(f"providers:\n  - name: pbs\n    site: {PBS_SITE}\ndefault: pbs\n")
    gc = _cli(config, "gc", "--older-than", "0", "--json")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert done["id"] in {r["id"] for r in report["removed"]} and not Path(done["dir"]).exists()
    kept = {k["id"]: k["why"] for k in report["kept"]}
    assert running["id"] in kept and "job" in kept[running["id"]], report
    assert Path(running["dir"]).exists()
