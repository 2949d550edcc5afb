"""Remote tracebacks: frames travel as data and come back naming the user's file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hpc_serverless.core.errors import RemoteTraceback
from hpc_serverless.core.serialization import pack_exception, unpack_exception
from hpc_serverless.core.tracebacks import remember

ROOT = Path(__file__).resolve().parents[2]

USER_CODE = textwrap.dedent('''\
    import json


    def helper(x):
        if x < 0:
            raise KeyError(f"missing {x}")
        return json.loads("{not json")


    def task(x):
        try:
            return helper(x)
        except KeyError as exc:
            raise ValueError("task failed") from exc
''')


def _pair(tmp_path: Path, name: str = "user_code.py"):
    """The same functions compiled twice: from the user's file (the client's copy) and as
    cloudpickle >= 3.1.3 rebuilds by-value code on the other side ("<dynamic-code>")."""
    path = tmp_path / name
    path.write_text(USER_CODE)
    client: dict = {"__name__": "__main__"}
    exec(compile(USER_CODE, str(path), "exec"), client)
    remote: dict = {"__name__": "__main__"}
    exec(compile(USER_CODE, "<dynamic-code>", "exec"), remote)
    return path, client, remote


def _run_remote(fn, *args) -> bytes:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        return pack_exception(exc)
    raise AssertionError("expected the call to fail")


def _line(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_by_value_frames_name_the_users_file_line_and_text(tmp_path):
    path, client, remote = _pair(tmp_path)
    remember(client["task"])                       # what pickling the task does on the client
    exc = unpack_exception(_run_remote(remote["task"], -1))
    assert isinstance(exc, ValueError) and str(exc) == "task failed"
    tb = exc.remote_traceback
    n_raise, n_call = _line(path, 'raise KeyError'), _line(path, "return helper(x)")
    assert f'  File "{path}", line {n_call}, in task\n    return helper(x)\n' in tb
    assert f'  File "{path}", line {n_raise}, in helper\n    raise KeyError(f"missing {{x}}")\n' in tb
    # the chain is kept, in Python's order and words
    assert tb.index("KeyError: 'missing -1'") < tb.index("direct cause") < tb.index("ValueError: task failed")
    assert "<dynamic-code>" not in tb
    # the cause came back as an exception of its own, with its own traceback
    assert isinstance(exc.__cause__, KeyError)
    assert isinstance(exc.__cause__.__cause__, RemoteTraceback)
    assert f'line {n_raise}, in helper' in exc.__cause__.__cause__.tb


def test_frames_of_imported_code_keep_the_remote_path_and_text(tmp_path):
    path, client, remote = _pair(tmp_path)
    remember(client["task"])
    exc = unpack_exception(_run_remote(remote["task"], 1))
    tb = exc.__cause__.tb
    assert isinstance(exc, json.JSONDecodeError)
    assert f'File "{path}", line {_line(path, "json.loads")}, in helper\n    return json.loads("{{not json")' in tb
    decoder = json.decoder.__file__
    assert f'File "{decoder}", line ' in tb     # the stdlib's own frames, as the remote saw them


def test_the_client_fills_in_the_line_when_the_remote_cannot_read_the_file(tmp_path):
    """Older cloudpickle keeps the laptop's path in by-value code; the node can't read it."""
    import linecache

    path, client, _ = _pair(tmp_path)
    remember(client["task"])
    hidden = tmp_path / "hidden"
    os.rename(path, hidden)                         # the compute node has no such file
    linecache.checkcache(str(path))
    try:
        data = _run_remote(client["task"], -1)
    finally:
        os.rename(hidden, path)
    linecache.checkcache(str(path))
    sections = unpack_exception(data).remote_sections
    assert all(f.line is None for s in sections for f in s.frames if f.filename == str(path))
    tb = unpack_exception(data).remote_traceback
    assert f'File "{path}", line {_line(path, "raise KeyError")}, in helper\n    raise KeyError(f"missing {{x}}")\n' in tb


def test_code_nobody_remembered_still_shows_its_function_and_line(tmp_path):
    _, _, remote = _pair(tmp_path, "other.py")
    remote["task"].__code__ = remote["task"].__code__.replace(co_name="task_unknown")
    tb = unpack_exception(_run_remote(remote["task"], -1)).remote_traceback
    assert 'File "<dynamic-code>", line 12, in task_unknown\n' in tb


def test_our_own_frames_are_left_out(tmp_path):
    from hpc_serverless.core.calls import execute
    from hpc_serverless.core.serialization import dumps

    path, client, remote = _pair(tmp_path)
    remember(client["task"])
    ok, payload = execute(remote["task"], dumps(((-1,), {})), {})
    assert not ok
    tb = unpack_exception(payload).remote_traceback
    assert "hpc_serverless" not in tb.split("direct cause")[0]
    assert tb.startswith(f'Traceback (most recent call last):\n  File "{path}"')


def test_a_script_run_as_main_on_local_names_its_lines(tmp_path):
    """As a user runs it: a script, its task fails in a worker, the traceback names the script."""
    script = tmp_path / "my study.py"
    script.write_text(textwrap.dedent('''\
        from hpc_serverless import QuantumServerless, distribute_task, get


        def energy(x):
            return 1.0 / x


        @distribute_task
        def sweep(x):
            return energy(x) * 2


        if __name__ == "__main__":
            with QuantumServerless().context():
                try:
                    get(sweep(0))
                except ZeroDivisionError as exc:
                    print(exc.__cause__.tb)
    '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 10, in sweep\n    return energy(x) * 2\n' in out.stdout
    assert f'File "{script}", line 5, in energy\n    return 1.0 / x\n' in out.stdout
    assert out.stdout.rstrip().endswith("ZeroDivisionError: float division by zero")
