"""Ctrl-C and the local pool outside Jupyter (tests/integration/test_notebook_kernel.py
drives a real kernel): the driver's wait stops, the tasks do not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpc_serverless.engines.local_pool import _interrupts_deferred

SCRIPT = """
import os, sys, time
from hpc_serverless import distribute_task, get

@distribute_task
def until(flag, value):
    while not os.path.exists(flag):
        time.sleep(0.02)
    return value

flag = sys.argv[1]
refs = [until(flag, i) for i in range(2)]
print("waiting", flush=True)
try:
    get(refs)
except KeyboardInterrupt:
    print("interrupted", [r.status() for r in refs], flush=True)
open(flag, "w").close()
print("values", get(refs), flush=True)
"""


def test_ctrl_c_stops_the_wait_not_the_tasks(tmp_path: Path) -> None:
    """Ctrl-C reaches the terminal's whole foreground process group; a new session
    stands in for that group here."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "HPC_SERVERLESS_CPUS": "2"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "flag")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.splitlines() == ["interrupted ['RUNNING', 'RUNNING']", "values [0, 1]"], (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == 0


def test_interrupts_deferred_holds_sigint_until_the_block_ends() -> None:
    reached_end = False
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a KeyboardInterrupt would have been raised by now
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is before


def test_progress_bar_only_where_someone_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    import hpc_serverless.api as api

    monkeypatch.delenv("HPC_SERVERLESS_NO_PROGRESS", raising=False)
    assert not api._in_jupyter_kernel()
    if not sys.stderr.isatty():
        assert api._progress(100) is None  # a log file or a batch job: no bar
    assert api._progress(5) is None  # a short get: no bar
