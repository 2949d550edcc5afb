"""The local provider: a real pool of worker processes on this machine."""

import os
import threading
import time
import traceback

import pytest

import hpc_serverless as hs
from hpc_serverless import distribute_task, get, put, wait
from hpc_serverless.core.errors import (
    DependencyError,
    GetTimeoutError,
    HPCServerlessError,
    RemoteTraceback,
    ResourceError,
    SerializationError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerDiedError,
)
from hpc_serverless.providers.local import local_resources, shared_pool

from ..traceback_checks import assert_user_frame


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code


@distribute_task
def square(x):
    return x * x


@distribute_task(target={"cpu": 1})
def add(a, b):
    return a + b


@distribute_task
def fail(kind):
    if kind == "value":
        raise ValueError("bad value 42")
    raise CustomError(7, "custom detail")


@distribute_task
def fail_inside():
    return get(fail("value"))


@distribute_task
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


@distribute_task
def nested_sum(n):
    return sum(get([square(i) for i in range(n)]))


@distribute_task
def deep(level):
    if level == 0:
        return 1
    return 1 + get(deep(level - 1))


@distribute_task
def pid_and_env(name):
    return os.getpid(), os.environ.get(name)


def test_values_in_order_and_parallel():
    refs = [square(i) for i in range(50)]
    assert all(isinstance(r, hs.TaskRef) for r in refs)
    assert get(refs) == [i * i for i in range(50)]


def test_pool_is_persistent():
    pids = {p for p, _ in get([pid_and_env("X") for _ in range(30)])}
    assert len(pids) <= shared_pool().slots + 64  # reused processes, not one per task
    assert len(pids) < 30


def test_object_refs_and_mixed_get():
    obs = put({"pauli": "IZ"})
    ref = add.options()(1, 2)
    assert get([obs, ref]) == [{"pauli": "IZ"}, 3]

    @distribute_task
    def read(d, items):
        return d["pauli"], items

    assert get(read(obs, [obs, 5])) == ("IZ", [{"pauli": "IZ"}, 5])


def test_taskref_argument_means_after_with_value():
    a = sleep_then(0.3, 10)
    b = add(a, 5)
    c = add(b, {"x": 1}["x"])
    assert get(c) == 16
    assert get(add.options()(*[square(3), square(4)])) == 25


def test_original_exception_type_with_remote_traceback():
    with pytest.raises(ValueError, match="bad value 42") as e:
        get(fail("value"))
    assert isinstance(e.value.__cause__, RemoteTraceback)
    assert_user_frame(e.value.__cause__.tb, fail, 'raise ValueError("bad value 42")')
    assert e.value.__cause__.tb.startswith("Traceback (most recent call last):\n  File \"" + __file__)
    # here, the user's frames and get(); not the engine's frames that unpacked it
    here = [f.filename for f in traceback.extract_tb(e.value.__traceback__)]
    assert here[0] == __file__ and not any("providers" in f for f in here), here
    with pytest.raises(CustomError) as e2:
        get(fail("custom"))
    assert e2.value.code == 7


def test_nested_task_traceback_shows_both_tasks_lines():
    with pytest.raises(ValueError, match="bad value 42") as e:
        get(fail_inside())
    tb = e.value.__cause__.tb
    assert_user_frame(tb, fail, 'raise ValueError("bad value 42")')
    assert_user_frame(tb, fail_inside, 'return get(fail("value"))')
    assert tb.index("line", tb.index("in fail\n")) < tb.index("in fail_inside")


def test_failed_upstream_fails_dependents_with_its_name():
    up = fail("value")
    down = add(up, 1)
    with pytest.raises(DependencyError, match="fail") as e:
        get(down)
    assert isinstance(e.value.__cause__, ValueError)
    assert down.status() == "FAILED"


def test_nested_tasks_do_not_deadlock():
    # more nested parents than cores: each blocks in get() inside a worker
    n = shared_pool().slots * 3
    assert get([nested_sum(4) for _ in range(n)], timeout=60) == [14] * n
    assert get(deep(4), timeout=60) == 5


def test_get_timeout_raises_timeout_error():
    ref = sleep_then(5, "late")
    with pytest.raises(TimeoutError):
        get(ref, timeout=0.2)
    with pytest.raises(GetTimeoutError, match="timed out"):
        get([ref], timeout=0.1)
    ref.cancel()


