"""Programs on the local provider: detached processes with the Job API."""

import subprocess
import sys
import textwrap

import pytest

from hpc_serverless import Program, QuantumServerless
from hpc_serverless.core.errors import JobFailedError, ProgramError


def _program(tmp_path, body, name="main.py", title="test program"):
    wd = tmp_path / "src"
    wd.mkdir(exist_ok=True)
    (wd / name).write_text(textwrap.dedent(body))
    return Program(title=title, entrypoint=name, working_dir=str(wd))


def test_program_runs_detached_with_arguments_and_result(tmp_path):
    program = _program(tmp_path, """
        from hpc_serverless import get_arguments, save_result, distribute_task, get
        @distribute_task
        def double(x):
            return 2 * x
        args = get_arguments()
        print("got", args)
        save_result({"values": get([double(i) for i in range(args["n"])])})
    """, title="a title; with $(shell) 'chars'")
    s = QuantumServerless()
    job = s.run_program(program, arguments={"n": 3})
    assert job.result(timeout=60) == {"values": [0, 2, 4]}
    assert job.status() == "SUCCEEDED"
    assert "got {'n': 3}" in job.logs()
    # found again from another process
    code = (f"from hpc_serverless import QuantumServerless; j = QuantumServerless().get_job_by_id({job.job_id!r});"
            "print(j.status(), j.result())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "SUCCEEDED {'values': [0, 2, 4]}"
    assert job.job_id in [j.job_id for j in s.jobs()]
    assert job.info()["title"] == "a title; with $(shell) 'chars'"


def test_failing_program(tmp_path):
    job = QuantumServerless().run_program(_program(tmp_path, "raise RuntimeError('it broke')\n"))
    with pytest.raises(JobFailedError, match="(?s)FAILED.*it broke"):
        job.result(timeout=60)
    assert job.status() == "FAILED"
    assert "Traceback" in job.logs()


def test_stop_running_program(tmp_path):
    job = QuantumServerless().run_program(_program(tmp_path, "import time\nprint('start', flush=True)\ntime.sleep(60)\n"))
    import time
    for _ in range(100):
        if "start" in job.logs():
            break
        time.sleep(0.1)
    assert job.status() == "RUNNING"
    assert job.stop() is True
    assert job.status() == "STOPPED"
    assert job.stop() is False


def test_missing_entrypoint_is_refused_before_anything_runs(tmp_path):
    wd = tmp_path / "empty"
    wd.mkdir()
    with pytest.raises(ProgramError, match="entrypoint 'nope.py' not found"):
        QuantumServerless().run_program(Program("t", "nope.py", working_dir=str(wd)))
    with pytest.raises(ProgramError, match="not a directory"):
        QuantumServerless().run_program(Program("t", "x.py", working_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ProgramError, match="inside working_dir"):
        Program("t", "../escape.py")
    with pytest.raises(ProgramError, match="title"):
        Program("", "x.py")


def test_unknown_job_id():
    from hpc_serverless.core.errors import HPCServerlessError
    with pytest.raises(HPCServerlessError, match="no job"):
        QuantumServerless().get_job_by_id("20000101-000000-abcdef")
    with pytest.raises(HPCServerlessError, match="invalid job id"):
        QuantumServerless().get_job_by_id("../etc")


def test_stop_right_after_start_reads_stopped(tmp_path):
    """Issue 17 item 3: a program stopped before (or while) its runner starts is STOPPED,
    not FAILED/LOST; and a program that outlives SIGTERM (killed after the grace period)
    is STOPPED too."""
    import time

    s = QuantumServerless()
    job = s.run_program(_program(tmp_path, "import time\ntime.sleep(60)\n"))
    assert job.stop() is True
    assert job.info()["status"] == "STOPPED", job.info()
    stubborn = s.run_program(_program(tmp_path, """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("start", flush=True)
        time.sleep(60)
    """, name="stubborn.py"))
    for _ in range(100):
        if "start" in stubborn.logs():
            break
        time.sleep(0.1)
    assert stubborn.stop() is True
    info = stubborn.info()
    assert info["status"] == "STOPPED" and info["reason"].startswith("stopped by the user"), info


def test_a_folder_in_the_working_dir_cannot_shadow_the_package(tmp_path):
    """Issue 17 item 5 on the local provider: the runner, the program and the local pool's
    workers import the real package although the working dir holds a folder of its name."""
    program = _program(tmp_path, """
        import hpc_serverless
        from hpc_serverless import distribute_task, get, save_result
        from helper import VALUE

        @distribute_task
        def where():
            import hpc_serverless
            return hpc_serverless.__file__

        save_result({"value": VALUE, "data": open("data.txt").read(), "package": hpc_serverless.__file__,
                     "worker": get(where(), timeout=60)})
    """)
    wd = tmp_path / "src"
    (wd / "helper.py").write_text("VALUE = 7\n")
    (wd / "data.txt").write_text("relative ok")
    (wd / "hpc_serverless").mkdir()
    (wd / "hpc_serverless" / "__init__.py").write_text("raise ImportError('the shadow was imported')\n")
    job = QuantumServerless().run_program(program)
    result = job.result(timeout=120)
    assert result["value"] == 7 and result["data"] == "relative ok"
    assert "/workdir/" not in result["package"] and "/workdir/" not in result["worker"]


@pytest.mark.parametrize("shadow", ["regular", "namespace"])
def test_launch_guard_keeps_the_package_and_the_cwd_modules(tmp_path, shadow):
    """`python -c GUARD -m mod`: the package comes from the install even when the cwd holds
    a folder of its name (with or without __init__.py); the cwd's own modules still import."""
    from hpc_serverless.core.launch import module_argv, script_argv

    pkg = tmp_path / "hpc_serverless"
    (pkg / "core" / "store").mkdir(parents=True)
    if shadow == "regular":
        (pkg / "__init__.py").write_text("raise ImportError('the shadow was imported')\n")
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import sys
        import hpc_serverless
        from hpc_serverless.core.store import ObjectStore
        print(hpc_serverless.__file__, sys.argv[1:])
    """))
    for argv in (module_argv(sys.executable, "probe", "a b"), script_argv(sys.executable, "probe.py", "a b")):
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        path, args = out.stdout.split(" ", 1)
        assert not path.startswith(str(tmp_path)) and args.strip() == "['a b']"
    plain = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode != 0 or plain.stdout.startswith(str(tmp_path))  # what the guard prevents


def test_local_programs_are_kept_until_rm_or_gc_programs(tmp_path):
    """`gc` leaves Programs; `remove_job` refuses a running one and removes an ended one;
    `gc(programs=True)` takes ended ones and keeps running ones."""
    import time

    from hpc_serverless.core.errors import HPCServerlessError
    from hpc_serverless.providers.local import default_home

    s = QuantumServerless()
    done = s.run_program(_program(tmp_path, "print('done')\n"))
    done.result(timeout=60)
    other = s.run_program(_program(tmp_path, "print('done too')\n", name="two.py"))
    other.result(timeout=60)
    running = s.run_program(_program(tmp_path, "import time\ntime.sleep(60)\n", name="slow.py"))
    try:
        jobs = default_home() / "jobs"
        # (other tests' ended sessions may go here: this checks that no Program does)
        assert done.job_id not in {r.get("id") for r in s.gc(0)["removed"]} and (jobs / done.job_id).is_dir()
        with pytest.raises(HPCServerlessError, match="RUNNING; stop it first"):
            s.remove_job(running.job_id)
        assert s.remove_job(done.job_id)["files"] > 0 and not (jobs / done.job_id).exists()
        time.sleep(0.05)
        report = s.gc(0, programs=True)
        assert other.job_id in [r.get("id") for r in report["removed"]]
        assert not (jobs / other.job_id).exists() and (jobs / running.job_id).is_dir()
        assert any(k.get("id") == running.job_id and "RUNNING" in k["why"] for k in report["kept"])
    finally:
        running.stop()
