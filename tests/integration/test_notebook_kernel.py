"""The local provider inside a real Jupyter kernel, driven with jupyter_client.

A notebook user interrupts cells and shuts kernels down. jupyter_client delivers both
as signals to the kernel's whole process group (SIGINT, then SIGTERM/SIGKILL), so
these tests run the same kernel a notebook would and look at what the pool does:
the wait a cell is in stops, tasks keep running, nothing prints a traceback, and
shutdown leaves no worker behind.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

SLEEPY = """
import os, subprocess, time
from hpc_serverless import distribute_task, get, wait

@distribute_task
def sleepy(seconds, value):
    time.sleep(seconds)
    return value

@distribute_task
def until(flag, value):
    \"\"\"Runs until the test creates `flag`: RUNNING for as long as the test needs.\"\"\"
    while not os.path.exists(flag):
        time.sleep(0.02)
    return value

@distribute_task
def with_child(marker):
    \"\"\"A task that started a process of its own (as MPI ranks or a solver would).\"\"\"
    subprocess.run(["sleep", "60"], env={**os.environ, "HPCS_TEST_CHILD": marker})
"""


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker` (so orphans that were
    re-parented still count)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _pool_workers(kernel_pid: int) -> list[int]:
    """Live pool workers started by the kernel: their environment names its pool."""
    return _processes_with(f"HPC_SERVERLESS_POOL_KEY=localpool:{kernel_pid}:")


class Kernel:
    """A kernel in this venv, with its own stdout/stderr file, run cell by cell."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        spec_dir = tmp_path / "kernels" / "hpcs"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "hpc_serverless test", "language": "python"}))
        self.km = KernelManager(kernel_name="hpcs",
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
        self.log_path = tmp_path / "kernel-output.txt"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in shutdown()
        self.km.start_kernel(env=env, cwd=str(tmp_path), stdout=self._log, stderr=self._log)
        self.pid: int = self.km.provisioner.process.pid  # type: ignore[union-attr]
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.outputs: list[dict[str, Any]] = []  # every iopub output message, all cells

    def start(self, code: str) -> str:
        return self.kc.execute(textwrap.dedent(code))

    def finish(self, msg_id: str, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Wait for the cell's reply; returns it with the cell's output messages."""
        outputs = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind in ("stream", "error", "display_data", "execute_result", "update_display_data",
                        "comm_open", "comm_msg"):
                outputs.append(msg)
                self.outputs.append(msg)
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        return reply["content"], outputs

    def run(self, code: str, timeout: float = 60) -> str:
        """Run a cell that must succeed; returns what it printed."""
        reply, outputs = self.finish(self.start(code), timeout)
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert reply["status"] == "ok", (reply, text)
        return text

    def wait_busy(self, msg_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "busy"):
                return

    def printed(self) -> str:
        """Everything the kernel and its children wrote to their stdout/stderr, plus every
        stream message of every cell (ipykernel forwards its children's output there)."""
        if not self._log.closed:
            self._log.flush()
        streams = "".join(m["content"].get("text", "") for m in self.outputs if m["msg_type"] == "stream")
        return self.log_path.read_text(errors="replace") + streams

    def shutdown(self) -> None:
        try:
            if self.km.has_kernel:
                self.kc.stop_channels()
                self.km.shutdown_kernel(now=False)
        finally:
            self._log.close()


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JPY_", "PYTEST_"))}
    env.pop("HPC_SERVERLESS_NO_PROGRESS", None)
    env["HPC_SERVERLESS_CPUS"] = "3"
    k = Kernel(tmp_path, env)
    try:
        yield k
    finally:
        k.shutdown()
        for pid in _pool_workers(k.pid):  # never leave a stray process behind the suite
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def _assert_workers_quiet(printed: str) -> None:
    """No traceback through our code and no KeyboardInterrupt in anything the kernel or its
    children printed. (ipykernel itself logs a ZMQError traceback when it is shut down
    mid-cell, whatever the cell runs; that one is not ours.)"""
    tracebacks = printed.split("Traceback (most recent call last):")[1:]
    ours = [t for t in tracebacks if "hpc_serverless" in t or "<dynamic-code>" in t]
    assert not ours and "KeyboardInterrupt" not in printed, printed


def _wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_interrupt_stops_the_wait_not_the_tasks(kernel: Kernel, tmp_path: Path) -> None:
    flag = tmp_path / "release"
    kernel.run(SLEEPY + f"refs = [until({str(flag)!r}, i) for i in range(3)]")
    assert _wait_until(lambda: len(_pool_workers(kernel.pid)) >= 3, 20)

    cell = kernel.start("values = get(refs)")
    kernel.wait_busy(cell)
    time.sleep(0.5)  # inside get()
    t0 = time.monotonic()
    kernel.km.interrupt_kernel()
    reply, _ = kernel.finish(cell)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert time.monotonic() - t0 < 5, "the interrupt did not stop the wait promptly"

    assert kernel.run("print([r.status() for r in refs])").strip() == str(["RUNNING"] * 3)
    flag.touch()
    assert kernel.run("print(get(refs))").strip() == "[0, 1, 2]"
    # the pool is still alive: a new task runs on it
    assert kernel.run("print(get(sleepy(0, 'again')))").strip() == "again"
    _assert_workers_quiet(kernel.printed())


def test_interrupting_wait_and_a_program_from_the_notebook(kernel: Kernel, tmp_path: Path) -> None:
    flag = tmp_path / "release"
    src = tmp_path / "prog"
    src.mkdir()
    (src / "main.py").write_text(
        "import os, time\nfrom hpc_serverless import save_result\n"
        f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)\n"
        "save_result('program done')\n")
    kernel.run(SLEEPY + f"""
from hpc_serverless import Program, QuantumServerless
job = QuantumServerless().run_program(Program(title="p", entrypoint="main.py", working_dir={str(src)!r}))
refs = [until({str(flag)!r}, i) for i in range(2)]
""")
    cell = kernel.start("wait(refs)")
    kernel.wait_busy(cell)
    time.sleep(0.5)
    kernel.km.interrupt_kernel()
    reply, _ = kernel.finish(cell)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert kernel.run("print(job.status(), [r.status() for r in refs])").strip() == \
        "RUNNING ['RUNNING', 'RUNNING']"
    flag.touch()
    assert kernel.run("print(job.result(timeout=60), get(refs))").strip() == "program done [0, 1]"
    _assert_workers_quiet(kernel.printed())


def test_shutdown_ends_the_pool_quietly(kernel: Kernel, tmp_path: Path) -> None:
    marker = f"hpcs-child-{tmp_path.name}"
    kernel.run(SLEEPY + f"refs = [sleepy(60, 0), with_child({marker!r}), sleepy(0, 'idle')]\n"
               "wait(refs, num_returns=1)")
    assert _wait_until(lambda: len(_pool_workers(kernel.pid)) >= 3 and _processes_with(marker), 20)
    kernel.start("get(refs)")  # a notebook shut down while a cell waits
    time.sleep(0.5)
    t0 = time.monotonic()
    kernel.shutdown()
    assert time.monotonic() - t0 < 10
    assert _wait_until(lambda: not _pool_workers(kernel.pid), 5), \
        f"pool workers left behind: {_pool_workers(kernel.pid)}"
    assert _wait_until(lambda: not _processes_with(marker), 5), "a task's own process was left behind"
    _assert_workers_quiet(kernel.printed())


def test_killed_kernel_leaves_no_worker(kernel: Kernel, tmp_path: Path) -> None:
    """A kernel killed outright (a restart that timed out, the OOM killer) cannot close
    its pool: the workers notice their parent is gone and end themselves."""
    marker = f"hpcs-child-{tmp_path.name}"
    kernel.run(SLEEPY + f"refs = [sleepy(60, 0), with_child({marker!r}), sleepy(0, 1)]\n"
               "wait(refs, num_returns=1)")
    assert _wait_until(lambda: len(_pool_workers(kernel.pid)) >= 3 and _processes_with(marker), 20)
    os.kill(kernel.pid, 9)
    assert _wait_until(lambda: not _pool_workers(kernel.pid), 5), \
        f"pool workers left behind: {_pool_workers(kernel.pid)}"
    assert _wait_until(lambda: not _processes_with(marker), 5), "a task's own process was left behind"


@pytest.mark.parametrize("widgets", [True, False], ids=["ipywidgets", "text-without-ipywidgets"])
def test_progress_bar_of_get_shows_in_the_kernel(kernel: Kernel, widgets: bool) -> None:
    if widgets:
        pytest.importorskip("ipywidgets")
    block = "" if widgets else "import sys; sys.modules['ipywidgets'] = None  # not installed\n"
    kernel.run(block + SLEEPY)
    reply, outputs = kernel.finish(kernel.start("values = get([sleepy(0.02, i) for i in range(30)])"))
    assert reply["status"] == "ok", reply
    assert kernel.run("print(values == list(range(30)))").strip() == "True"
    text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    if widgets:
        views = [m for m in outputs if m["msg_type"] == "display_data"
                 and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
        assert views, outputs
    else:
        assert "/30" in text and "get" in text, outputs
    assert "IProgress" not in text and "Warning" not in text and "Error" not in text, text
    assert "Traceback" not in kernel.printed() and not [m for m in outputs if m["msg_type"] == "error"]