def test_wait_returns_done_and_pending():
    fast = [square(i) for i in range(3)]
    slow = sleep_then(3, 0)
    done, pending = wait(fast + [slow], num_returns=3, timeout=30)
    assert len(done) >= 3 and set(fast) <= set(done)
    assert slow in pending
    done, pending = wait([slow], timeout=0.05)
    assert pending == [slow]
    slow.cancel()
    with pytest.raises(HPCServerlessError, match="num_returns"):
        wait(fast, num_returns=5)


def test_cancel_running_and_pending():
    running = sleep_then(30, 1)
    deadline = time.time() + 10
    while running.status() != "RUNNING" and time.time() < deadline:
        time.sleep(0.05)
    assert running.cancel() is True
    with pytest.raises(TaskCancelledError):
        get(running)
    assert running.status() == "STOPPED"
    assert running.cancel() is False
    assert get(square(6)) == 36  # the pool replaced the killed worker


def test_time_limit_kills_task():
    ref = sleep_then.options(time="00:00:01")(30, 1)
    with pytest.raises(TaskTimeoutError, match="time limit"):
        get(ref, timeout=20)
    assert ref.info()["reason"] == "TIMEOUT"


def test_worker_crash_is_reported():
    @distribute_task
    def crash():
        os._exit(3)

    with pytest.raises(WorkerDiedError, match="exit code 3"):
        get(crash(), timeout=30)
    assert get(square(2)) == 4


def test_target_env_is_set_for_the_task_only():
    @distribute_task(target={"env": {"HPCS_TEST_VAR": "yes"}})
    def read_env():
        return os.environ.get("HPCS_TEST_VAR")

    assert get(read_env()) == "yes"
    assert get(pid_and_env("HPCS_TEST_VAR"))[1] is None


def test_too_big_target_fails_at_submission():
    cores, mem, gpus = local_resources()

    @distribute_task(target={"cpu": cores + 1})
    def big():
        return 1

    with pytest.raises(ResourceError, match=f"cpu={cores + 1} but it has"):
        big()
    with pytest.raises(ResourceError, match="mem"):
        square.options(mem=mem / 1024 * 4)(1)
    with pytest.raises(ResourceError, match="gpu"):
        square.options(gpu=gpus + 1)(1)


def test_unpicklable_argument_is_named():
    @distribute_task
    def takes(circuit, lock):
        return 1

    with pytest.raises(SerializationError, match="argument 'lock' of .*takes"):
        takes(1, threading.Lock())


def test_unpicklable_result_fails_the_task():
    @distribute_task
    def returns_lock():
        return threading.Lock()

    with pytest.raises(SerializationError, match="return value"):
        get(returns_lock())


def test_cpu_slots_limit_concurrency():
    slots = shared_pool().slots
    if slots < 2:
        pytest.skip("needs 2 cores")

    @distribute_task(target={"cpu": slots})
    def hog(t):
        start = time.time()
        time.sleep(t)
        return start, time.time()

    a, b = get([hog(0.5), hog(0.5)])
    assert b[0] >= a[1] - 0.05 or a[0] >= b[1] - 0.05  # never overlapped


def test_decorator_misuse():
    with pytest.raises(hs.errors.TargetError, match="unknown target key"):
        @distribute_task(target={"cores": 2})
        def f():
            pass
    with pytest.raises(hs.errors.TargetError):
        distribute_task({"cpu": 2})
    with pytest.raises(HPCServerlessError, match="get\\(\\) takes"):
        get(42)


def test_mpi_task_on_local_provider():
    pytest.importorskip("mpi4py")
    import shutil

    if not shutil.which("mpirun"):
        pytest.skip("no mpirun on this machine")

    @distribute_task(target={"mpi": 2})
    def ranks(offset):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        return comm.allreduce(comm.Get_rank() + offset)

    assert get(ranks(10), timeout=120) == 21  # (0 + 10) + (1 + 10), rank 0's value


def test_bad_timeouts_and_counts_are_clear_errors():
    ref = square(3)
    for bad in ("5", -1, True):
        with pytest.raises(HPCServerlessError, match="timeout must be a number"):
            get(ref, timeout=bad)
        with pytest.raises(HPCServerlessError, match="timeout must be a number"):
            wait([ref], timeout=bad)
    with pytest.raises(HPCServerlessError, match="num_returns must be a whole number"):
        wait([ref], num_returns=1.5)
    assert get(ref) == 9
